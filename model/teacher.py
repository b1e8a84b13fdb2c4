"""The reference teacher: deterministic classical tissue equalisation (design.md).

    L = large-kernel low-pass of x *inside the anatomy* (normalised convolution with the mask)
    y = g * (x - L) + L - k * (L - mean_anatomy(L))
      i.e.  a = g,  b = (1 - g) * L - k * (L - mean_anatomy(L))
    window from robust percentiles of y inside the anatomy:
      wc = (P_lo + P_hi) / 2,  ww = (P_hi - P_lo) / WW_SQUEEZE

The family a site's archive is calibrated in (prior_maps; training/calibrate.py) adds a second
detail band and a tone curve, both off at the defaults:
    y = g (x - Lf) + gm (Lf - L) + (1 - k)(L - mean(L)) + mean(L)     Lf: a finer low-pass
    y -> T(Y) + T'(Y) (y - Y),  T(u) = u^gamma,  Y = (1 - k)(L - mean(L)) + mean(L)
the tone curve taken at the smooth level Y, so that a stays a per-pixel slope >= 0 and b an
offset: the formula (model.remap) does not change.

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
  mid_gain [1.5]         gm, the gain of the band Lf - L (= gain: a single detail band).
  fine_sigma [0.015]     sigma of Lf, as sigma.
  gamma [1.0]            the tone curve's exponent (1: none).
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
from model.config import TeacherParams  # noqa: F401  (its home is torch-free; re-exported here)
from model.remap import downsample_image, percentile_window, regional_lut, remap, upsample_maps


LOWPASS_EPS = 1e-3  # where the anatomy weight vanishes, L leans to the anatomy's mean


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


def prior_maps(x: torch.Tensor, body: torch.Tensor, params: TeacherParams, corrections: torch.Tensor | None = None,
               bounds: dict | None = None, spread: torch.Tensor | None = None, window_factor: int = 1) -> torch.Tensor:
    """The classical prior's maps (N, 4, h, w) of images x (N, 1, h, w) with anatomy weights body
    (N, 1, h, w): the module docstring's family with these parameters, optionally moved by
    bounded corrections (N, 5, h, w) in [-1, 1] (gain, level, centre, width, compression; the
    network's, model.net), each scaled by `bounds` and the level's by the body's spread (N,).
    The one home of the teacher's arithmetic: the teacher, the network's prior and calibration
    all call it."""
    n, _, h, w = x.shape
    c = corrections if corrections is not None else x.new_zeros(n, 5, h, w)
    gain, level_shift, centre, width, compression = c.unbind(dim=1)
    bounds = bounds or {}
    L = masked_lowpass(x, body, params.sigma, params.work_size)[:, 0]
    inside = body[:, 0] > 0.5
    mean_L = masked_mean(L, inside.to(x.dtype))
    a = params.gain * torch.exp(bounds.get("a", 0.0) * gain)
    kappa = (1 - params.compression) * torch.exp(bounds.get("kappa", 0.0) * compression)
    level = mean_L
    if spread is not None:
        level = level + bounds.get("level", 0.0) * spread[:, None, None] * level_shift
    smooth = kappa * (L - mean_L) + level  # the low-pass part of y
    b = smooth - a * L  # y = a (x - L) + smooth
    if params.mid_gain != params.gain:  # y = a (x - Lf) + gm (Lf - L) + smooth
        Lf = masked_lowpass(x, body, params.fine_sigma, params.work_size)[:, 0]
        b = b + (params.mid_gain - a) * (Lf - L)
    if params.gamma != 1.0:  # the tone curve, linearised at the smooth level (module docstring)
        level_at = smooth.clamp(0.02, 1.0)
        slope = params.gamma * level_at ** (params.gamma - 1)
        a, b = slope * a, level_at ** params.gamma + slope * (b - level_at)
    a = a.expand_as(L)
    y = torch.clamp(a * x[:, 0] + b, 0.0, 1.0)
    windows = [torch.stack(anatomy_window(y[i], inside[i], params, window_factor)) for i in range(n)]
    wc_p, ww_p = torch.stack(windows)[:, :, None, None].unbind(dim=1)
    wc = torch.clamp(wc_p + bounds.get("wc", 0.0) * ww_p * centre, 0.0, 1.0)
    ww = torch.clamp(ww_p * torch.exp(bounds.get("ww", 0.0) * width), min=params.min_ww)
    return torch.stack([a, b, wc.expand_as(L), ww.expand_as(L)], dim=1)


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image weighted mean of (N, h, w) values: (N, 1, 1)."""
    return ((values * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1e-6))[:, None, None]


def teacher(x: np.ndarray, mask: np.ndarray, params: TeacherParams = TeacherParams()) -> TeacherMaps:
    """Full-resolution a, b and the global window (wc, ww) for image x with anatomy `mask`: the
    prior's maps of the image at 1/window_downsample (as the network's prior computes them from
    its /8 input) brought to full resolution, and the window of the full-resolution y."""
    x = np.asarray(x, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        mask = np.ones_like(mask)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    mt = torch.from_numpy(np.ascontiguousarray(mask))
    factor = params.window_downsample
    low = prior_maps(downsample_image(xt, factor), downsample_image(mt.float(), factor), params)
    a, b = upsample_maps(low[:, :2], tuple(x.shape), factor)[0]
    y = regional_lut(xt, a, b)  # the one formula
    wc, ww = anatomy_window(y, mt, params, params.window_downsample)
    return TeacherMaps(a=a.contiguous().numpy(), b=b.contiguous().numpy(), wc=float(wc), ww=float(ww))


def teacher_on_input(x: np.ndarray, params: TeacherParams = TeacherParams()) -> TeacherMaps:
    """The teacher as a classical pipeline runs it: on the image alone, with the anatomy mask it
    finds itself."""
    return teacher(x, find_anatomy_mask(x), params)
