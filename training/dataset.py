"""Training samples with on-the-fly augmentation, as in the paper.

A sample is built from a cached archive item:
  x_low   (1, h, w)  the whole image at the model's resolution (the network needs global context)
  maps    (4, h, w)  ground-truth a, b, wc, ww at that resolution
  x_crop, z_crop (1, c, c)  a full-resolution crop of the input and of the target presentation,
          at (top, left) of the augmented frame, for the image term of the loss;
  pts_rc, pts_x, pts_z      `points` full-resolution pixels scattered over the whole augmented
          frame (their row/col and x, z values): the image term over the whole image, so the
          global window is supervised everywhere and not only inside one crop.

Geometric augmentation (mirror, rotation, shear, scale) is one affine map of the output frame
onto the source frame, applied identically to x, z and the maps (the remap is pixel-wise, so a
warped target is the remap of the warped input with the warped maps). Only what the loss needs
is resampled: the low-resolution image and maps, and the full-resolution crop window.
Intensity augmentation x'' = alpha x + beta (global gain/offset and a linear gain ramp) comes
with its exact map correction a'' = a / alpha, b'' = b - a beta / alpha; the target is unchanged.

Ranges (AugmentConfig): mirror p=0.5; with p=0.7 an affine of rotation ±10°, shear ±0.1, scale
0.85–1.15, zoomed in as far as needed for the frame to stay inside the image (edges replicated
into the frame are no radiograph: they gave the classical prior streaks to misjudge, and the
network learnt to correct those instead of the acquisition); with p=0.8 an intensity change of
gain 0.85–1.15, offset ±0.04, ramp ±0.05.

Real radiographs are few, so they get more (REAL_AUGMENT): wider geometry (rotation ±25°,
scale 0.8–1.5, mostly crops), a smooth elastic displacement, and changes of the input alone:
added noise, fewer bits, a synthetic collimation (a bright plateau with a penumbra beyond a
tilted field edge) and a lead marker. Those change x but not the anatomy the maps describe,
so the target is the remap of the changed x with the same maps, and collimated and marker
pixels carry no weight in the loss (`Sample.weight`, `Sample.pts_weight`): what to show there
is not the anatomy's question.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.remap import remap, sample_bilinear, upsample_maps
from training.archive import ArchiveItem


@dataclass(frozen=True)
class AugmentConfig:
    mirror: float = 0.5
    # 0: a site's presentation is made from the whole image (its window, its body mean), so a
    # rotated or zoomed-in view of it is no target for that view: the bundled model scores 11 dB
    # on such samples of its own teacher's style, 34 dB unwarped (docs/training.md)
    affine: float = 0.0
    rotation_deg: float = 10.0
    shear: float = 0.1
    scale: tuple = (0.85, 1.15)
    intensity: float = 0.8
    gain: tuple = (0.85, 1.15)
    offset: float = 0.04
    ramp: float = 0.05
    elastic: float = 0.0  # probability of a smooth elastic displacement...
    elastic_amplitude: float = 0.015  # ...of at most this fraction of the shorter side
    noise: float = 0.0  # probability of added Gaussian noise...
    noise_std: tuple = (0.002, 0.012)  # ...of this standard deviation (x units)
    quantise: float = 0.0  # probability of re-quantising x...
    bits: tuple = (8, 10, 12)  # ...to one of these bit depths
    collimation: float = 0.0  # probability of a synthetic collimation
    marker: float = 0.0  # probability of a synthetic lead marker
    inside: bool = True  # the warped frame stays inside the image (zoomed in as needed): no replicated edges


NO_AUGMENT = AugmentConfig(mirror=0.0, affine=0.0, intensity=0.0)
REAL_AUGMENT = AugmentConfig(noise=0.4, quantise=0.3, collimation=0.35, marker=0.35)


@dataclass
class Sample:
    x_low: torch.Tensor
    maps: torch.Tensor
    x_crop: torch.Tensor
    z_crop: torch.Tensor
    top: int
    left: int
    pts_rc: torch.Tensor | None = None  # (P, 2) full-resolution (row, col) in the augmented frame
    pts_x: torch.Tensor | None = None  # (P,)
    pts_z: torch.Tensor | None = None  # (P,)
    weight: torch.Tensor | None = None  # (1, c, c) loss weight of the crop; None = all 1
    pts_weight: torch.Tensor | None = None  # (P,)
    exact: bool = True  # maps are ground truth (a params row), not a fit to a target-only row


def draw_affine(shape, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray | None:
    """2x3 matrix M: source (col, row) = M @ (col, row, 1) of the output frame; None = identity."""
    mirror = rng.random() < aug.mirror
    warp = rng.random() < aug.affine
    if not (mirror or warp):
        return None
    h, w = shape
    A = np.eye(2)
    if warp:
        th = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
        sh = rng.uniform(-aug.shear, aug.shear)
        sc = rng.uniform(*aug.scale)
        R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        A = R @ np.array([[1.0, sh], [0.0, 1.0]]) / sc
    if mirror:
        A = A @ np.diag([-1.0, 1.0])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    if aug.inside:  # zoom in until the output frame's corners land inside the image
        corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * c
        reach = np.abs(corners @ A.T) / np.maximum(c, 1e-9)
        A = A / max(1.0, float(reach.max()))
    return np.concatenate([A, (c - A @ c)[:, None]], axis=1)


@dataclass
class Warp:
    """Output frame (row, col) -> source frame: a smooth elastic displacement of the output
    coordinates (three broad sinusoids per axis), then the affine M."""

    M: np.ndarray  # 2x3: source (col, row) = M @ (col, row, 1)
    waves: np.ndarray | None = None  # (2, 3, 4): per axis and wave, amplitude px, row freq, col freq, phase

    def source(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source (cols, rows) of output pixels (rows, cols), float64 arrays of one shape."""
        rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
        if self.waves is not None:
            shifted = []
            for axis in self.waves:
                shift = sum(amp * np.sin(fr * rows + fc * cols + phase) for amp, fr, fc, phase in axis)
                shifted.append(shift)
            rows, cols = rows + shifted[0], cols + shifted[1]
        M = self.M
        return M[0, 0] * cols + M[0, 1] * rows + M[0, 2], M[1, 0] * cols + M[1, 1] * rows + M[1, 2]


def draw_warp(shape, rng: np.random.Generator, aug: AugmentConfig) -> Warp | None:
    """The geometric augmentation of one sample; None = the identity."""
    M = draw_affine(shape, rng, aug)
    elastic = rng.random() < aug.elastic
    if M is None and not elastic:
        return None
    waves = None
    if elastic:
        h, w = shape
        amplitude = aug.elastic_amplitude * min(h, w)
        waves = np.empty((2, 3, 4))
        for axis in range(2):
            for k in range(3):
                cycles_r, cycles_c = rng.uniform(-1.5, 1.5, size=2)
                waves[axis, k] = (rng.uniform(0.2, 1.0) * amplitude / 3 * 2, 2 * np.pi * cycles_r / h,
                                  2 * np.pi * cycles_c / w, rng.uniform(0, 2 * np.pi))
    return Warp(M=np.eye(2, 3) if M is None else M, waves=waves)


@dataclass
class InputChange:
    """Changes of the acquisition that leave the anatomy, and so the maps, as they were."""

    noise_std: float = 0.0
    levels: int = 0  # 0 = keep; else re-quantise to this many levels
    field: tuple | None = None  # collimation: centre row, col, angle, (top, bottom, left, right) half-extents, penumbra px, value
    marker: tuple | None = None  # top, left, size px, value

    def __bool__(self) -> bool:
        return bool(self.noise_std or self.levels or self.field or self.marker)

    def covered(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(blend towards the covering value in [0, 1], that value) at output pixels (rows, cols)."""
        blend = np.zeros(np.broadcast(rows, cols).shape)
        value = np.zeros_like(blend)
        if self.field is not None:
            rc, cc, angle, (top, bottom, left, right), penumbra, level = self.field
            u = np.cos(angle) * (cols - cc) + np.sin(angle) * (rows - rc)
            v = -np.sin(angle) * (cols - cc) + np.cos(angle) * (rows - rc)
            outside = np.maximum.reduce([u - right, -left - u, v - bottom, -top - v, np.zeros_like(u)])
            t = np.clip(outside / penumbra, 0.0, 1.0)
            blend, value = t * t * (3 - 2 * t), np.full_like(blend, level)
        if self.marker is not None:
            top, left, size, level = self.marker
            stem = (rows >= top) & (rows <= top + size) & (cols >= left) & (cols <= left + 0.25 * size)
            foot = (rows >= top + 0.75 * size) & (rows <= top + size) & (cols >= left) & (cols <= left + 0.7 * size)
            letter = stem | foot
            blend, value = np.where(letter, 1.0, blend), np.where(letter, level, value)
        return blend, value

    def apply(self, x: torch.Tensor, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator, averaged: int = 1):
        """(changed x, loss weight) for x sampled at output pixels (rows, cols); `averaged` > 1 for
        an image area-averaged over that many pixels per side (noise shrinks, quantisation vanishes)."""
        blend, value = self.covered(rows, cols)
        blend_t = torch.from_numpy(blend.astype(np.float32)).reshape(x.shape)
        x = x * (1 - blend_t) + torch.from_numpy(value.astype(np.float32)).reshape(x.shape) * blend_t
        if self.noise_std:
            x = x + torch.from_numpy(rng.normal(0.0, self.noise_std / averaged, size=tuple(x.shape)).astype(np.float32))
        if self.levels and averaged == 1:
            x = torch.round(x.clamp(0, 1) * (self.levels - 1)) / (self.levels - 1)
        return x.clamp(0.0, 1.0), (blend_t == 0).float()


def draw_input_change(shape, rng: np.random.Generator, aug: AugmentConfig) -> InputChange:
    h, w = shape
    change = InputChange()
    if rng.random() < aug.noise:
        change.noise_std = float(rng.uniform(*aug.noise_std))
    if rng.random() < aug.quantise:
        change.levels = 2 ** int(rng.choice(aug.bits))
    if rng.random() < aug.collimation:
        margins = rng.uniform(0.03, 0.2, size=4) * np.array([h, h, w, w])
        extents = (h / 2 - margins[0], h / 2 - margins[1], w / 2 - margins[2], w / 2 - margins[3])
        change.field = ((h - 1) / 2, (w - 1) / 2, float(np.deg2rad(rng.uniform(-8, 8))), extents,
                        float(rng.uniform(0.005, 0.03) * min(h, w)), float(rng.uniform(0.85, 1.0)))
    if rng.random() < aug.marker:
        size = float(rng.uniform(0.04, 0.07) * min(h, w))
        change.marker = (float(rng.uniform(0.05 * h, 0.95 * h - size)), float(rng.uniform(0.05 * w, 0.95 * w - size)),
                         size, float(rng.uniform(0.9, 1.0)))
    return change


def _bilinear_at(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """img (H, W), a float16 memory map, sampled bilinearly at (rows, cols), border clamped: the
    values `sample_bilinear(img, rows, cols)` gives, reading only the four neighbours of each
    point. grid_sample and scipy's map_coordinates (no float16) would convert the whole image."""
    h, w = img.shape
    flat = np.asarray(img).reshape(-1)
    r = np.clip(rows, 0, h - 1)
    c = np.clip(cols, 0, w - 1)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    top = flat[r0 * w + c0].astype(np.float32) * (1 - fc) + flat[r0 * w + c1].astype(np.float32) * fc
    bottom = flat[r1 * w + c0].astype(np.float32) * (1 - fc) + flat[r1 * w + c1].astype(np.float32) * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


def _grid(warp: Warp, rows: np.ndarray, cols: np.ndarray):
    cc, rr = np.meshgrid(cols, rows)
    src_c, src_r = warp.source(rr, cc)
    return torch.from_numpy(src_c), torch.from_numpy(src_r)


def make_sample(item: ArchiveItem, rng: np.random.Generator, crop: int, downsample: int,
                aug: AugmentConfig = NO_AUGMENT, centre: bool = False, points: int = 0) -> Sample:
    x_low_np, maps_np = item.low()
    x_full, z_full = item.x, item.z
    H, W = x_full.shape
    warp = draw_warp((H, W), rng, aug)
    ch, cw = min(crop, H), min(crop, W)
    top = (H - ch) // 2 if centre else int(rng.integers(0, H - ch + 1))
    left = (W - cw) // 2 if centre else int(rng.integers(0, W - cw + 1))

    x_low, maps = torch.from_numpy(x_low_np)[None], torch.from_numpy(maps_np)
    if warp is None:
        x_crop = torch.from_numpy(np.asarray(x_full[top:top + ch, left:left + cw], dtype=np.float32))[None]
        z_crop = torch.from_numpy(np.asarray(z_full[top:top + ch, left:left + cw], dtype=np.float32))[None]
    else:
        h, w = x_low.shape[-2:]
        centres_r = (np.arange(h) + 0.5) * downsample - 0.5
        centres_c = (np.arange(w) + 0.5) * downsample - 0.5
        sc, sr = _grid(warp, centres_r, centres_c)
        x_low = sample_bilinear(x_low[None], sr, sc, downsample)[0]
        maps = sample_bilinear(maps[None], sr, sc, downsample)[0]
        sc, sr = _grid(warp, np.arange(top, top + ch, dtype=np.float64), np.arange(left, left + cw, dtype=np.float64))
        r0 = int(np.clip(np.floor(sr.min().item()) - 1, 0, H - 1))
        r1 = int(np.clip(np.ceil(sr.max().item()) + 2, r0 + 1, H))
        c0 = int(np.clip(np.floor(sc.min().item()) - 1, 0, W - 1))
        c1 = int(np.clip(np.ceil(sc.max().item()) + 2, c0 + 1, W))
        box = torch.from_numpy(np.stack([np.asarray(x_full[r0:r1, c0:c1], dtype=np.float32),
                                         np.asarray(z_full[r0:r1, c0:c1], dtype=np.float32)]))
        both = sample_bilinear(box[None], sr - r0, sc - c0)[0]
        x_crop, z_crop = both[:1], both[1:]

    pts_rc = pts_x = pts_z = None
    if points:
        pr = rng.integers(0, H, size=points).astype(np.float64)
        pc = rng.integers(0, W, size=points).astype(np.float64)
        if warp is None:
            ri, ci = pr.astype(np.int64), pc.astype(np.int64)
            flat = ri * W + ci
            order = np.argsort(flat)  # sorted reads of the memory map
            xs = np.empty(points, np.float32)
            zs = np.empty(points, np.float32)
            xs[order] = np.asarray(x_full).reshape(-1)[flat[order]]
            zs[order] = np.asarray(z_full).reshape(-1)[flat[order]]
            pts_x, pts_z = torch.from_numpy(xs), torch.from_numpy(zs)
        else:
            src_c, src_r = warp.source(pr, pc)
            pts_x, pts_z = (torch.from_numpy(_bilinear_at(img, src_r, src_c)) for img in (x_full, z_full))
        pts_rc = torch.from_numpy(np.stack([pr, pc], axis=1).astype(np.float32))

    if rng.random() < aug.intensity:
        gain = rng.uniform(*aug.gain)
        offset = rng.uniform(-aug.offset, aug.offset)
        theta = rng.uniform(0, 2 * np.pi)
        ramp = rng.uniform(-aug.ramp, aug.ramp)
        ct, st = np.cos(theta) * 2 / W, np.sin(theta) * 2 / H

        def alpha_beta(rows, cols):
            cc, rr = np.meshgrid(cols, rows)
            alpha = gain * (1 + ramp * (ct * (cc - (W - 1) / 2) + st * (rr - (H - 1) / 2)))
            return torch.from_numpy(alpha.astype(np.float32)), torch.tensor(np.float32(offset))

        h, w = x_low.shape[-2:]
        al, be = alpha_beta((np.arange(h) + 0.5) * downsample - 0.5, (np.arange(w) + 0.5) * downsample - 0.5)
        lo, hi = float((al * x_low).min() + be), float((al * x_low).max() + be)
        if lo >= 0.0 and hi <= 1.0:  # keep the input in the stored range; else skip the change
            a, b = maps[0], maps[1]
            maps = torch.stack([a / al, b - a * be / al, maps[2], maps[3]])
            x_low = al * x_low + be
            ac, bc = alpha_beta(np.arange(top, top + ch), np.arange(left, left + cw))
            x_crop = ac * x_crop + bc
            if points:
                cc, rr = pts_rc[:, 1].numpy().astype(np.float64), pts_rc[:, 0].numpy().astype(np.float64)
                ap = gain * (1 + ramp * (ct * (cc - (W - 1) / 2) + st * (rr - (H - 1) / 2)))
                pts_x = torch.from_numpy(ap.astype(np.float32)) * pts_x + float(offset)

    weight = pts_weight = None
    change = draw_input_change((H, W), rng, aug)
    if change:  # x changes, the anatomy does not: the target is the remap of the new x with the same maps
        h, w = x_low.shape[-2:]
        rows, cols = np.meshgrid((np.arange(h) + 0.5) * downsample - 0.5, (np.arange(w) + 0.5) * downsample - 0.5, indexing="ij")
        x_low = change.apply(x_low, rows, cols, rng, averaged=downsample)[0]
        rows, cols = np.meshgrid(np.arange(top, top + ch), np.arange(left, left + cw), indexing="ij")
        x_crop, weight = change.apply(x_crop, rows, cols, rng)
        z_crop = remap(x_crop[None], *crop_maps(maps[None], top, left, (ch, cw), downsample).split(1, dim=1)).z[0]
        if points:
            pts_x, pts_weight = change.apply(pts_x, pts_rc[:, 0].numpy(), pts_rc[:, 1].numpy(), rng)
            pts_z = remap(pts_x, *sample_bilinear(maps[None], pts_rc[:, 0], pts_rc[:, 1], downsample)[0].unbind(0)).z
    return Sample(x_low=x_low.contiguous(), maps=maps.contiguous(), x_crop=x_crop.contiguous(),
                  z_crop=z_crop.contiguous(), top=top, left=left, pts_rc=pts_rc, pts_x=pts_x, pts_z=pts_z,
                  weight=weight, pts_weight=pts_weight, exact=getattr(item, "exact", True))



def crop_maps(maps_low: torch.Tensor, top: int, left: int, size: tuple[int, int], downsample: int) -> torch.Tensor:
    """Full-resolution maps (N, C, ch, cw) of a crop, equal to cropping `upsample_maps` of the
    whole low-res maps, but upsampling only the low-res block around the crop (+1 margin)."""
    ch, cw = size
    h, w = maps_low.shape[-2:]
    r0, c0 = max(top // downsample - 1, 0), max(left // downsample - 1, 0)
    r1, c1 = min(-(-(top + ch) // downsample) + 1, h), min(-(-(left + cw) // downsample) + 1, w)
    block = maps_low[..., r0:r1, c0:c1]
    # the block's cut edges lie at least one low-res pixel from the crop, so the crop is exact
    up = upsample_maps(block, ((r1 - r0) * downsample, (c1 - c0) * downsample), downsample)
    return up[..., top - r0 * downsample: top - r0 * downsample + ch, left - c0 * downsample: left - c0 * downsample + cw]
