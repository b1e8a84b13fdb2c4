"""House styles for `dicom-node synth --style`: the presentation a site's radiologists prefer, made
from the clean acquisition, so that training can be judged on a look it did not start from.

  teacher   the bundled model's own look (model.teacher with its defaults).
  soft      a soft, natural look: little detail gain and compression, a wide window.
  contrast  a high-contrast look: strong two-band detail gain, a narrow window, a tone curve.
  detail    multi-scale detail enhancement (three Gaussian bands, the finest of ~0.4 % of the
            image, finer than the model's /8 maps), a percentile window.
  vendor    a vendor-like processing: a box-filter equalisation and a film-like characteristic
            curve (toe and shoulder, not a sigmoid).

teacher, soft and contrast lie in the prior's family (model.teacher.prior_maps): they have
exact maps, and calibration alone can reach them. detail and vendor do not: their targets are
written as presentations only, as a site's archive has them, and the maps the trainer sees are
the archive reader's fit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.config import TeacherParams


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    params: TeacherParams | None = None  # in the prior's family: its exact maps exist
    render: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (x, anatomy mask) -> z

    @property
    def exact(self) -> bool:
        return self.params is not None

    def target(self, x: np.ndarray, mask: np.ndarray):
        """(maps, z): the teacher's maps (model.teacher.TeacherMaps) when the style has them, else
        None, and the presentation z in [0, 1] of the clean image x."""
        if self.params is not None:
            from model.teacher import teacher

            maps = teacher(x, mask, self.params)
            return maps, maps.remap(x)[1]
        return None, np.clip(self.render(np.asarray(x, np.float32), mask), 0.0, 1.0).astype(np.float32)


def masked_gaussian(x: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian convolution inside the mask (scipy's, not the model's low-pass)."""
    m = mask.astype(np.float64)
    num = ndimage.gaussian_filter(x * m, sigma, mode="nearest")
    den = ndimage.gaussian_filter(m, sigma, mode="nearest")
    return (num + 1e-3 * x[mask].mean()) / (den + 1e-3)


def _percentiles(y: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    values = y[mask] if mask.sum() >= 16 else y.ravel()
    return tuple(float(v) for v in np.percentile(values[:: max(1, values.size // 400_000)], [lo, hi]))


def detail_render(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Three detail bands with their own gains over a compressed base, then a sigmoid window."""
    side = min(x.shape)
    x64 = x.astype(np.float64)
    g1, g2, g3 = (masked_gaussian(x64, mask, f * side) for f in (0.004, 0.02, 0.08))
    mean = g3[mask].mean() if mask.any() else g3.mean()
    y = 2.4 * (x64 - g1) + 1.9 * (g1 - g2) + 1.3 * (g2 - g3) + 0.3 * (g3 - mean) + mean
    lo, hi = _percentiles(y, mask, 0.5, 99.5)
    wc, ww = (lo + hi) / 2, max((hi - lo) / 1.1, 1e-3)
    return 1.0 / (1.0 + np.exp(-4.0 * (y - wc) / ww))


def vendor_render(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A box-filter equalisation, then a film-like characteristic curve over the anatomy's range."""
    side = min(x.shape)
    x64 = x.astype(np.float64)
    size = max(3, int(0.12 * side) | 1)
    m = mask.astype(np.float64)
    L = (ndimage.uniform_filter(x64 * m, size, mode="nearest") + 1e-3 * x64[mask].mean()) / (
        ndimage.uniform_filter(m, size, mode="nearest") + 1e-3)
    mean = L[mask].mean() if mask.any() else L.mean()
    y = 1.4 * (x64 - L) + 0.45 * (L - mean) + mean
    lo, hi = _percentiles(y, mask, 1.0, 99.5)
    u = np.clip((y - lo) / max(hi - lo, 1e-3), 0.0, 1.2)
    # toe and shoulder of a film's density curve: slow start, long linear part, soft shoulder
    curve = (1 - np.exp(-2.5 * u ** 1.6)) / (1 - np.exp(-2.5))
    return 0.03 + 0.94 * np.clip(curve, 0.0, 1.05)


STYLES = {s.name: s for s in (
    Style("teacher", "the bundled model's own look", TeacherParams()),
    Style("soft", "soft and natural: little detail gain and compression, a wide window",
          TeacherParams(gain=1.15, mid_gain=1.15, compression=0.35, p_lo=0.5, p_hi=99.5, ww_squeeze=0.75)),
    Style("contrast", "high contrast: strong two-band detail gain, a narrow window, a tone curve",
          TeacherParams(gain=2.0, mid_gain=2.6, compression=0.8, sigma=0.04, p_lo=2.0, p_hi=98.0,
                        ww_squeeze=1.7, gamma=1.25)),
    Style("detail", "multi-scale detail enhancement in three bands, finer than the model's maps",
          render=detail_render),
    Style("vendor", "a vendor-like box-filter equalisation and a film-like characteristic curve",
          render=vendor_render),
)}
