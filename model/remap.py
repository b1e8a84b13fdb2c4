"""The remap: the one implementation of the formula every part of the project agrees on.

design.md, "The remap":
  regional LUT  y = clip(a * x + b, 0, 1)               (a >= 0: monotonic in x)
  global LUT    z = 1 / (1 + exp(-4 * (y - wc) / ww))   (DICOM SIGMOID VOI LUT, PS3.3 C.11.2.1.3.1)
  display       65535 * z
All maths in float32 on the normalised image x in [0, 1]. Training, inference, the writer and
the tests call these functions; nothing else re-implements them. (`remap`'s CPU inference path
runs the formula in one fused pass, model/_remap_kernel.py, behind this same function; the tests
hold it to the plain path.)
"""
from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MapLike = torch.Tensor | float


class Remapped(NamedTuple):
    y: torch.Tensor  # after the regional LUT, [0, 1]
    z: torch.Tensor  # after the global SIGMOID window, [0, 1]


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (1, 1, H, W); (C, H, W) -> (1, C, H, W); 4-D unchanged."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], downsample: int | None = None) -> torch.Tensor:
    """Bring low-resolution maps (N, C, h, w) to full resolution `size`.

    With `downsample`, the maps are taken to come from `downsample_image` (bottom/right padded to
    a multiple of the factor, then area-pooled), so an exact x`downsample` bilinear upscale puts
    every low-res sample back on the centre of the pixels it averaged; the pad is then cropped.
    Without it, the maps are resampled to `size` (any resolution, e.g. an archive's .npz maps).
    """
    h, w = size
    if maps.shape[-2:] == (h, w):
        return maps
    if downsample is None:
        return F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    up = F.interpolate(maps, scale_factor=float(downsample), mode="bilinear", align_corners=False)
    return up[..., :h, :w]


def downsample_image(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Antialiased downsample by an integer factor: replicate-pad to a multiple, then area mean."""
    x = _as_4d(x)
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.avg_pool2d(x, factor) if factor > 1 else x


def regional_lut(x: torch.Tensor, a: MapLike, b: MapLike) -> torch.Tensor:
    """Tissue equalisation: y = clip(a * x + b, 0, 1)."""
    return torch.clamp(torch.addcmul(torch.as_tensor(b, dtype=x.dtype), torch.as_tensor(a, dtype=x.dtype), x), 0.0, 1.0)


def sigmoid_window(y: torch.Tensor, wc: MapLike, ww: MapLike) -> torch.Tensor:
    """DICOM SIGMOID VOI LUT function on [0, 1]: z = 1 / (1 + exp(-4 (y - wc) / ww))."""
    return torch.sigmoid(4.0 * (y - wc) / ww)


def inverse_sigmoid_window(z: torch.Tensor, wc: MapLike, ww: MapLike, eps: float = 1e-4) -> torch.Tensor:
    """The y that `sigmoid_window` maps to z: y = wc + ww/4 logit(z), z clamped to [eps, 1 - eps]
    first (z = 0 or 1 has no finite y)."""
    return wc + ww / 4.0 * torch.logit(z, eps=eps)


def percentile_window(values: torch.Tensor, p_lo: float = 1.0, p_hi: float = 99.0, squeeze: float = 1.2,
                      min_ww: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """A global window from robust percentiles of the values: wc = (P_lo + P_hi) / 2 within
    [0, 1], ww = (P_hi - P_lo) / squeeze within [min_ww, 1]; with the default squeeze 1.2 the
    percentile ends land at z = 0.91 / 0.09. The teacher, the prior and the evaluation's
    reference (A) all choose their window with it."""
    values = values.flatten()
    lo, hi = torch.quantile(values, torch.tensor([p_lo / 100, p_hi / 100], device=values.device, dtype=values.dtype))
    return ((lo + hi) / 2).clamp(0.0, 1.0), ((hi - lo) / squeeze).clamp(min_ww, 1.0)


def sample_bilinear(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, downsample: int = 1) -> torch.Tensor:
    """Bilinear samples of images img (N, C, h, w) at full-resolution pixel coordinates rows, cols
    (any one shape S), border clamped: (N, C, *S). img is at 1/downsample of the full resolution,
    laid out as `downsample_image` makes it, so at whole pixels the values are those
    `upsample_maps(img, size, downsample)` gives (torch's grid_sample does the sampling)."""
    h, w = img.shape[-2:]
    gx = (cols + 0.5) / downsample / w * 2 - 1
    gy = (rows + 0.5) / downsample / h * 2 - 1
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1).to(img.device, img.dtype)
    grid = grid[None, None].expand(img.shape[0], -1, -1, -1)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*img.shape[:2], *rows.shape)


def remap(
    x: torch.Tensor,
    a: MapLike,
    b: MapLike,
    wc: MapLike,
    ww: MapLike,
    *,
    downsample: int | None = None,
    want_z: bool = True,
) -> Remapped:
    """Remap full-resolution x with parameter maps of any resolution.

    x: (H, W) or (N, 1, H, W) float32 in [0, 1]. Each of a, b, wc, ww is a float, a tensor that
    broadcasts against x, or a low-resolution map (N, 1, h, w) that is upsampled first (see
    `upsample_maps`). Returns (y, z) shaped like x. With want_z=False the window is skipped and
    z is y (the `voi` writer stores y and a window tag, so it never needs z).
    """
    squeeze = x.dim() == 2
    x4 = _as_4d(x).float()
    size = tuple(x4.shape[-2:])
    maps = [_as_4d(m).float() if isinstance(m, torch.Tensor) and m.dim() >= 2 and m.numel() > 1
            and tuple(m.shape[-2:]) != size else None for m in (a, b, wc, ww)]
    if not want_z:  # the window maps are not used: do not upsample them
        maps[2:] = [None, None]
    needs_grad = torch.is_grad_enabled() and any(isinstance(m, torch.Tensor) and m.requires_grad for m in (x, a, b, wc, ww))
    # On the CPU the full-size maps cost more than the formula: the inference path avoids them. A
    # GPU does the plain path in a few kernels, faster than band after band.
    if (downsample is not None and not needs_grad and x4.shape[0] == 1 and x4.device.type == "cpu"
            and any(m is not None for m in maps)):
        y, z = _remap_in_bands(x4, (a, b, wc, ww), maps, downsample, want_z)
    else:
        full = [upsample_maps(m, size, downsample) if m is not None else v for m, v in zip(maps, (a, b, wc, ww))]
        y = regional_lut(x4, full[0], full[1])
        z = sigmoid_window(y, full[2], full[3]) if want_z else y
    if squeeze:
        return Remapped(y[0, 0], z[0, 0])
    return Remapped(y, z)


BAND_ROWS = 64  # rows per band of the torch fallback: the band's upsampled maps stay in cache


def _remap_in_bands(x4, values, maps, downsample: int, want_z: bool):
    """CPU inference path of `remap`: the same bilinear upsampling and formula, without full-size
    maps. One fused pass (`_fused_remap`, compiled with numba) when every value is a
    low-resolution map or a scalar; otherwise (numba missing, a full-resolution value beside the
    maps) the separable torch version below. tests/test_remap.py checks both against the plain,
    differentiable path.
    """
    if _fused_available():
        low = _low_stack(values, maps, want_z)
        if low is not None:
            try:
                return _fused_remap(x4, low, downsample, want_z)
            except Exception as exc:  # compiling or loading it failed (a broken cache, llvmlite): slower, not down
                warnings.warn(f"the fused remap kernel failed, the slower torch path is used from now on: {exc!r}",
                              RuntimeWarning, stacklevel=2)
                _numba_state[:] = [False]
    return _remap_in_torch_bands(x4, values, maps, downsample, want_z)


def _remap_in_torch_bands(x4, values, maps, downsample: int, want_z: bool):
    """Separable upsampling in torch (columns once at low-res height, rows per band), each band
    kept in cache; the fallback of `_remap_in_bands`."""
    h_full, w_full = x4.shape[-2:]
    low = [m for m in maps if m is not None]
    h_low, w_low = low[0].shape[-2:]
    # Columns: exact x`downsample` bilinear along W only (the row scale stays 1).
    stacked = torch.cat(low, dim=1)
    cols = F.interpolate(stacked, size=(h_low, w_low * downsample), mode="bilinear", align_corners=False)
    cols = cols[0, :, :, :w_full]
    # Rows: the source coordinate of each output row, as F.interpolate computes it.
    src = ((torch.arange(h_full, dtype=torch.float32) + 0.5) / downsample - 0.5).clamp_min(0.0)
    top = src.floor().long().clamp_max(h_low - 1)
    bottom = (top + 1).clamp_max(h_low - 1)
    frac = (src - top)[:, None]

    y = torch.empty_like(x4)
    z = torch.empty_like(x4) if want_z else y
    for r0 in range(0, h_full, BAND_ROWS):
        rows = slice(r0, min(r0 + BAND_ROWS, h_full))
        band = torch.lerp(cols[:, top[rows]], cols[:, bottom[rows]], frac[rows])
        band_maps, k = [], 0
        for m, v in zip(maps, values):
            if m is not None:
                band_maps.append(band[k])
                k += 1
            else:
                band_maps.append(v[..., rows, :][0, 0] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.numel() > 1 else v)
        y_band = regional_lut(x4[0, 0, rows], band_maps[0], band_maps[1])
        y[0, 0, rows] = y_band
        if want_z:
            z[0, 0, rows] = sigmoid_window(y_band, band_maps[2], band_maps[3])
    return y, z


# --- the fused CPU kernel (model/_remap_kernel.py) ---------------------------------------------
#
# Rows are split into `torch.get_num_threads()` chunks, each run by a thread (the kernel releases
# the GIL), so the one torch thread setting governs it too.

_numba_state: list = []  # [] not tried yet; [True] / [False]: the kernel (numba) can be imported
_pool_lock = threading.Lock()
_pool: list = []  # [ThreadPoolExecutor, its size] once made


def _fused_available() -> bool:
    if not _numba_state:
        try:
            from model import _remap_kernel  # noqa: F401 - imports numba
            _numba_state.append(True)
        except ImportError:  # the torch bands still work, slower
            _numba_state.append(False)
        except Exception as exc:  # e.g. numba finds nowhere to cache its compiled code (NUMBA_CACHE_DIR)
            warnings.warn(f"the fused remap kernel is not available, the slower torch path is used: {exc!r}",
                          RuntimeWarning, stacklevel=2)
            _numba_state.append(False)
    return _numba_state[0]


def kernel_name() -> str:
    """What `remap`'s CPU inference path runs on: for benchmarks and logs."""
    if _fused_available():
        import numba

        return f"fused numba {numba.__version__}"
    return "torch bands (numba not installed)"


def _low_stack(values, maps, want_z: bool):
    """The values as one (n, h, w) float32 array of low-resolution maps (a scalar becomes a
    constant map, exact under the lerps), n = 4 with want_z else 2; None when a value is neither
    (e.g. a full-resolution tensor), or the maps differ in size."""
    count = 4 if want_z else 2
    shapes = {tuple(m.shape[-2:]) for m in maps[:count] if m is not None}
    if len(shapes) != 1:
        return None
    (shape,) = shapes
    out = np.empty((count, *shape), dtype=np.float32)
    for i in range(count):
        m, v = maps[i], values[i]
        if m is not None:
            if m.shape[0] != 1 or m.shape[1] != 1:
                return None
            out[i] = m[0, 0].detach().cpu().numpy()
        elif isinstance(v, torch.Tensor) and v.numel() != 1:
            return None
        else:
            out[i] = float(v)
    return out


@functools.lru_cache(maxsize=16)
def _weights(n_full: int, n_low: int, downsample: int):
    """Lower index, upper index and weight of each full-resolution row or column, as
    F.interpolate(scale_factor=downsample, mode="bilinear", align_corners=False) computes them."""
    src = ((np.arange(n_full, dtype=np.float32) + np.float32(0.5)) / np.float32(downsample)
           - np.float32(0.5)).clip(0, None)
    lower = np.minimum(np.floor(src).astype(np.int64), n_low - 1)
    upper = np.minimum(lower + 1, n_low - 1)
    return lower, upper, (src - lower).astype(np.float32)


def _thread_pool(size: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool or _pool[1] < size:
            # The smaller pool is dropped, not shut down: another thread may be about to submit to
            # it; its idle threads end once the last reference to it goes.
            _pool[:] = [ThreadPoolExecutor(max_workers=size, thread_name_prefix="remap"), size]
        return _pool[0]


def _forget_pool_after_fork() -> None:  # a forked child has the pool object but not its threads
    _pool.clear()


os.register_at_fork(after_in_child=_forget_pool_after_fork)

FUSED_MIN_ROWS_PER_THREAD = 128  # smaller chunks cost more in handing over than they save


@functools.lru_cache(maxsize=8)
def _repeating_weights(downsample: int) -> tuple[tuple, tuple]:
    """The weights every whole band of rows and every interior low column repeat: those of rows
    2 ds + ds // 2 + k and columns ds + k (k < ds), as tuples of float32 (see model/_remap_kernel)."""
    _, _, w = _weights(4 * downsample, 4, downsample)
    start = 2 * downsample + downsample // 2
    return (tuple(np.float32(v) for v in w[start:start + downsample]),
            tuple(np.float32(v) for v in w[downsample:2 * downsample]))


def _fused_remap(x4: torch.Tensor, low: np.ndarray, downsample: int, want_z: bool):
    h_full, w_full = x4.shape[-2:]
    x = x4[0, 0]
    if not x.is_contiguous():
        x = x.contiguous()
    xn = x.numpy()
    from model._remap_kernel import remap_rows

    left, right, cw = _weights(w_full, low.shape[2], downsample)
    top, bottom, rw = _weights(h_full, low.shape[1], downsample)
    band_w, phase_w = _repeating_weights(downsample)
    y = torch.empty_like(x4)
    z = torch.empty_like(x4) if want_z else y
    yn, zn = y[0, 0].numpy(), z[0, 0].numpy()
    chunks = max(1, min(torch.get_num_threads(), h_full // FUSED_MIN_ROWS_PER_THREAD))
    # chunks start where a band starts (row ds * j + ds // 2 is the first below low row j), so
    # that no band's columns are interpolated twice
    bounds = [0] + [min(h_full, round(i * h_full / chunks / downsample) * downsample + downsample // 2)
                    for i in range(1, chunks)] + [h_full]

    def run(i: int) -> None:
        remap_rows(xn, low, left, right, cw, top, bottom, rw, bounds[i], bounds[i + 1], yn, zn, band_w, phase_w)

    if chunks == 1:
        run(0)
    else:
        futures = [_thread_pool(chunks - 1).submit(run, i) for i in range(1, chunks)]
        run(0)
        for future in futures:
            future.result()
    if want_z:
        torch.sigmoid_(z)
    return y, z


def warm_up(downsample: int) -> None:
    """Compile (or load from numba's cache) the fused kernel for `downsample` now, on a tiny
    image, so that the first real image does not pay for it."""
    x = torch.rand(1, 1, 4 * downsample, 4 * downsample)
    low = torch.rand(1, 1, 4, 4)
    remap(x, low, low, low, low + 0.1, downsample=downsample)
    remap(x, low, low, low, low + 0.1, downsample=downsample, want_z=False)


# z leaves (0.02, 0.98) where |y - wc| > SATURATION_REACH * ww, i.e. 4 |y - wc| / ww > ln(49)
SATURATION_REACH = math.log(49) / 4


def window_guard(u: torch.Tensor, max_burnt_out: float, margin: float = 1.02) -> tuple[float, float]:
    """The least widening of a SIGMOID window that keeps at most `max_burnt_out` of the pixels out
    of saturation, as (shift, scale): wc' = wc + shift * ww, ww' = scale * ww.

    u: (y - wc) / ww of the pixels that matter (the anatomy), under the window as it is; a pixel
    is shown pure white or black where |u| > SATURATION_REACH. The window is scaled by the least
    factor >= 1 that fits the central 1 - max_burnt_out of u (with a 2 % margin), then shifted by
    the least amount that centres that range inside it. (0, 1) when nothing needs to change.
    """
    if not 0 < max_burnt_out < 1:
        raise ValueError(f"max_burnt_out must be within (0, 1), got {max_burnt_out!r}")
    u = u.flatten().float()
    if u.numel() == 0:
        return 0.0, 1.0
    if u.numel() > 400_000:
        u = u[:: u.numel() // 400_000 + 1]
    lo, hi = torch.quantile(u, torch.tensor([max_burnt_out / 2, 1 - max_burnt_out / 2], dtype=u.dtype)).tolist()
    reach = SATURATION_REACH / margin
    scale = max(1.0, (hi - lo) / (2 * reach))
    low_shift, high_shift = hi - reach * scale, lo + reach * scale  # shifts that keep [lo, hi] inside
    shift = min(max(0.0, low_shift), high_shift)
    return float(shift), float(scale)
