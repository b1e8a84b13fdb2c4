"""Thumbnails are drawn as a viewer draws the file: compared with DCMTK's dcmj2pnm using the
file's own window (+Wi 1), MONOCHROME1 included, and with the derived instance's SIGMOID VOI."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node.spool import Spool
from dicom_node.thumbnails import KEEP_JOBS, THUMBNAIL_SIDE, prune, thumbnail_path, viewer_image, write_png

DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def dcmtk_rendering(path: Path, width: int) -> np.ndarray:
    """dcmj2pnm's picture of the file under its first window, `width` pixels wide (8-bit grey)."""
    if shutil.which("dcmj2pnm") is None:
        pytest.skip("no dcmj2pnm: scripts/setup --with-peers installs DCMTK")
    png = path.with_suffix(".dcmtk.png")
    subprocess.run(["dcmj2pnm", "+Wi", "1", "+on", "+Sxv", str(width), str(path), str(png)],
                   capture_output=True, env=DCMTK_ENV, timeout=60, check=True)
    return np.asarray(Image.open(png).convert("L"), dtype=np.float64)


def compare_with_dcmtk(path: Path) -> float:
    ds = pydicom.dcmread(path)
    ours = viewer_image(ds)
    theirs = dcmtk_rendering(path, ours.shape[1])
    resized = np.asarray(Image.fromarray(ours).resize(theirs.shape[::-1], Image.BILINEAR), dtype=np.float64)
    return float(np.abs(resized - theirs).mean())


def test_a_monochrome1_radiograph_under_its_own_window_looks_as_in_dcmtk(tmp_path):
    path = tmp_path / "rg1.dcm"
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), path)
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    assert compare_with_dcmtk(path) < 4.0  # of 255: the same picture, resampled differently


def test_a_derived_instance_with_a_sigmoid_window_looks_as_in_dcmtk(tmp_path, constant_weights):
    from dicom_node.enhancer import Enhancer

    source = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    derived = Enhancer(constant_weights, "cpu", "voi").enhance(source)
    assert derived.VOILUTFunction == "SIGMOID"
    path = tmp_path / "derived.dcm"
    derived.save_as(path, enforce_file_format=True)
    assert compare_with_dcmtk(path) < 4.0


def test_thumbnail_size_and_pruning_keep_the_newest_jobs(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    image = viewer_image(ds)
    assert image.dtype == np.uint8 and max(image.shape) <= THUMBNAIL_SIDE and image.std() > 10
    spool = Spool(tmp_path / "spool").create()
    for job_id in range(1, KEEP_JOBS + 6):
        for side in ("before", "after"):
            write_png(thumbnail_path(spool, job_id, side), image)
    prune(spool, KEEP_JOBS)
    kept = sorted({int(p.name.split(".")[0]) for p in thumbnail_path(spool, 1, "after").parent.iterdir()})
    assert kept == list(range(6, KEEP_JOBS + 6))
    assert np.array_equal(np.asarray(Image.open(thumbnail_path(spool, KEEP_JOBS + 5, "before"))), image)
    with pytest.raises(ValueError, match="side must be one of"):
        thumbnail_path(spool, 1, "sideways")
