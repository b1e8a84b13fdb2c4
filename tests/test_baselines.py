"""The Table 1 baselines: their formulas, their geometry, their checkpoints."""
import math

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.net import ModelConfig, build_model, mirror_averaged
from model.remap import remap
from model.remap import downsample_image
from training.baselines import (
    BASELINES,
    apply_lut,
    baseline_config,
    clahe,
    enhance,
    parameter_count,
    produces_maps,
    render,
    render_points,
)
from support.helpers import phantom_radiograph


def phantom_x(rows=203, cols=157, seed=0) -> torch.Tensor:
    return torch.from_numpy(phantom_radiograph(rows, cols, bits=12, seed=seed).astype(np.float32) / 4095)[None, None]


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("rows,cols", [(203, 157), (96, 300)])
def test_every_baseline_maps_the_full_resolution_image_to_a_display_image_of_its_size(name, rows, cols):
    torch.manual_seed(0)
    model = build_model(baseline_config(name, width=8), BASELINES).eval()
    x = phantom_x(rows, cols)
    with torch.no_grad():
        out = enhance(model, torch.cat([x, x.flip(-1)]))
    assert out.z.shape == (2, 1, rows, cols)
    assert out.maps is None and not produces_maps(model)
    assert torch.isfinite(out.z).all() and out.z.min() >= 0 and out.z.max() <= 1
    assert parameter_count(model) > 0


def test_the_proposed_model_goes_through_the_same_interface_with_its_maps():
    torch.manual_seed(0)
    model = build_model(ModelConfig(downsample=8, width=8)).eval()
    x = phantom_x()
    with torch.no_grad():
        out = enhance(model, x[0, 0])
        maps = mirror_averaged(model, torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 3, 0, 5), mode="replicate"), 8))
    assert produces_maps(model)
    assert out.maps.shape == (1, 4, 26, 20)
    torch.testing.assert_close(out.maps, maps)
    a, b, wc, ww = maps.split(1, dim=1)
    torch.testing.assert_close(out.z, remap(x, a, b, wc, ww, downsample=8).z)


def test_dlbc_is_the_shared_sigmoid_window_of_x_with_one_window_per_image():
    torch.manual_seed(0)
    model = build_model(baseline_config("dlbc", width=8), BASELINES).eval()
    x = torch.cat([phantom_x(seed=1), 0.5 * phantom_x(seed=2)])
    with torch.no_grad():
        z = enhance(model, x).z
        window = mirror_averaged(model, torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 3, 0, 5), mode="replicate"), 8))
    for i in range(2):
        wc, ww = window[i].tolist()
        expected = 1 / (1 + np.exp(-4 * (x[i, 0].numpy().astype(np.float64) - wc) / ww))
        np.testing.assert_allclose(z[i, 0].numpy(), expected, atol=1e-5)
    # the same as the proposed formula with a = 1, b = 0 and constant window maps
    torch.testing.assert_close(z[:1], remap(x[:1], 1.0, 0.0, window[0, 0].item(), window[0, 1].item()).z)


def test_apply_lut_interpolates_linearly_between_the_lut_points():
    lut = torch.tensor([[0.0, 0.2, 1.0], [1.0, 0.5, 0.0]])  # 3 points at x = 0, 0.5, 1
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.2]).reshape(1, 1, 1, 6).repeat(2, 1, 1, 1)
    out = apply_lut(x, lut)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.1, 0.2, 0.6, 1.0, 1.0]))
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0, 0.0]))


def test_adaptive_lut_starts_near_the_identity_and_is_applied_at_full_resolution():
    torch.manual_seed(0)
    model = build_model(baseline_config("lut", width=8), BASELINES).eval()
    assert model.bases.shape == (8, 33)
    x = phantom_x()
    with torch.no_grad():
        z = enhance(model, x).z
    assert (z - x).abs().max() < 0.05  # identity at the start (Zeng et al.'s initialisation)
    # every pixel goes through the same per-image curve: equal inputs give equal outputs
    with torch.no_grad():
        lut = model(torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 3, 0, 5), mode="replicate"), 8))
    torch.testing.assert_close(z, apply_lut(x, lut).clamp(0, 1))


def test_sup_dce_applies_eight_zero_dce_curves_with_the_predicted_r():
    model = build_model(baseline_config("sup-dce", width=8), BASELINES).eval()
    r = 0.6
    with torch.no_grad():  # a head that ignores the image: r = tanh(bias) everywhere
        model.c7.weight.zero_()
        model.c7.bias.fill_(math.atanh(r))
    x = phantom_x()
    with torch.no_grad():
        z = enhance(model, x).z
    expected = x[0, 0].numpy().astype(np.float64)
    for _ in range(8):
        expected = expected + r * (expected**2 - expected)
    np.testing.assert_allclose(z[0, 0].numpy(), expected, atol=1e-5)


def test_image_resunet_predicts_at_one_eighth_and_upsamples_to_full_size():
    torch.manual_seed(0)
    model = build_model(baseline_config("resunet-image", width=8), BASELINES).eval()
    x = phantom_x(200, 160)
    with torch.no_grad():
        low = mirror_averaged(model, torch.nn.functional.avg_pool2d(x, 8))
        z = enhance(model, x).z
    assert low.shape == (1, 1, 25, 20)
    torch.testing.assert_close(z, torch.nn.functional.interpolate(low, scale_factor=8.0, mode="bilinear"))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_checkpoint_rebuilds_itself(name, tmp_path):
    torch.manual_seed(3)
    model = build_model(baseline_config(name, width=8), BASELINES)
    identity = save_checkpoint(tmp_path / "b.pt", model)
    loaded = load_checkpoint(tmp_path / "b.pt", baselines=BASELINES)
    assert loaded.identity == identity and loaded.config == model.config
    x = phantom_x()
    with torch.no_grad():
        torch.testing.assert_close(enhance(model.eval(), x).z, enhance(loaded.model, x).z)


def test_a_baseline_checkpoint_loads_only_when_told_how_to_build_it(tmp_path):
    """model/ never imports training/: the builders are passed in, not found in a registry."""
    save_checkpoint(tmp_path / "b.pt", build_model(baseline_config("dlbc", width=8), BASELINES))
    with pytest.raises(CheckpointError, match="unknown architecture 'baseline:dlbc'"):
        load_checkpoint(tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt", baselines=BASELINES).config.arch == "baseline:dlbc"


def test_unknown_baseline_names_are_rejected_with_the_known_ones_listed():
    with pytest.raises(ValueError, match="unknown baseline 'nonsense'.*baseline:dlbc"):
        baseline_config("nonsense")


def test_clahe_stretches_local_contrast_and_keeps_the_range():
    x = phantom_x(256, 200)[0, 0].numpy()
    z = clahe(x)
    assert z.shape == x.shape and z.dtype == np.float32
    assert z.min() >= 0 and z.max() <= 1
    # the body's soft tissue occupies a narrow band of x; CLAHE spreads it
    body = (x > 0.4) & (x < 0.6)
    assert z[body].std() > 2 * x[body].std()


@pytest.mark.parametrize("name", sorted(BASELINES) + ["proposed"])
def test_rendering_a_crop_equals_cropping_the_rendered_image(name):
    """Training renders full-resolution crops from the whole image's low-res output; inference
    renders the whole image. Both must be the same function."""
    torch.manual_seed(0)
    config = ModelConfig(downsample=8, width=8) if name == "proposed" else baseline_config(name, width=8)
    model = build_model(config, BASELINES).eval()
    x = phantom_x(203, 157)
    with torch.no_grad():
        out = model(downsample_image(x, 8))
        whole = render(model, x, out)
        for top, left, h, w in [(0, 0, 64, 64), (37, 21, 96, 80), (203 - 50, 157 - 40, 50, 40)]:
            crop = render(model, x[..., top:top + h, left:left + w], out, top, left)
            torch.testing.assert_close(crop, whole[..., top:top + h, left:left + w], atol=1e-5, rtol=0)


def test_global_baselines_accept_images_smaller_than_their_receptive_field():
    x = phantom_x(40, 24)
    for name in ("dlbc", "lut"):
        model = build_model(baseline_config(name, width=8), BASELINES).eval()
        with torch.no_grad():
            assert enhance(model, x).z.shape == x.shape


@pytest.mark.parametrize("name", sorted(BASELINES) + ["proposed"])
def test_rendering_scattered_pixels_equals_the_rendered_image_there(name):
    """The loss's whole-image term samples scattered pixels; they must be the inference output."""
    torch.manual_seed(0)
    config = ModelConfig(downsample=8, width=8) if name == "proposed" else baseline_config(name, width=8)
    model = build_model(config, BASELINES).eval()
    x = torch.cat([phantom_x(203, 157, seed=1), phantom_x(203, 157, seed=2)])
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 203, 50), rng.integers(0, 157, 50)
    rc = torch.from_numpy(np.stack([rows, cols], axis=1).astype(np.float32))
    with torch.no_grad():
        out = model(downsample_image(x, 8))
        whole = render(model, x, out)
        points = render_points(model, x[:, 0, rows, cols], out, rc)
    torch.testing.assert_close(points, whole[:, 0, rows, cols], atol=1e-5, rtol=0)
