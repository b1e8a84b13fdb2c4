"""Where the anatomy is: a classical body mask for a radiograph x (higher = brighter).

A radiograph holds three kinds of region, and only one of them is anatomy:
  direct exposure  the beam reached the detector unattenuated: the darkest values, featureless
                   (noise only), reaching the image border around the body;
  collimation      outside the collimator blades almost no beam arrives: a bright plateau (often
                   the top of the stored range) along the border, blurred into a smooth penumbra
                   at the blade, and bounded by straight edges, so the exposed field it leaves is
                   a convex polygon;
  anatomy          everything else, lungs and bowel gas included (dark, but textured and
                   enclosed by the body). Lead markers (small bright letters, usually in the
                   direct exposure) are not anatomy.

Method (`find_anatomy_mask`, on the image area-downsampled by MASK_SCALE and then to at most
WORK_SIDE px, ~20 ms):
  1. texture = local RMS of the image minus its 1-px Gaussian blur; "flat" = texture below
     FLAT_FRACTION of the anatomy-range texture (the 75th percentile over the image), so the
     test scales with the image's own noise and detail.
  2. three-class Otsu thresholds t_air < t_bright of the image's values.
  3. collimation: components of "bright (> t_bright), flat, touching the border" whose
     removal leaves a convex exposed field (solidity >= FIELD_SOLIDITY). A bright, smooth
     abdomen under a chest also touches the border, but the diaphragm's domes leave a field
     that is not convex. Accepted plateaus are then grown through flat neighbouring pixels,
     which takes in the blade's penumbra.
  4. direct exposure: flat pixels darker than t_air that reach the border (lungs are darker
     than t_air too, but textured, and enclosed by the body).
  5. anatomy = the rest, opened, holes filled, components smaller than MIN_COMPONENT of the
     largest dropped (markers).
If that leaves less than MIN_BODY of the image (a flat test image, a failed guess), the mask
falls back to "not collimation", then to the whole image. The result does not depend on a
global gain or offset of the image (every threshold is relative to the image's own values).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MASK_SCALE = 8  # the mask is found at 1/8 of the full resolution: the network's view of the image
WORK_SIDE = 256  # px, at most, on the longer side of the copy the mask is found on
FLAT_FRACTION = 0.25  # flat = texture below this fraction of the 75th-percentile texture
NOISE_MULTIPLE = 3.0  # ... or below this multiple of the 10th-percentile texture (the noise floor)
SMOOTH_FRACTION = 0.5  # the penumbra grown from a plateau: texture below this fraction
MIN_PLATEAU = 0.01  # a collimation plateau covers at least this fraction of the image
PLATEAU_SPREAD = 0.03  # and at least half its values lie within this fraction of the image's range of a plane
PENUMBRA_PX = 12  # working px the penumbra may extend from its plateau
EDGE_PX = 2  # working px added around collimation and direct exposure (the blade's edge, the skin line)
FIELD_SOLIDITY = 0.9  # the exposed field left by collimation is (nearly) convex (a perturbed penumbra frays it a little)
VALLEY_DEPTH = 0.5  # direct exposure: a dark histogram mode with a valley below this fraction of its peak
MAX_TEXTURED_AIR = 0.15  # a textured dark region at the border larger than this fraction is lung, not air
MIN_COMPONENT = 0.1  # anatomy components smaller than this fraction of the largest are dropped
MIN_BODY = 0.05  # a mask covering less of the image than this is not trusted


def _to_work_size(x: np.ndarray, scale: int) -> np.ndarray:
    """The copy the mask is found on: x (at 1/scale of the full resolution) area-downsampled to
    1/MASK_SCALE of the full resolution, then to at most WORK_SIDE px on its longer side (never
    up), so the teacher on a full-resolution image and the network on its /8 input find the
    mask on the same pixels."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    factor = max(1, MASK_SCALE // max(1, scale))
    if factor > 1:
        from model.remap import downsample_image

        t = downsample_image(t, factor)
    h, w = t.shape[-2:]
    if max(h, w) > WORK_SIDE:
        scale_down = WORK_SIDE / max(h, w)
        t = F.interpolate(t, size=(max(8, round(h * scale_down)), max(8, round(w * scale_down))), mode="area")
    return t[0, 0].double().numpy()


def _texture(small: np.ndarray) -> np.ndarray:
    detail = small - ndimage.gaussian_filter(small, 1.0, mode="nearest")
    return np.sqrt(np.maximum(ndimage.uniform_filter(detail * detail, 5, mode="nearest"), 0.0))


def _touches_border(labels: np.ndarray) -> np.ndarray:
    """Labels (> 0) of the components that touch the image border."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def _field_solidity(blocked: np.ndarray) -> float:
    """Solidity (area / convex hull area) of the largest region `blocked` leaves exposed."""
    from skimage.morphology import convex_hull_image

    labels, n = ndimage.label(~blocked)
    if n == 0:
        return 0.0
    sizes = ndimage.sum(~blocked, labels, index=np.arange(1, n + 1))
    field = labels == 1 + int(np.argmax(sizes))
    if field.sum() < 16:
        return 0.0
    return float(field.sum() / max(convex_hull_image(field).sum(), 1))


def _plateau_fraction(small: np.ndarray, region: np.ndarray, tolerance: float) -> float:
    """Fraction of the region's values within `tolerance` of a plane fitted to its flattest part
    (refitted on the 60 % closest, so a penumbra ramp at one edge does not tilt it). A plateau
    stays on its plane under a smooth gain field; a shaded organ does not."""
    rows, cols = np.nonzero(region)
    design = np.column_stack([rows, cols, np.ones_like(rows)]).astype(np.float64)
    values = small[region]
    keep = np.ones(values.size, dtype=bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        residual = np.abs(values - design @ coef)
        keep = residual <= np.percentile(residual, 60)
    return float((residual <= tolerance).mean())


def _collimation(small: np.ndarray, flat: np.ndarray, smooth: np.ndarray, t_bright: float) -> np.ndarray:
    from skimage.morphology import remove_small_holes

    value_range = max(float(np.percentile(small, 99) - np.percentile(small, 1)), 1e-6)
    candidates = ndimage.binary_opening((small > t_bright) & flat, iterations=2)
    labels, _ = ndimage.label(candidates)
    collimation = np.zeros_like(candidates)
    for label in _touches_border(labels):  # each judged on its own: the result does not depend on their order
        plateau = remove_small_holes(labels == label, max_size=int(0.01 * labels.size))
        if plateau.mean() < MIN_PLATEAU or _plateau_fraction(small, plateau, PLATEAU_SPREAD * value_range) < 0.5:
            continue  # a small or shaded bright region: anatomy (an abdomen, a shoulder)
        if _field_solidity(plateau) >= FIELD_SOLIDITY:
            collimation |= plateau
    if not collimation.any():
        return collimation
    # the penumbra: smooth ramps from the plateau down to the exposed field; then the blade's edge
    grown = ndimage.binary_dilation(collimation, iterations=PENUMBRA_PX, mask=smooth | collimation)
    return ndimage.binary_dilation(grown, iterations=2 * EDGE_PX)


def _air_valley(small: np.ndarray) -> float | None:
    """The valley after the histogram's darkest mode, when that mode stands apart (direct
    exposure is a separate population, darker than any anatomy): its value, else None."""
    lo, hi = np.percentile(small, [0.1, 99.9])
    if hi - lo < 1e-6:
        return None
    counts, edges = np.histogram(np.clip(small, lo, hi), bins=128, range=(lo, hi))
    counts = ndimage.gaussian_filter1d(counts.astype(np.float64), 2.0)
    tall = counts >= 0.01 * counts.max()
    peaks = [i for i in range(1, len(counts) - 1) if tall[i] and counts[i] >= counts[i - 1] and counts[i] >= counts[i + 1]]
    if not peaks:
        return None
    first = peaks[0]
    valley = first + int(np.argmin(counts[first:first + 48]))
    below = counts[:valley].sum() / counts.sum()
    if counts[valley] > VALLEY_DEPTH * counts[first] or not 0.005 <= below <= 0.6:
        return None
    return float(edges[valley])


def _direct_exposure(small: np.ndarray, flat: np.ndarray, t_air: float, collimation: np.ndarray) -> np.ndarray:
    """Dark regions reaching the edge of the exposed field (the image's border or the collimator's):
    flat ones darker than t_air (and than the histogram's air valley, where it has one), and those
    below the valley that are either mostly flat or small (processed images show noise in the
    air; large textured ones are lungs)."""
    field_edge = ndimage.binary_dilation(collimation, iterations=2 * EDGE_PX)
    field_edge[[0, -1], :] = field_edge[:, [0, -1]] = True

    def at_field_edge(dark: np.ndarray):
        labels, _ = ndimage.label(dark)
        for label in np.unique(labels[field_edge & (labels > 0)]):
            yield labels == label

    valley = _air_valley(small)
    # where the histogram shows the air apart, nothing above its valley is air: thin soft tissue
    # (an ankle's, a wrist's) is as flat and nearly as dark, but brighter than the valley
    dark_limit = t_air if valley is None else min(t_air, valley)
    air = np.zeros_like(flat)
    for region in at_field_edge((small < dark_limit) & flat):
        air |= region
    if valley is not None:
        for region in at_field_edge(small < valley):
            if flat[region].mean() >= 0.3 or region.mean() <= MAX_TEXTURED_AIR:
                air |= region
    return ndimage.binary_dilation(air, iterations=EDGE_PX)


def find_anatomy_mask_small(small: np.ndarray) -> np.ndarray:
    """The anatomy mask of an image already at the working resolution (module docstring)."""
    from skimage.filters import threshold_multiotsu

    small = ndimage.median_filter(np.asarray(small, dtype=np.float64), 3, mode="nearest")
    everything = np.ones(small.shape, dtype=bool)
    if np.ptp(small) < 1e-6:
        return everything
    texture = _texture(small)
    reference = max(np.percentile(texture, 75), 1e-9)
    flat = texture < max(FLAT_FRACTION * reference, NOISE_MULTIPLE * np.percentile(texture, 10))
    try:
        t_air, t_bright = threshold_multiotsu(small, classes=3)
    except ValueError:  # fewer than three distinct values
        return everything
    collimation = _collimation(small, flat, texture < SMOOTH_FRACTION * reference, t_bright)
    air = _direct_exposure(small, flat, t_air, collimation)
    body = ndimage.binary_opening(~(collimation | air), iterations=3)
    body = ndimage.binary_fill_holes(body)
    labels, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(body, labels, index=np.arange(1, n + 1))
        body = np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_COMPONENT * sizes.max()))
    if body.mean() >= MIN_BODY:
        return body
    if (~collimation).mean() >= MIN_BODY:
        return ~collimation
    return everything


def _nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    return mask[np.ix_(rows, cols)]


def find_anatomy_mask(x: np.ndarray, scale: int = 1) -> np.ndarray:
    """Bool anatomy mask of image x (H, W) in [0, 1], shaped like x (module docstring); x is at
    1/scale of the full resolution (1: the image itself, 8: the network's /8 input).

    The mask is decided on the 1/MASK_SCALE grid and each of its cells covers a whole block of
    x, so the full-resolution mask area-downsampled by MASK_SCALE is exactly the mask the
    network finds on its /8 input: teacher and network judge the same pixels."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {x.shape}")
    factor = max(1, MASK_SCALE // max(1, scale))
    grid = (-(-x.shape[0] // factor), -(-x.shape[1] // factor))  # the grid downsample_image makes
    mask = _nearest(find_anatomy_mask_small(_to_work_size(x, scale)), grid)
    if factor > 1:
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[: x.shape[0], : x.shape[1]]
    return np.ascontiguousarray(mask)
