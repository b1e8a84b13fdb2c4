"""The remap: the one implementation of the formula every part of the project agrees on.

design.md, "The remap":
  regional LUT  y = clip(a * x + b, 0, 1)               (a >= 0: monotonic in x)
  global LUT    z = 1 / (1 + exp(-4 * (y - wc) / ww))   (DICOM SIGMOID VOI LUT, PS3.3 C.11.2.1.3.1)
  display       65535 * z
All maths in float32 on the normalised image x in [0, 1]. Training, inference, the writer and
the tests call these functions; nothing else re-implements them.
"""
from __future__ import annotations

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
    `upsample_maps`). Returns (y, z) shaped like x; z is None-free but skipped (y returned twice)
    when want_z is False, which the `voi` writer uses since it stores y and a window.
    """
    squeeze = x.dim() == 2
    x4 = _as_4d(x).float()
    size = tuple(x4.shape[-2:])

    def full(m: MapLike) -> MapLike:
        if isinstance(m, torch.Tensor) and m.dim() >= 2 and tuple(m.shape[-2:]) != size and m.numel() > 1:
            return upsample_maps(_as_4d(m).float(), size, downsample)
        return m

    y = regional_lut(x4, full(a), full(b))
    z = sigmoid_window(y, full(wc), full(ww)) if want_z else y
    if squeeze:
        return Remapped(y[0, 0], z[0, 0])
    return Remapped(y, z)
