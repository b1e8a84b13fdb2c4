"""Beer–Lambert phantom radiographs with a known anatomy mask.

A phantom is a sum of attenuation line integrals P(u, v) of simple solids (ellipsoids give
path ∝ sqrt(1 - r²), cylinders the same across their axis, hollow bones the difference of two):
soft-tissue body, bones (cortical shell), lungs (negative: air replaces tissue), a heart.
The detector sees  I = I0 * heel(u) * exp(-P)  with quantum (Poisson, as Gaussian) noise of
N0 photons per pixel at I0, and the "for presentation" image is the log signal

    x = x_air + s * (-log(I / I0))      (higher = more attenuation = brighter, as MONOCHROME2)

Outside the collimator only scatter arrives: x ≈ x_col (a bright flat plateau), reached
through a blurred blade edge (the penumbra). A lead marker (letter-shaped block) saturates
near the top. Anatomies: chest, limb, hand, pelvis; the anatomy mask is body ∩ field minus the
marker (direct-exposure air and collimation excluded).

Real radiographs are not smooth solids: every tissue carries structure (vessels, trabecular
bone, overlapping soft tissue) at every scale, and lungs most. Each phantom's path length gets
band-limited random structure (Gaussian-filtered noise at 1-2 % and 4-8 % of the image),
stronger inside the lungs, so that a texture measure tells anatomy from direct exposure and
collimation as it does on a real image.

Parameter ranges (drawn per phantom from the seed), set from the real CR radiographs of
pydicom-data (air 0.03-0.3, the densest anatomy near the top of the range, collimation a
near-white plateau):
  x_air 0.03–0.25, scale s so the thickest path lands at 0.6–0.92, x_col 0.85–1.0, penumbra
  0.3–1.5 % of the shorter side, x clipped to [0, 1], structure 4–10 % of the body's mean path
  (lungs 2.5x), heel effect: I0 varies linearly by ±5–15 % along a random axis, N0 2e3–2e4 photons,
  collimation margins 2–12 % per side, random rotation ±15°, size scale 0.8–1.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ANATOMIES = ("chest", "limb", "hand", "pelvis")

# (rows range, cols range) for synth's defaults: 1000–4096 px
SIZES = {
    "chest": ((2000, 3000), (2000, 3000)),
    "limb": ((2400, 4096), (1000, 1800)),
    "hand": ((1000, 2000), (1000, 1600)),
    "pelvis": ((1800, 2600), (2200, 3000)),
}


@dataclass
class Phantom:
    x: np.ndarray  # (H, W) float32 in [0, 1], display convention (higher = brighter)
    mask: np.ndarray  # (H, W) bool: anatomy (no air, no collimation, no marker)
    anatomy: str


def _ellipsoid(u, v, cu, cv, ru, rv, angle=0.0):
    """Normalised path length through an ellipsoid: sqrt(1 - r²) inside, 0 outside."""
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    pu, pv = (c * du + s * dv) / ru, (-s * du + c * dv) / rv
    r2 = pu * pu + pv * pv
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _cylinder(u, v, p0, p1, radius):
    """Path through a cylinder (capsule) with axis p0→p1, normalised to 1 on the axis."""
    (u0, v0), (u1, v1) = p0, p1
    du, dv = u1 - u0, v1 - v0
    length2 = du * du + dv * dv
    t = np.clip(((u - u0) * du + (v - v0) * dv) / length2, 0.0, 1.0)
    d2 = (u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2
    return np.sqrt(np.clip(1.0 - d2 / radius**2, 0.0, None))


def _bone(u, v, p0, p1, radius, wall=0.35):
    """Hollow long bone: cortical shell dense, marrow less so."""
    outer = _cylinder(u, v, p0, p1, radius)
    inner = _cylinder(u, v, p0, p1, radius * (1 - wall))
    return radius * (outer - 0.6 * (1 - wall) * inner)


def _chest(u, v, rng):
    body = 0.9 * _ellipsoid(u, v, 0, 0.05, 0.85, 0.95)
    lungs = sum(0.55 * _ellipsoid(u, v, side * rng.uniform(0.33, 0.40), -0.05, 0.27, 0.6, side * 0.1) for side in (-1, 1))
    heart = 0.35 * _ellipsoid(u, v, 0.1, 0.25, 0.28, 0.3)
    spine = 0.4 * _cylinder(u, v, (0, -1.0), (0, 1.0), 0.09)
    ribs = 0.0
    for i in range(8):
        vv = -0.6 + 0.14 * i
        for side in (-1, 1):
            ribs = ribs + _bone(u, v, (side * 0.05, vv), (side * 0.7, vv + 0.12), 0.035)
    clav = sum(_bone(u, v, (side * 0.05, -0.68), (side * 0.5, -0.75), 0.03) for side in (-1, 1))
    soft = np.maximum(body - lungs, 0.05 * body) + heart
    bone = (spine + 2.0 * ribs + 2.0 * clav) * (body > 0)
    return soft, bone, body > 0


def _limb(u, v, rng):
    body = 0.6 * _cylinder(u, v, (0, -1.1), (0, 1.1), rng.uniform(0.55, 0.75))
    bones = _bone(u, v, (rng.uniform(-0.1, 0.1), -1.1), (0, -0.05), 0.22)
    bones = bones + _bone(u, v, (0, 0.05), (rng.uniform(-0.1, 0.1), 1.1), 0.2)
    bones = bones + _bone(u, v, (0.28, 0.08), (0.3, 1.1), 0.1)
    return body, 3.0 * bones, body > 0


def _hand(u, v, rng):
    palm = 0.35 * _ellipsoid(u, v, 0, 0.35, 0.45, 0.4)
    wrist = 0.4 * _cylinder(u, v, (0, 0.6), (0, 1.1), 0.35)
    soft, bone = palm + wrist, 0.0
    spread = rng.uniform(0.12, 0.22)
    for i in range(5):
        ang = (i - 2) * spread + (0.5 if i == 0 else 0.0)
        base = (-0.32 + 0.16 * i, 0.1 if i else 0.35)
        tip = (base[0] + 0.8 * np.sin(ang), base[1] - (0.8 if i else 0.55) * np.cos(ang))
        soft = soft + 0.25 * _cylinder(u, v, base, tip, 0.075)
        for j in range(3):
            t0, t1 = j / 3 + 0.02, (j + 1) / 3 - 0.02
            p0 = (base[0] + t0 * (tip[0] - base[0]), base[1] + t0 * (tip[1] - base[1]))
            p1 = (base[0] + t1 * (tip[0] - base[0]), base[1] + t1 * (tip[1] - base[1]))
            bone = bone + _bone(u, v, p0, p1, 0.04)
        bone = bone + _bone(u, v, (base[0], base[1] + 0.45), (base[0], base[1] + 0.05), 0.045)
    return soft, 5.0 * bone, soft > 0


def _pelvis(u, v, rng):
    body = 1.0 * _ellipsoid(u, v, 0, 0, 0.95, 0.9)
    wings = sum(_ellipsoid(u, v, s * 0.45, -0.3, 0.35, 0.3) - 0.8 * _ellipsoid(u, v, s * 0.45, -0.28, 0.27, 0.22) for s in (-1, 1))
    heads = sum(_ellipsoid(u, v, s * 0.5, 0.3, 0.13, 0.13) for s in (-1, 1))
    femurs = sum(_bone(u, v, (s * 0.52, 0.35), (s * 0.62, 1.1), 0.11) for s in (-1, 1))
    sacrum = _ellipsoid(u, v, 0, -0.25, 0.16, 0.3)
    spine = 0.5 * _cylinder(u, v, (0, -1.1), (0, -0.45), 0.1)
    bowel_gas = sum(0.15 * _ellipsoid(u, v, *rng.uniform([-0.4, -0.5], [0.4, 0.1]), 0.08, 0.06) for _ in range(4))
    soft = np.maximum(body - bowel_gas, 0)
    bone = (0.4 * wings + 0.5 * heads + 2.5 * femurs + 0.4 * sacrum + spine) * (body > 0)
    return soft, bone, body > 0


SHAPES = {"chest": _chest, "limb": _limb, "hand": _hand, "pelvis": _pelvis}


def _marker(u, v, rng, field):
    """A lead letter 'L' or 'R'-like block inside the field near a corner: bool mask."""
    (u0, u1), (v0, v1) = field
    cu = rng.choice([u0 + 0.08, u1 - 0.16])
    cv = rng.choice([v0 + 0.08, v1 - 0.16])
    size = 0.07
    stem = (u >= cu) & (u <= cu + 0.25 * size) & (v >= cv) & (v <= cv + size)
    foot = (u >= cu) & (u <= cu + 0.7 * size) & (v >= cv + 0.75 * size) & (v <= cv + size)
    return stem | foot


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise of unit variance: filtered on a grid coarse enough that the
    kernel spans a few cells, then bilinearly enlarged (a 4000 px image costs milliseconds)."""
    step = max(1, int(sigma / 4))
    coarse = (-(-shape[0] // step) + 1, -(-shape[1] // step) + 1)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma / step)
    full = ndimage.zoom(noise, step, order=1)[: shape[0], : shape[1]] if step > 1 else noise[: shape[0], : shape[1]]
    return full / max(float(full.std()), 1e-9)


def _structure(P: np.ndarray, body: np.ndarray, rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """Band-limited random structure added to the path length inside the body (module docstring)."""
    small = min(P.shape)
    texture = np.zeros(P.shape, dtype=np.float32)
    for frac, weight in ((rng.uniform(0.01, 0.02), 0.6), (rng.uniform(0.04, 0.08), 0.4)):
        texture += weight * _smooth_noise(P.shape, frac * small, rng)
    inside = P[body].mean() if body.any() else 1.0
    amplitude = rng.uniform(0.04, 0.10) * inside * np.where(lungs, 2.5, 1.0)
    return (amplitude * texture * body).astype(np.float32)


def _penumbra(inside_u: np.ndarray, inside_v: np.ndarray, sigma: float) -> np.ndarray:
    """The blurred collimator field: the field is a product of a column and a row interval, so
    its Gaussian blur is the product of their 1-D blurs."""
    cols = ndimage.gaussian_filter1d(inside_u.astype(np.float32), sigma, mode="nearest")
    rows = ndimage.gaussian_filter1d(inside_v.astype(np.float32), sigma, mode="nearest")
    return rows[:, None] * cols[None, :]


def make_phantom(anatomy: str, rows: int, cols: int, seed: int) -> Phantom:
    """One phantom radiograph of `anatomy`, size rows×cols, fully determined by `seed`."""
    if anatomy not in SHAPES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    rng = np.random.default_rng(seed)
    aspect = cols / rows
    vv, uu = np.meshgrid(np.linspace(-1, 1, rows, dtype=np.float32), np.linspace(-aspect, aspect, cols, dtype=np.float32), indexing="ij")
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.8, 1.1)
    c, s = np.cos(angle), np.sin(angle)
    shift = rng.uniform(-0.08, 0.08, size=2)
    u = (c * uu + s * vv) / scale - shift[0]
    v = (-s * uu + c * vv) / scale - shift[1]
    soft, bone, body = SHAPES[anatomy](u, v, rng)
    mu_soft, mu_bone = rng.uniform(2.0, 3.0), rng.uniform(1.2, 1.8)
    P = (mu_soft * soft + mu_bone * bone).astype(np.float32)
    P = P + _structure(P, body, rng, lungs=(anatomy == "chest") & (soft < 0.3) & body)

    # collimation field (in image coordinates) and the lead marker inside it
    m = rng.uniform(0.02, 0.12, size=4)
    field = ((-aspect + 2 * aspect * m[0], aspect - 2 * aspect * m[1]), (-1 + 2 * m[2], 1 - 2 * m[3]))
    in_field = (uu >= field[0][0]) & (uu <= field[0][1]) & (vv >= field[1][0]) & (vv <= field[1][1])
    marker = _marker(uu, vv, rng, field)
    P = P + 6.0 * marker

    # heel effect along a random axis, Poisson noise (Gaussian approximation), log signal
    heel_dir = rng.uniform(0, 2 * np.pi)
    heel = 1.0 + rng.uniform(0.05, 0.15) * (np.cos(heel_dir) * uu / max(aspect, 1) + np.sin(heel_dir) * vv)
    n0 = rng.uniform(2e3, 2e4)
    counts = n0 * heel * np.exp(-P)
    counts = np.maximum(counts + np.sqrt(counts) * rng.standard_normal(counts.shape).astype(np.float32), 0.5)
    log_atten = -np.log(counts / n0)
    x_air = rng.uniform(0.03, 0.25)
    p_max = np.percentile(log_atten[body & in_field & ~marker], 99.5) if (body & in_field).any() else 4.0
    s_scale = (rng.uniform(0.6, 0.92) - x_air) / max(p_max, 1e-3)
    x = x_air + s_scale * log_atten
    x_col = rng.uniform(0.85, 1.0)
    penumbra = _penumbra((uu[0] >= field[0][0]) & (uu[0] <= field[0][1]), (vv[:, 0] >= field[1][0]) & (vv[:, 0] <= field[1][1]),
                         rng.uniform(0.003, 0.015) * min(rows, cols))
    plateau = x_col + 0.003 * rng.standard_normal(x.shape).astype(np.float32)
    x = np.where(in_field, x * penumbra + plateau * (1 - penumbra), plateau)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    mask = body & in_field & ~marker
    return Phantom(x=x, mask=mask, anatomy=anatomy)
