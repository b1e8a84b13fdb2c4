"""Test inputs whose outputs are known exactly (never assert on random weights)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from pydicom.data import get_testdata_file

from model.checkpoint import save_checkpoint
from model.net import ModelConfig, build_model

REAL_RADIOGRAPHS = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm")


def testdata(name: str) -> Path:
    """A file of pydicom's test data or the pydicom-data package (real CR radiographs)."""
    return Path(get_testdata_file(name))


testdata.__test__ = False  # a helper, not a test, despite its name


def make_constant_checkpoint(path, a=1.0, b=0.0, wc=0.5, ww=0.5, downsample=8, width=8) -> Path:
    """A valid checkpoint whose maps are the given constants everywhere, for any input.

    The head's weights are zeroed and its bias set through the inverse of each output
    constraint, so the network's output does not depend on the image.
    """
    config = ModelConfig(downsample=downsample, width=width, parameterisation="absolute")
    model = build_model(config)
    with torch.no_grad():
        model.head.weight.zero_()
        inv_softplus = lambda v: math.log(math.expm1(v))  # noqa: E731
        model.head.bias.copy_(torch.tensor([
            inv_softplus(a), b, math.log(wc / (1 - wc)), inv_softplus(ww - config.min_ww)
        ]))
    save_checkpoint(path, model, meta={"purpose": f"test: constant maps a={a} b={b} wc={wc} ww={ww}"})
    return Path(path)


def make_seeded_checkpoint(path, seed=7, downsample=8, width=8) -> Path:
    """Untrained but fixed weights (torch.manual_seed): maps that vary over the image, so a round
    trip that mixes up frames, rows or columns fails. Only for comparing two real outputs of the
    same model, never for asserting specific values."""
    torch.manual_seed(seed)
    config = ModelConfig(downsample=downsample, width=width)
    save_checkpoint(path, build_model(config), meta={"purpose": f"test: seeded weights, seed {seed}"})
    return Path(path)


def phantom_radiograph(rows=1200, cols=1000, bits=12, seed=0) -> np.ndarray:
    """A small Beer-Lambert-like phantom as stored values: body ellipse, two bones, air around."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    body = ((yy - cy) / (0.42 * rows)) ** 2 + ((xx - cx) / (0.35 * cols)) ** 2 < 1
    bone = (np.abs(xx - cx + 0.12 * cols) < 0.04 * cols) | (np.abs(xx - cx - 0.12 * cols) < 0.04 * cols)
    mu = 0.6 * body + 1.2 * (bone & body)
    intensity = np.exp(-mu) * (1 + 0.02 * rng.standard_normal((rows, cols)))
    top = (1 << bits) - 1
    return np.clip(intensity * 0.9 * top, 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def phantom_dataset(rows=1200, cols=1000, bits=12, seed=0, modality="CR", photometric="MONOCHROME2"):
    """A real, writable CR/DX dataset carrying `phantom_radiograph` pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = phantom_radiograph(rows, cols, bits, seed)
    if photometric == "MONOCHROME1":
        pixels = ((1 << bits) - 1 - pixels).astype(pixels.dtype)
    ds = Dataset()
    sop_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1.1"}[modality]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["phantom", str(seed), modality])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["phantom-study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["phantom-series", str(seed), modality])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", f"PH{seed}", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer = "dicom-node tests"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = pixels.itemsize * 8, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PROCESSING"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.DetectorType, ds.BurnedInAnnotation, ds.PatientOrientation = "SCINTILLATOR", "NO", ["A", "F"]
        ds.ContentDate, ds.ContentTime = "20260101", "120000"
        ds.KVP, ds.ExposureTime = "", ""
        ds.ImageLaterality, ds.PresentationLUTShape, ds.LossyImageCompression = "U", "IDENTITY", "00"
        ds.AnatomicRegionSequence = []
        ds.AcquisitionContextSequence = []
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
        ds.PatientOrientation = ""
    return ds


def flock_held(path: Path) -> bool:
    """Whether another process holds the flock on `path` (a worker that is ready holds its slot's)."""
    import fcntl

    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def write_worker_config(folder: Path, weights: Path | str, processes: int, threads: int = 0,
                        enhance: tuple[str, ...] = ("CR", "DX"), level: str = "warning",
                        device: str = "cpu", batch: int = 0) -> Path:
    """A config.toml in `folder` for worker processes without an SCP: spool and a folder
    destination `outbox` inside `folder`, the model on `device`, [worker] processes, threads
    and batch."""
    import json

    config = folder / "config.toml"
    config.write_text("\n".join([
        "[spool]", 'dir = "spool"',
        "[model]", f"weights = {json.dumps(str(weights))}", f"device = {json.dumps(device)}",
        f"enhance = {json.dumps(list(enhance))}",
        "[worker]", f"processes = {processes}", f"threads = {threads}", f"batch = {batch}",
        "[logging]", 'format = "json"', f"level = {json.dumps(level)}",
        "[[destinations]]", 'name = "archive"', 'type = "folder"', 'path = "outbox"',
    ]) + "\n")
    return config


@contextlib.contextmanager
def worker_processes(config_path: Path, count: int, audit_queue=None, log_level: str = "warning",
                     ready_timeout: float = 300):
    """`count` worker processes (dicom_node.worker.main, spawned as the node spawns them) on the
    config's spool. Yields (the processes, their wake flag) once each holds its slot's lock (it
    takes it just before "worker ready": idle, waiting for work); stops them when the block
    ends (joined, killed if they do not stop)."""
    import multiprocessing
    import time

    from dicom_node import worker
    from dicom_node.config import load_config
    from dicom_node.spool import Spool

    spawn = multiprocessing.get_context("spawn")
    locks = [Spool(load_config(config_path).spool.dir).root / Spool.worker_lock_name(s) for s in range(count)]
    stop, wake = spawn.Event(), spawn.Event()
    procs = [spawn.Process(target=worker.main, args=(str(config_path), stop, wake, log_level, audit_queue, slot))
             for slot in range(count)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + ready_timeout
        while not all(flock_held(lock) for lock in locks):
            if time.monotonic() > deadline or any(not p.is_alive() for p in procs):
                raise RuntimeError(f"the worker processes did not become ready (exit codes {[p.exitcode for p in procs]})")
            time.sleep(0.1)
        yield procs, wake
    finally:
        stop.set()
        wake.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
