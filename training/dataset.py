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
0.85–1.15; with p=0.8 an intensity change of gain 0.85–1.15, offset ±0.04, ramp ±0.05.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.archive import Item


@dataclass(frozen=True)
class AugmentConfig:
    mirror: float = 0.5
    affine: float = 0.7
    rotation_deg: float = 10.0
    shear: float = 0.1
    scale: tuple = (0.85, 1.15)
    intensity: float = 0.8
    gain: tuple = (0.85, 1.15)
    offset: float = 0.04
    ramp: float = 0.05


NO_AUGMENT = AugmentConfig(mirror=0.0, affine=0.0, intensity=0.0)


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
    return np.concatenate([A, (c - A @ c)[:, None]], axis=1)


def _sample(img: torch.Tensor, src_cols: torch.Tensor, src_rows: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear samples of img (C, h, w), a /factor image, at full-resolution source coordinates."""
    h, w = img.shape[-2:]
    gx = (src_cols + 0.5) / factor / w * 2 - 1
    gy = (src_rows + 0.5) / factor / h * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None].float()
    return F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _bilinear_at(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """img (H, W), e.g. a memory map, sampled bilinearly at (rows, cols), border clamped: the
    values `_sample(img, cols, rows, 1)` gives, reading only the four neighbours of each point
    (not converting the whole image)."""
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


def _grid(M, rows: np.ndarray, cols: np.ndarray):
    cc, rr = np.meshgrid(cols, rows)
    src_c = M[0, 0] * cc + M[0, 1] * rr + M[0, 2]
    src_r = M[1, 0] * cc + M[1, 1] * rr + M[1, 2]
    return torch.from_numpy(src_c), torch.from_numpy(src_r)


def make_sample(item: Item, rng: np.random.Generator, crop: int, downsample: int,
                aug: AugmentConfig = NO_AUGMENT, centre: bool = False, points: int = 0) -> Sample:
    x_low_np, maps_np = item.low()
    x_full, z_full = item.x, item.z
    H, W = x_full.shape
    ds = downsample
    M = draw_affine((H, W), rng, aug)
    ch, cw = min(crop, H), min(crop, W)
    top = (H - ch) // 2 if centre else int(rng.integers(0, H - ch + 1))
    left = (W - cw) // 2 if centre else int(rng.integers(0, W - cw + 1))

    x_low, maps = torch.from_numpy(x_low_np)[None], torch.from_numpy(maps_np)
    if M is None:
        x_crop = torch.from_numpy(np.asarray(x_full[top:top + ch, left:left + cw], dtype=np.float32))[None]
        z_crop = torch.from_numpy(np.asarray(z_full[top:top + ch, left:left + cw], dtype=np.float32))[None]
    else:
        h, w = x_low.shape[-2:]
        centres_r = (np.arange(h) + 0.5) * ds - 0.5
        centres_c = (np.arange(w) + 0.5) * ds - 0.5
        sc, sr = _grid(M, centres_r, centres_c)
        x_low = _sample(x_low, sc, sr, ds)
        maps = _sample(maps, sc, sr, ds)
        sc, sr = _grid(M, np.arange(top, top + ch, dtype=np.float64), np.arange(left, left + cw, dtype=np.float64))
        r0 = int(np.clip(np.floor(sr.min().item()) - 1, 0, H - 1))
        r1 = int(np.clip(np.ceil(sr.max().item()) + 2, r0 + 1, H))
        c0 = int(np.clip(np.floor(sc.min().item()) - 1, 0, W - 1))
        c1 = int(np.clip(np.ceil(sc.max().item()) + 2, c0 + 1, W))
        box = torch.from_numpy(np.stack([np.asarray(x_full[r0:r1, c0:c1], dtype=np.float32),
                                         np.asarray(z_full[r0:r1, c0:c1], dtype=np.float32)]))
        both = _sample(box, sc - c0, sr - r0, 1)
        x_crop, z_crop = both[:1], both[1:]

    pts_rc = pts_x = pts_z = None
    if points:
        pr = rng.integers(0, H, size=points).astype(np.float64)
        pc = rng.integers(0, W, size=points).astype(np.float64)
        if M is None:
            ri, ci = pr.astype(np.int64), pc.astype(np.int64)
            flat = ri * W + ci
            order = np.argsort(flat)  # sorted reads of the memory map
            xs = np.empty(points, np.float32)
            zs = np.empty(points, np.float32)
            xs[order] = np.asarray(x_full).reshape(-1)[flat[order]]
            zs[order] = np.asarray(z_full).reshape(-1)[flat[order]]
            pts_x, pts_z = torch.from_numpy(xs), torch.from_numpy(zs)
        else:
            src_c = M[0, 0] * pc + M[0, 1] * pr + M[0, 2]
            src_r = M[1, 0] * pc + M[1, 1] * pr + M[1, 2]
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
        al, be = alpha_beta((np.arange(h) + 0.5) * ds - 0.5, (np.arange(w) + 0.5) * ds - 0.5)
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
    return Sample(x_low=x_low.contiguous(), maps=maps.contiguous(), x_crop=x_crop.contiguous(),
                  z_crop=z_crop.contiguous(), top=top, left=left, pts_rc=pts_rc, pts_x=pts_x, pts_z=pts_z)


def maps_at_points(maps_low: torch.Tensor, rc: torch.Tensor, downsample: int) -> torch.Tensor:
    """Maps (N, C, h, w) at full-resolution points rc (P, 2) -> (N, C, P): the same bilinear
    values `upsample_maps(..., downsample)` gives at those pixels (border clamped)."""
    h, w = maps_low.shape[-2:]
    gx = (rc[:, 1] + 0.5) / downsample / w * 2 - 1
    gy = (rc[:, 0] + 0.5) / downsample / h * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None, None].to(maps_low.device, maps_low.dtype)
    grid = grid.expand(maps_low.shape[0], -1, -1, -1)
    return F.grid_sample(maps_low, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]


def crop_maps(maps_low: torch.Tensor, top: int, left: int, size: tuple[int, int], downsample: int) -> torch.Tensor:
    """Full-resolution maps (N, C, ch, cw) of a crop, equal to cropping `upsample_maps` of the
    whole low-res maps, but upsampling only the low-res block around the crop (+1 margin)."""
    from model.remap import upsample_maps

    ch, cw = size
    ds = downsample
    h, w = maps_low.shape[-2:]
    r0, c0 = max(top // ds - 1, 0), max(left // ds - 1, 0)
    r1, c1 = min(-(-(top + ch) // ds) + 1, h), min(-(-(left + cw) // ds) + 1, w)
    block = maps_low[..., r0:r1, c0:c1]
    up = upsample_maps(block, ((r1 - r0) * ds, (c1 - c0) * ds), ds)
    if r0 > 0 or c0 > 0 or r1 < h or c1 < w:
        pass  # interior block edges lie >= one low-res pixel away from the crop: exact there
    return up[..., top - r0 * ds: top - r0 * ds + ch, left - c0 * ds: left - c0 * ds + cw]
