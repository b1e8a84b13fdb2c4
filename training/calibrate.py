"""Calibrate the classical prior to an archive: the few global numbers of model.teacher's family
(detail gains, compression, low-pass size, window percentiles and squeeze, tone curve) that make
it closest to the archive's targets, before any network step.

Least squares on what is displayed: the mean squared error of z at pixels scattered over every
calibration image, each z computed exactly as the untrained model computes it (the prior's maps
of the /downsample input, model.teacher.prior_maps, sampled bilinearly at full-resolution pixels
and put through the one remap). Nelder–Mead (scipy) over an unconstrained encoding of the
parameters, restarted once from its best point: the objective is cheap (one low-pass per image
per evaluation at 1/8) but not smooth in the percentiles, so a derivative-free search suits it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from model.config import TeacherParams
from model.net import body_masks
from model.remap import remap, sample_bilinear
from model.teacher import prior_maps

# The parameters fitted, with their encoding: (name, to the search space, back, lowest, highest).
SEARCHED = (
    ("gain", math.log, math.exp, 0.2, 6.0),
    ("mid_gain", math.log, math.exp, 0.2, 6.0),
    ("compression", lambda v: v, lambda u: u, -0.5, 0.99),
    ("sigma", math.log, math.exp, 0.01, 0.25),
    ("p_lo", lambda v: v, lambda u: u, 0.0, 20.0),
    ("p_hi", lambda v: v, lambda u: u, 80.0, 100.0),
    ("ww_squeeze", math.log, math.exp, 0.4, 4.0),
    ("gamma", math.log, math.exp, 0.33, 3.0),
)
# The search's first simplex: a step of this size along each encoded parameter.
STEPS = {"gain": 0.3, "mid_gain": 0.3, "compression": 0.15, "sigma": 0.4, "p_lo": 2.0, "p_hi": 2.0,
         "ww_squeeze": 0.25, "gamma": 0.25}


@dataclass
class CalibrationImage:
    """One image as calibration sees it: the /downsample input and its body mask (the model's),
    and the target z at scattered full-resolution pixels."""

    x_low: torch.Tensor  # (1, 1, h, w)
    body: torch.Tensor  # (1, 1, h, w)
    rows: torch.Tensor  # (P,)
    cols: torch.Tensor
    x: torch.Tensor  # (P,) the input at those pixels
    z: torch.Tensor  # (P,) the target there


@dataclass
class Calibration:
    params: TeacherParams
    start_mse: float
    mse: float
    evaluations: int
    seconds: float
    images: int

    def describe(self) -> str:
        p = self.params
        return (f"calibrated prior on {self.images} images in {self.seconds:.0f}s ({self.evaluations} evaluations): "
                f"PSNR {psnr_of(self.start_mse):.2f} -> {psnr_of(self.mse):.2f} dB; gain {p.gain:.3g}, "
                f"mid_gain {p.mid_gain:.3g}, compression {p.compression:.3g}, sigma {p.sigma:.3g}, "
                f"percentiles {p.p_lo:.3g}/{p.p_hi:.3g}, ww_squeeze {p.ww_squeeze:.3g}, gamma {p.gamma:.3g}")


def psnr_of(mse: float) -> float:
    return -10 * math.log10(max(mse, 1e-12))


def calibration_images(items, downsample: int, images: int = 32, points: int = 20000,
                       seed: int = 0) -> list[CalibrationImage]:
    """Up to `images` archive rows spread over the list (one of each group first), each with
    `points` pixels drawn uniformly."""
    rng = np.random.default_rng([seed, 7])
    by_group: dict[str, list] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    chosen, rank = [], 0
    while len(chosen) < images and any(len(g) > rank for g in by_group.values()):
        chosen += [g[rank] for g in by_group.values() if len(g) > rank][: images - len(chosen)]
        rank += 1
    out = []
    for item in chosen:
        x_low = torch.from_numpy(np.asarray(item.low()[0], dtype=np.float32))[None, None]
        x_full, z_full = np.asarray(item.x), np.asarray(item.z)
        h, w = x_full.shape
        flat = np.sort(rng.choice(h * w, size=min(points, h * w), replace=False))
        r, c = np.divmod(flat, w)
        out.append(CalibrationImage(x_low, body_masks(x_low, downsample), torch.from_numpy(r.astype(np.float32)),
                                    torch.from_numpy(c.astype(np.float32)),
                                    torch.from_numpy(x_full.reshape(-1)[flat].astype(np.float32)),
                                    torch.from_numpy(z_full.reshape(-1)[flat].astype(np.float32))))
    return out


def prior_mse(params: TeacherParams, data: list[CalibrationImage], downsample: int) -> float:
    """Mean over the images of the MSE of the prior's z against the target at their pixels."""
    factor = max(1, params.window_downsample // downsample)
    errors = []
    with torch.no_grad():
        for image in data:
            maps = prior_maps(image.x_low, image.body, params, window_factor=factor)
            at = sample_bilinear(maps, image.rows, image.cols, downsample)[0]
            z = remap(image.x, *at.unbind(0)).z
            errors.append(float(((z - image.z) ** 2).mean()))
    return float(np.mean(errors))


def encode(params: TeacherParams) -> np.ndarray:
    return np.array([to(min(max(getattr(params, name), lo), hi)) for name, to, _, lo, hi in SEARCHED])


def decode(u: np.ndarray, base: TeacherParams) -> TeacherParams:
    values = {name: float(min(max(back(v), lo), hi)) for (name, _, back, lo, hi), v in zip(SEARCHED, u)}
    return replace(base, **values)


def calibrate(items, downsample: int, start: TeacherParams = TeacherParams(), images: int = 32,
              max_evaluations: int = 700, seed: int = 0, log=None) -> Calibration:
    """The prior's parameters fitted to the rows `items` (training.archive.ArchiveItem), from
    `start`; never worse than the start on the calibration images."""
    from scipy.optimize import minimize

    t0 = time.time()
    data = calibration_images(items, downsample, images, seed=seed)
    cache: dict[tuple, float] = {}

    def objective(u: np.ndarray) -> float:
        key = tuple(np.round(u, 6))
        if key not in cache:
            cache[key] = prior_mse(decode(u, start), data, downsample)
        return cache[key]

    u = encode(start)
    start_mse = objective(u)
    best_u, best = u, start_mse
    budget = max_evaluations
    for attempt in range(2):  # a restart re-opens a simplex collapsed on a percentile's plateau
        simplex = np.array([best_u] + [best_u + np.eye(len(u))[i] * STEPS[name] for i, (name, *_) in enumerate(SEARCHED)])
        result = minimize(objective, best_u, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "maxfev": budget // 2, "xatol": 1e-3, "fatol": 1e-7,
                                   "adaptive": True})
        if result.fun < best:
            best_u, best = result.x, float(result.fun)
        if log:
            log(f"calibration pass {attempt + 1}: PSNR {psnr_of(best):.2f} dB after {len(cache)} evaluations")
    return Calibration(decode(best_u, start), start_mse, best, len(cache), time.time() - t0, len(data))
