"""The remap: the one implementation of the formula every part of the project agrees on.

design.md, "The remap":
  regional LUT  y = clip(a * x + b, 0, 1)               (a >= 0: monotonic in x)
  global LUT    z = 1 / (1 + exp(-4 * (y - wc) / ww))   (DICOM SIGMOID VOI LUT, PS3.3 C.11.2.1.3.1)
  display       65535 * z
All maths in float32 on the normalised image x in [0, 1]. Training, inference, the writer and
the tests call these functions; nothing else re-implements them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

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
    if downsample is not None and not needs_grad and x4.shape[0] == 1 and any(m is not None for m in maps):
        y, z = _remap_in_bands(x4, (a, b, wc, ww), maps, downsample, want_z)
    else:
        full = [upsample_maps(m, size, downsample) if m is not None else v for m, v in zip(maps, (a, b, wc, ww))]
        y = regional_lut(x4, full[0], full[1])
        z = sigmoid_window(y, full[2], full[3]) if want_z else y
    if squeeze:
        return Remapped(y[0, 0], z[0, 0])
    return Remapped(y, z)


BAND_ROWS = 64  # rows per band: the band's upsampled maps stay in cache (measured: 64-128 best)


def _remap_in_bands(x4, values, maps, downsample: int, want_z: bool):
    """Inference path of `remap`: the same bilinear upsampling and formula, band by band.

    Upsampling whole maps to full resolution writes and re-reads several image-sized buffers;
    doing it separably (columns once at low-res height, rows per band) keeps each band in cache
    and runs several times faster. tests/test_remap.py checks it against the plain path.
    """
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
