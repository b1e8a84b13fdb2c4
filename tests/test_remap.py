"""The remap formula of design.md, checked against values computed by hand."""
import math

import numpy as np
import pytest
import torch

from model.remap import downsample_image, remap, sigmoid_window, upsample_maps


def hand_remap(x, a, b, wc, ww):
    y = min(max(a * x + b, 0.0), 1.0)
    return y, 1.0 / (1.0 + math.exp(-4.0 * (y - wc) / ww))


@pytest.mark.parametrize("x,a,b,wc,ww", [
    (0.25, 2.0, -0.1, 0.5, 0.4),   # inside the clip
    (0.9, 1.5, 0.2, 0.3, 0.1),     # clipped at 1
    (0.1, 0.5, -0.2, 0.6, 1.0),    # clipped at 0
    (0.5, 0.0, 0.7, 0.7, 0.05),    # a = 0: flat LUT, z exactly 0.5
])
def test_remap_matches_values_computed_by_hand(x, a, b, wc, ww):
    y, z = remap(torch.tensor([[x]]), a, b, wc, ww)
    y_hand, z_hand = hand_remap(x, a, b, wc, ww)
    assert float(y) == pytest.approx(y_hand, abs=1e-6)
    assert float(z) == pytest.approx(z_hand, abs=1e-6)


def test_remap_is_monotonic_in_x_for_every_pixel():
    g = torch.Generator().manual_seed(0)
    h, w = 37, 53
    a = torch.rand(1, 1, h, w, generator=g) * 3
    b = torch.rand(1, 1, h, w, generator=g) - 0.5
    wc = torch.rand(1, 1, h, w, generator=g)
    ww = torch.rand(1, 1, h, w, generator=g) + 0.02
    levels = torch.linspace(0, 1, 65)
    zs = torch.stack([remap(torch.full((1, 1, h, w), float(v)), a, b, wc, ww).z for v in levels])
    assert torch.all(zs[1:] - zs[:-1] >= 0)
    assert torch.all(zs[-1] - zs[0] >= 0)


def test_low_resolution_maps_are_upsampled_onto_the_pixels_they_came_from():
    # A map that is a linear ramp in the low-res grid stays a ramp after x8 upsampling, and
    # constant maps stay exactly constant for an odd-sized image (padding cropped, not stretched).
    x = torch.rand(1, 1, 1001, 777)
    low = downsample_image(x, 8)
    assert low.shape[-2:] == (126, 98)
    const = torch.full_like(low, 0.3)
    up = upsample_maps(const, (1001, 777), 8)
    assert up.shape[-2:] == (1001, 777)
    assert torch.allclose(up, torch.tensor(0.3))
    y, _ = remap(x, const, 0.1, 0.5, 0.5, downsample=8)
    assert torch.allclose(y, torch.clamp(0.3 * x + 0.1, 0, 1), atol=1e-6)


def test_downsample_is_an_area_mean():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    low = downsample_image(x, 4)
    assert low.shape[-2:] == (2, 2)
    assert float(low[0, 0, 0, 0]) == pytest.approx(float(x[0, 0, :4, :4].mean()))


def test_remap_accepts_numpy_derived_tensors_of_any_map_resolution():
    x = torch.from_numpy(np.linspace(0, 1, 200 * 300, dtype=np.float32).reshape(200, 300))
    a = torch.full((1, 1, 7, 11), 2.0)
    y, z = remap(x, a, -0.5, 0.5, 0.25)
    assert y.shape == x.shape and z.shape == x.shape
    assert torch.allclose(y, torch.clamp(2 * x - 0.5, 0, 1), atol=1e-6)


@pytest.mark.parametrize("shape,ds", [((1001, 777), 8), ((640, 512), 4), ((300, 1250), 16)])
def test_banded_inference_path_equals_the_differentiable_path(shape, ds):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, *shape, generator=g)
    low = [torch.rand(1, 1, -(-shape[0] // ds), -(-shape[1] // ds), generator=g) for _ in range(4)]
    a, b, wc, ww = low[0] * 2, low[1] - 0.5, low[2], low[3] + 0.05
    fast = remap(x, a, b, wc, ww, downsample=ds)
    a.requires_grad_(True)  # forces the plain, differentiable path
    plain = remap(x, a, b, wc, ww, downsample=ds)
    assert torch.allclose(fast.y, plain.y.detach(), atol=1e-6)
    assert torch.allclose(fast.z, plain.z.detach(), atol=1e-6)
    mixed = remap(x, a.detach(), b, 0.4, 0.2, downsample=ds)  # scalar window beside low-res maps
    assert torch.allclose(mixed.z, sigmoid_window(plain.y.detach(), 0.4, 0.2), atol=1e-6)


@pytest.mark.parametrize("shape,ds", [((1001, 777), 8), ((37, 45), 16), ((130, 9), 2), ((8, 8), 4), ((257, 300), 4)])
@pytest.mark.parametrize("fused", [True, False])
def test_both_inference_kernels_equal_the_differentiable_path(shape, ds, fused, monkeypatch):
    """The fused kernel (numba) and its torch fallback, at sizes where the maps have fewer than
    three columns or rows (edges only) and where the image is not a multiple of the factor."""
    from model import remap as remap_module

    if fused and not remap_module._fused_available():
        pytest.skip("numba is not installed: only the torch fallback runs")
    monkeypatch.setattr(remap_module, "_numba_state", [fused])
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, *shape, generator=g)
    low = [torch.rand(1, 1, -(-shape[0] // ds), -(-shape[1] // ds), generator=g) for _ in range(4)]
    a, b, wc, ww = low[0] * 2, low[1] - 0.5, low[2], low[3] + 0.05
    plain = remap(x, a.clone().requires_grad_(True), b, wc, ww, downsample=ds)
    for want_z in (True, False):
        fast = remap(x, a, b, wc, ww, downsample=ds, want_z=want_z)
        assert torch.allclose(fast.y, plain.y.detach(), atol=1e-6)
        if want_z:
            assert torch.allclose(fast.z, plain.z.detach(), atol=1e-6)
    constant = remap(x, torch.full_like(a, 0.7), 0.1, 0.5, 0.3, downsample=ds)  # constant maps stay constant
    assert torch.allclose(constant.y, torch.clamp(0.7 * x + 0.1, 0, 1), rtol=0, atol=1.2e-7)  # one float32 ulp


def test_a_fused_kernel_that_fails_leaves_the_torch_path_with_a_warning(monkeypatch):
    from model import remap as remap_module

    def broken(*args):  # what a stale numba cache or a llvmlite mismatch raises at first call
        raise RuntimeError("cannot load the compiled kernel")

    monkeypatch.setattr(remap_module, "_numba_state", [True])
    monkeypatch.setattr(remap_module, "_fused_remap", broken)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 1, 64, 48, generator=g)
    low = [torch.rand(1, 1, 8, 6, generator=g) for _ in range(4)]
    with pytest.warns(RuntimeWarning, match="the slower torch path is used"):
        fast = remap(x, low[0], low[1], low[2], low[3] + 0.05, downsample=8)
    plain = remap(x, low[0].clone().requires_grad_(True), low[1], low[2], low[3] + 0.05, downsample=8)
    assert torch.allclose(fast.y, plain.y.detach(), atol=1e-6) and torch.allclose(fast.z, plain.z.detach(), atol=1e-6)
    assert remap_module._numba_state == [False]  # not tried again on every image


def test_the_fused_kernel_gives_the_same_bits_on_any_number_of_threads():
    from model import remap as remap_module

    if not remap_module._fused_available():
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(9)
    x = torch.rand(1, 1, 1203, 517, generator=g)
    maps = [torch.rand(1, 1, 151, 65, generator=g) + 0.05 for _ in range(4)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(remap(x, *maps, downsample=8))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(other.y, results[0].y) and torch.equal(other.z, results[0].z)


@pytest.mark.parametrize("fused", [True, False])
def test_maps_larger_than_the_image_are_used_from_the_top_left(fused, monkeypatch):
    """A crop at (0, 0) of a larger image with that image's low-res maps (training's renders)."""
    from model import remap as remap_module

    if fused and not remap_module._fused_available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(remap_module, "_numba_state", [fused])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 203, 157, generator=g)
    maps = [torch.rand(1, 1, 26, 20, generator=g) + 0.05 for _ in range(4)]
    whole = remap(x, *maps, downsample=8)
    for h, w in [(64, 64), (9, 150), (200, 17)]:
        crop = remap(x[..., :h, :w].contiguous(), *maps, downsample=8)
        assert torch.allclose(crop.z, whole.z[..., :h, :w], atol=1e-6)
