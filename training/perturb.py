"""Acquisition perturbations with exact ground truth (design.md).

    x' = alpha(p) * x + beta(p)
    a' = a / alpha,   b' = b - a * beta / alpha,   wc' = wc,  ww' = ww
so that a' x' + b' = a x + b exactly: every perturbed acquisition of one anatomy has the same
target presentation.

alpha = G * (1 + s_a(p)),  beta = O + s_b(p), where (ranges drawn uniformly per acquisition):
  G      global gain               0.75 – 1.25
  O      global offset             ±0.08
  s_a    smooth gain field         amplitude up to ±0.15 (heel effect, patient thickness)
  s_b    smooth offset field       amplitude up to ±0.05
The smooth fields are a random linear ramp plus a sum of two broad Gaussian bumps (widths
30–80 % of the image), normalised so max |s| equals the drawn amplitude.
If x' would leave [0, 1] (the stored range), alpha and beta are scaled by a common factor
and beta shifted so that it does not (the result is still of the form above, so the ground
truth stays exact; only the drawn gain/offset are moved toward the range).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAIN_RANGE = (0.75, 1.25)
OFFSET_RANGE = (-0.08, 0.08)
GAIN_FIELD_MAX = 0.15
OFFSET_FIELD_MAX = 0.05
MARGIN = 0.005  # x' stays within [MARGIN, 1 - MARGIN]


@dataclass
class Perturbation:
    alpha: np.ndarray  # (H, W) float32 > 0
    beta: np.ndarray  # (H, W) float32

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (self.alpha * x + self.beta).astype(np.float32)

    def correct(self, a, b):
        """Exact ground truth for the perturbed image: (a / alpha, b - a * beta / alpha)."""
        return (a / self.alpha).astype(np.float32), (b - a * self.beta / self.alpha).astype(np.float32)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Random smooth field with max |field| = amplitude (ramp + two broad Gaussian bumps)."""
    h, w = shape
    # evaluate on a coarse grid and upsample: the field is smooth, and full-size evaluation
    # of 4096² exponentials is slow
    ch, cw = min(h, 128), min(w, 128)
    v, u = np.meshgrid(np.linspace(-1, 1, ch), np.linspace(-1, 1, cw), indexing="ij")
    theta = rng.uniform(0, 2 * np.pi)
    field = np.cos(theta) * u + np.sin(theta) * v
    for _ in range(2):
        cu, cv = rng.uniform(-1, 1, size=2)
        width = rng.uniform(0.6, 1.6)
        field = field + rng.uniform(-1.5, 1.5) * np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / width**2)
    field = field - field.mean()
    field = field * (amplitude / max(np.abs(field).max(), 1e-9))
    from scipy.ndimage import zoom

    full = zoom(field, (h / ch, w / cw), order=1, mode="nearest", grid_mode=True)[:h, :w]
    return full.astype(np.float32)


def random_perturbation(x: np.ndarray, rng: np.random.Generator) -> Perturbation:
    """Draw alpha, beta for image x (see module docstring for the ranges)."""
    shape = x.shape
    gain = rng.uniform(*GAIN_RANGE)
    offset = rng.uniform(*OFFSET_RANGE)
    alpha = gain * (1.0 + smooth_field(shape, rng, rng.uniform(0, GAIN_FIELD_MAX)))
    beta = offset + smooth_field(shape, rng, rng.uniform(0, OFFSET_FIELD_MAX))
    xp = alpha * x + beta
    lo, hi = float(xp.min()), float(xp.max())
    room = 1.0 - 2 * MARGIN
    if hi - lo > room:  # too much range: shrink gain and offset together
        f = room / (hi - lo)
        alpha, beta, lo, hi = alpha * f, beta * f, lo * f, hi * f
    if lo < MARGIN:
        beta, hi, lo = beta + (MARGIN - lo), hi + (MARGIN - lo), MARGIN
    if hi > 1 - MARGIN:
        beta = beta - (hi - (1 - MARGIN))
    return Perturbation(alpha=alpha.astype(np.float32), beta=beta.astype(np.float32))
