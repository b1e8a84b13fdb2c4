"""The reference teacher: deterministic classical tissue equalisation (design.md).

    L = large-kernel low-pass of x *inside the anatomy* (normalised convolution with the mask)
    y = g * (x - L) + L - k * (L - mean_anatomy(L))
      i.e.  a = g,  b = (1 - g) * L - k * (L - mean_anatomy(L))
    window from robust percentiles of y inside the anatomy:
      wc = (P_lo + P_hi) / 2,  ww = (P_hi - P_lo) / WW_SQUEEZE

Parameters (TeacherParams, defaults in brackets):
  gain g [1.5]           detail (high-pass) gain: > 1 sharpens tissue detail.
  compression k [0.6]    dynamic-range compression of the low-pass: 0 keeps it, 1 flattens it.
  sigma [0.06]           Gaussian sigma of L as a fraction of the image's shorter side
                         (≈ 120 px on a 2000 px image: the "large kernel").
  p_lo, p_hi [1, 99]     percentiles of y inside the anatomy that set the window.
  ww_squeeze [1.2]       ww = (P_hi - P_lo) / ww_squeeze: the percentile ends land at z ≈ 0.91 / 0.09.
  work_size [256]        L is computed on a copy area-downsampled so its longer side is about
                         this many pixels, then upsampled bilinearly (the kernel is large, so
                         this changes L by far less than the 16-bit output step).

The anatomy mask excludes collimation and direct-exposure air. Synthetic phantoms know theirs
exactly; for any other image `find_anatomy_mask` estimates it classically (reference B).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from model.remap import downsample_image, regional_lut, remap, upsample_maps


@dataclass(frozen=True)
class TeacherParams:
    gain: float = 1.5
    compression: float = 0.6
    sigma: float = 0.06
    p_lo: float = 1.0
    p_hi: float = 99.0
    ww_squeeze: float = 1.2
    work_size: int = 256
    min_ww: float = 0.02


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


def work_factor(shape: tuple[int, int], work_size: int) -> int:
    return max(1, int(np.ceil(max(shape) / work_size)))


def masked_lowpass(x: np.ndarray, mask: np.ndarray, sigma_frac: float, work_size: int = 256) -> np.ndarray:
    """Normalised convolution: G*(x m) / G*(m), computed at low resolution, back at full size.

    Outside the mask L extends smoothly from the nearest anatomy; with an empty mask it is the
    plain low-pass of x.
    """
    f = work_factor(x.shape, work_size)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    mt = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    xs = downsample_image(xt * mt, f)[0, 0].numpy().astype(np.float64)
    ms = downsample_image(mt, f)[0, 0].numpy().astype(np.float64)
    if ms.sum() < 1e-6:
        xs, ms = downsample_image(xt, f)[0, 0].numpy().astype(np.float64), np.ones_like(ms)
    sigma = sigma_frac * min(x.shape) / f
    num = ndimage.gaussian_filter(xs, sigma, mode="nearest")
    den = ndimage.gaussian_filter(ms, sigma, mode="nearest")
    fallback = float((xs * ms).sum() / ms.sum())
    eps = 1e-3
    low = ((num + eps * fallback) / (den + eps)).astype(np.float32)
    return upsample_maps(torch.from_numpy(low)[None, None], x.shape, f)[0, 0].numpy()


def teacher(x: np.ndarray, mask: np.ndarray, params: TeacherParams = TeacherParams()) -> TeacherMaps:
    """Full-resolution a, b and the global window (wc, ww) for image x with anatomy `mask`."""
    x = np.asarray(x, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        mask = np.ones_like(mask)
    L = masked_lowpass(x, mask, params.sigma, params.work_size)
    mean_L = float(L[mask].mean())
    g, k = params.gain, params.compression
    a = np.full(x.shape, g, dtype=np.float32)
    b = ((1.0 - g) * L - k * (L - mean_L)).astype(np.float32)
    y = regional_lut(torch.from_numpy(x), torch.from_numpy(a), torch.from_numpy(b)).numpy()  # the one formula
    sample = y[mask]
    if sample.size > 400_000:
        sample = sample[:: sample.size // 400_000 + 1]
    lo, hi = np.percentile(sample, [params.p_lo, params.p_hi])
    wc = float(np.clip((lo + hi) / 2, 0.0, 1.0))
    ww = float(np.clip((hi - lo) / params.ww_squeeze, params.min_ww, 1.0))
    return TeacherMaps(a=a, b=b, wc=wc, ww=ww)


def find_anatomy_mask(x: np.ndarray) -> np.ndarray:
    """Classical anatomy mask for an image with no annotation (what reference B must use).

    Three-class Otsu on a downsampled copy: the darkest class is direct-exposure air, the
    brightest class, where it is flat (no structure) and touches the image border, is
    collimation (bone and markers inside the field are kept); dark regions enclosed by the body (lungs, bowel gas) are filled back in,
    since they are anatomy and not direct exposure. Returns a full-size bool mask.
    """
    from skimage.filters import threshold_multiotsu

    f = work_factor(x.shape, 512)
    small = downsample_image(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), f)[0, 0].numpy()
    small = ndimage.median_filter(small, 3)
    try:
        t_air, t_col = threshold_multiotsu(small, classes=3)
    except ValueError:  # a flat image
        return np.ones(x.shape, dtype=bool)
    mean = ndimage.uniform_filter(small.astype(np.float64), 5)
    local_std = np.sqrt(np.maximum(ndimage.uniform_filter(small.astype(np.float64) ** 2, 5) - mean**2, 0))
    bright_flat = (small > t_col) & (local_std < 0.01)  # a collimated plateau has no structure
    labels, n = ndimage.label(bright_flat)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    collimation = ndimage.binary_dilation(np.isin(labels, border[border > 0]), iterations=2)
    mask = (small > t_air) & ~collimation
    mask = ndimage.binary_opening(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    if mask.sum() < 0.05 * mask.size:
        mask = ~collimation if (~collimation).sum() > 0.05 * mask.size else np.ones_like(mask)
    full = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[: x.shape[0], : x.shape[1]]
    return np.ascontiguousarray(full)
