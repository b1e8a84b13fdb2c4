"""The reference teacher: deterministic classical tissue equalisation (design.md).

    L = large-kernel low-pass of x *inside the anatomy* (normalised convolution with the mask)
    y = g * (x - L) + L - k * (L - mean_anatomy(L))
      i.e.  a = g,  b = (1 - g) * L - k * (L - mean_anatomy(L))
    window from robust percentiles of y inside the anatomy:
      wc = (P_lo + P_hi) / 2,  ww = (P_hi - P_lo) / WW_SQUEEZE

Parameters (TeacherParams, defaults in brackets):
  gain g [1.5]           detail (high-pass) gain: > 1 sharpens tissue detail.
  compression k [0.9]    dynamic-range compression of the low-pass: 0 keeps it, 1 flattens it.
                         0.9 (was 0.6): on the real radiographs a smooth gain/offset change of the
                         acquisition moves the output far less (consistency RG3 0.55 -> 0.28,
                         RG1 0.23 -> 0.15), with more local contrast and nothing burnt out
                         (docs/training.md).
  sigma [0.06]           Gaussian sigma of L as a fraction of the image's shorter side
                         (≈ 120 px on a 2000 px image: the "large kernel").
  p_lo, p_hi [1, 99]     percentiles of y inside the anatomy that set the window.
  ww_squeeze [1.2]       ww = (P_hi - P_lo) / ww_squeeze: the percentile ends land at z ≈ 0.91 / 0.09.
  work_size [256]        L is computed on a copy area-downsampled so its longer side is about
                         this many pixels, then upsampled bilinearly (the kernel is large, so
                         this changes L by far less than the 16-bit output step).
  window_downsample [8]  L and the window are computed from the image area-downsampled by this
                         factor: the window is judged at the scale of anatomy, not of pixel
                         noise, and the network's prior, which sees the /8 image, computes the
                         same L and window as the teacher on the full image.

The anatomy mask excludes collimation and direct-exposure air; `model.anatomy.find_anatomy_mask`
estimates it classically (synth uses it for phantoms too, so that a target is what this
pipeline makes of the clean image).
The teacher lives in model/ because the network is built on it: the "prior" parameterisation
(model/net.py) predicts bounded corrections to these maps, computed on its own input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.anatomy import find_anatomy_mask
from model.remap import downsample_image, percentile_window, regional_lut, remap, upsample_maps


LOWPASS_EPS = 1e-3  # where the anatomy weight vanishes, L leans to the anatomy's mean


@dataclass(frozen=True)
class TeacherParams:
    gain: float = 1.5
    compression: float = 0.9
    sigma: float = 0.06
    p_lo: float = 1.0
    p_hi: float = 99.0
    ww_squeeze: float = 1.2
    work_size: int = 256
    min_ww: float = 0.02
    window_downsample: int = 8


@dataclass
class TeacherMaps:
    a: np.ndarray  # (H, W) float32, >= 0
    b: np.ndarray  # (H, W) float32
    wc: float
    ww: float

    def remap(self, x: np.ndarray):
        """(y, z) of x under these maps, through the shared formula."""
        r = remap(torch.from_numpy(x), torch.from_numpy(self.a), torch.from_numpy(self.b), self.wc, self.ww)
        return r.y.numpy(), r.z.numpy()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, h, w), edges replicated, kernel truncated at 4 sigma."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[1]
    out = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def masked_lowpass(x: torch.Tensor, weight: torch.Tensor, sigma_frac: float, work_size: int = 256) -> torch.Tensor:
    """Normalised convolution L = G*(x m) / G*(m) of (N, 1, H, W) images with anatomy weights m,
    Gaussian sigma = sigma_frac x the shorter side, computed on copies area-downsampled so their
    longer side is about work_size px and brought back bilinearly (the kernel is large).

    Outside the anatomy L extends smoothly from the nearest anatomy, and far from it tends to
    the anatomy's mean. The teacher calls it on the full-resolution image, the network's prior on
    its /8 input: a 2000-4000 px radiograph gives both the same ~250 px working copy."""
    h, w = x.shape[-2:]
    factor = max(1, int(np.ceil(max(h, w) / work_size)))
    xs, ws = downsample_image(x * weight, factor), downsample_image(weight, factor)
    sigma = max(sigma_frac * min(h, w) / factor, 0.5)
    num, den = gaussian_blur(torch.cat([xs, ws], dim=1), sigma).split(1, dim=1)
    fallback = xs.sum(dim=(2, 3), keepdim=True) / ws.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    low = (num + LOWPASS_EPS * fallback) / (den + LOWPASS_EPS)
    return upsample_maps(low, (h, w), factor)


def anatomy_window(y: torch.Tensor, inside: torch.Tensor, params: TeacherParams, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's window for one image (model.remap.percentile_window with its parameters):
    percentiles of y (h, w) over the interior (one pixel in from the rim) of where inside (h, w)
    holds, both area-downsampled by `factor` first (a window is judged at the scale of anatomy, so
    pixel noise must not widen it)."""
    if factor > 1:
        y = downsample_image(y, factor)[0, 0]
        inside = downsample_image(inside.to(y.dtype), factor)[0, 0] > 0.5
    # the anatomy's interior: at its rim a pixel may hold a little of the collimation or air beside
    # it, and the extreme percentiles are made of exactly such pixels
    interior = -F.max_pool2d(-inside.to(y.dtype)[None, None], 3, stride=1, padding=1)[0, 0] > 0.5
    inside = interior if int(interior.sum()) >= 16 else inside.bool()
    values = y[inside] if inside.any() else y.flatten()
    if values.numel() < 16:
        values = y.flatten()
    if values.numel() > 400_000:
        values = values[:: values.numel() // 400_000 + 1]
    return percentile_window(values, params.p_lo, params.p_hi, params.ww_squeeze, params.min_ww)


def teacher(x: np.ndarray, mask: np.ndarray, params: TeacherParams = TeacherParams()) -> TeacherMaps:
    """Full-resolution a, b and the global window (wc, ww) for image x with anatomy `mask`."""
    x = np.asarray(x, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        mask = np.ones_like(mask)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    mt = torch.from_numpy(np.ascontiguousarray(mask))
    # L from the image at 1/8, as the network's prior computes it from its /8 input
    factor = params.window_downsample
    low = masked_lowpass(downsample_image(xt, factor), downsample_image(mt.float(), factor), params.sigma, params.work_size)
    L = upsample_maps(low, tuple(x.shape), factor)[0, 0]
    mean_L = L[mt].mean()
    g, k = params.gain, params.compression
    a = torch.full_like(xt, g)
    b = (1.0 - g) * L - k * (L - mean_L)
    y = regional_lut(xt, a, b)  # the one formula
    wc, ww = anatomy_window(y, mt, params, params.window_downsample)
    return TeacherMaps(a=a.numpy(), b=b.numpy(), wc=float(wc), ww=float(ww))


def teacher_on_input(x: np.ndarray, params: TeacherParams = TeacherParams()) -> TeacherMaps:
    """The teacher as a classical pipeline runs it: on the image alone, with the anatomy mask it
    finds itself."""
    return teacher(x, find_anatomy_mask(x), params)
