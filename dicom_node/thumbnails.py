"""Before/after thumbnails for the status page, rendered as a viewer shows the file.

The worker writes them when it derives an instance (the spool files are gone once delivered)
and keeps those of the newest jobs only; the HTTP endpoint serves them as they are.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_node.spool import Spool

THUMBNAIL_SIDE = 256
KEEP_JOBS = 50  # the status page lists the last 50 instances
SIDES = ("before", "after")
_NAME = re.compile(r"^(\d+)\.(before|after)\.png$")


def thumbnails_dir(spool: Spool) -> Path:
    return spool.root / "thumbs"


def thumbnail_path(spool: Spool, job_id: int, side: str) -> Path:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return thumbnails_dir(spool) / f"{int(job_id)}.{side}.png"


def block_mean(image: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average `image` down so that its longer side is at most `max_side`."""
    factor = max(1, -(-max(image.shape) // max_side))
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if factor == 1:
        return image.astype(np.float64)
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.mean(axis=(1, 3))


def viewer_image(ds: Dataset, stored: np.ndarray | None = None, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The file's default presentation as 8-bit grey, at most `max_side` pixels on a side.

    Modality LUT (PS3.3 C.11.1), then the first VOI window or VOI LUT (C.11.2; LINEAR or
    SIGMOID), or the 0.5-99.5 percentile range where the file has none; MONOCHROME1 inverted
    (C.7.6.3.1.2). The image is area-averaged first: a thumbnail needs no full-size pass.
    """
    stored = ds.pixel_array if stored is None else stored
    if stored.ndim != 2:
        raise ValueError(f"a thumbnail needs one greyscale frame, got shape {stored.shape}")
    values = apply_modality_lut(block_mean(stored, max_side), ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        shown = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        # the window's output range, as pydicom maps it (the ends of any input)
        with np.errstate(over="ignore"):  # a SIGMOID's exp overflows out there, to its bound
            ends = np.asarray(apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
        low, high = float(ends.min()), float(ends.max())
    else:
        shown = values
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    unit = np.clip((shown - low) / max(high - low, 1e-12), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        unit = 1.0 - unit
    return np.round(unit * 255).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Replace `path` with a greyscale PNG (no fsync: a lost thumbnail is redrawn by no one and
    harms no one)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(image, mode="L").save(partial, format="PNG")
    os.replace(partial, path)


def write_thumbnails(spool: Spool, job_id: int, source: Dataset, derived: Dataset) -> None:
    """The job's before (the received file) and after (the derived instance) thumbnails; then
    only the newest KEEP_JOBS jobs' thumbnails are kept."""
    write_png(thumbnail_path(spool, job_id, "before"), viewer_image(source))
    write_png(thumbnail_path(spool, job_id, "after"), viewer_image(derived))
    prune(spool, KEEP_JOBS)


def prune(spool: Spool, keep: int) -> None:
    folder = thumbnails_dir(spool)
    names = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    newest = set(sorted({job_id for job_id, _ in names}, reverse=True)[:keep])
    for job_id, path in names:
        if job_id not in newest:
            path.unlink(missing_ok=True)
