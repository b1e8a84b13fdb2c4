"""`dicom-node synth`: a synthetic annotated archive with exact ground truth (design.md format).

For each anatomy (a Beer–Lambert phantom, plus the real radiographs of `pydicom-data`):
  1. the teacher gives the target maps a, b, wc, ww on the clean image, with the anatomy mask
     that model.anatomy finds in it, for phantoms as for real radiographs: the target is what
     the classical pipeline makes of the clean acquisition, so it is reachable from the image
     alone (the model computes the same teacher on its input as its prior) and the perturbed
     acquisitions ask for consistency, not for knowledge of a mask no image carries;
  2. K acquisition perturbations x' = alpha x + beta are drawn (training.perturb), each written
     as a real DICOM file (CR or DX, 10–16 bits, some MONOCHROME1) with its exact maps
     a' = a / alpha, b' = b - a beta / alpha in a params .npz;
  3. all acquisitions of one anatomy share a `group` and a split (no leakage).

With --style (training.styles) the targets are another house style of the clean image: a style
in the prior's family keeps exact params rows when asked (`exact_params`); every other row is
target-only, one presentation DICOM per anatomy (target/<group>.dcm) shared by its
acquisitions, as a site's archive has them.

Layout:  manifest.csv (id, raw, target, params, split, group), raw/<id>.dcm, params/<id>.npz,
target/<group>.dcm.
The params maps are stored area-downsampled by PARAMS_FACTOR (they are smooth); the archive
reader resizes them to the image. Everything is a function of --seed.
"""
from __future__ import annotations

import csv
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_node.writer import CR_STORAGE, DX_FOR_PROCESSING
from model.remap import downsample_image
from training.perturb import random_perturbation
from training.phantoms import ANATOMIES, SIZES, make_phantom
from model.anatomy import find_anatomy_mask

PARAMS_FACTOR = 4
REAL_RADIOGRAPHS = {"RG1_UNCR.dcm": "train", "RG3_UNCR.dcm": "test"}  # pydicom-data files, fixed splits
MANIFEST_COLUMNS = ("id", "raw", "target", "params", "split", "group")


def radiograph_dataset(x: np.ndarray, *, bits: int, photometric: str, modality: str, uid_key: str):
    """A minimal valid CR/DX dataset whose stored pixels read back (dicom_node.reader) as x."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = (1 << bits) - 1
    stored = np.rint(np.clip(x, 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = {"CR": CR_STORAGE, "DX": DX_FOR_PROCESSING}[modality]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["synth", uid_key])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["synth-study", uid_key])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["synth-series", uid_key])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Phantom", uid_key[:64], "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 1, 1, "dicom-node synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = x.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.tobytes()
    if modality == "DX":
        ds.PresentationIntentType = "FOR PROCESSING"  # the class is DX For Processing
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.DetectorType, ds.BurnedInAnnotation = "SCINTILLATOR", "NO"
        ds.ContentDate, ds.ContentTime, ds.KVP, ds.ExposureTime, ds.Laterality = "20260101", "120000", "", "", ""
    return ds


def _small(m: np.ndarray) -> np.ndarray:
    return downsample_image(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)), PARAMS_FACTOR)[0, 0].numpy()


@dataclass
class Anatomy:
    name: str  # group id
    index: int  # position in the full archive (seeds its acquisitions)
    x: np.ndarray
    mask: np.ndarray
    split: str


def assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """70/15/15 by anatomy, at least one val and one test anatomy when n >= 3."""
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    n_val = max(1, round(0.15 * n)) if n >= 3 else 0
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return [splits[i] for i in rng.permutation(n)]


def phantom_size(anatomy: str, rng: np.random.Generator, max_size: int) -> tuple[int, int]:
    f = max_size / 4096
    (r0, r1), (c0, c1) = SIZES[anatomy]
    return max(32, int(rng.uniform(r0, r1) * f)), max(32, int(rng.uniform(c0, c1) * f))


def anatomies(n: int, seed: int, max_size: int = 4096, real: bool = True, only: tuple | None = None,
              real_split: str = "fixed"):
    """Yield the n phantom anatomies (chest, limb, hand, pelvis in turn) then the real ones;
    with `only`, just those of these splits (the others are skipped, the rest unchanged).
    real_split "fixed" puts the real radiographs in REAL_RADIOGRAPHS' splits, "train" all in train."""
    rng = np.random.default_rng([seed, 0])
    splits = assign_splits(n, rng)
    for i in range(n):
        kind = ANATOMIES[i % len(ANATOMIES)]
        rows, cols = phantom_size(kind, rng, max_size)
        phantom_seed = int(rng.integers(2**31))
        if only and splits[i] not in only:
            continue
        ph = make_phantom(kind, rows, cols, seed=phantom_seed)
        yield Anatomy(f"{kind}-{i:04d}", i, ph.x, find_anatomy_mask(ph.x), splits[i])
    if real:
        from pydicom.data import get_testdata_file

        from dicom_node.reader import load_dataset, read_radiograph

        for j, (name, split) in enumerate(REAL_RADIOGRAPHS.items()):
            split = "train" if real_split == "train" else split
            path = get_testdata_file(name)
            if path is None or (only and split not in only):
                continue
            x = read_radiograph(load_dataset(path))
            if max(x.shape) > max_size:  # tests ask for small archives
                f = int(np.ceil(max(x.shape) / max_size))
                x = downsample_image(torch.from_numpy(x), f)[0, 0].numpy()
            yield Anatomy(f"real-{Path(name).stem.lower()}", n + j, x, find_anatomy_mask(x), split)


def synthesise(out: str | Path, n: int, seed: int, perturbations: int = 4, *, max_size: int = 4096,
               real: bool = True, make_zip: bool = False, progress=None, only: tuple | None = None,
               real_split: str = "fixed", style: str = "teacher", exact_params: bool | None = None) -> Path:
    """Write the archive; returns the folder (or the .zip when make_zip). `only` restricts it to
    the rows of some splits (e.g. a fresh test split), each row identical to the full archive's.
    style: a training.styles name; exact_params: params rows where the style has exact maps
    (default: for the teacher's style only), else target-only rows."""
    from training.styles import STYLES

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    look = STYLES[style]
    with_params = look.exact and (style == "teacher" if exact_params is None else exact_params)
    out = Path(out)
    if out.suffix == ".zip":
        make_zip, folder = True, out.with_suffix("")
    else:
        folder = out
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    (folder / "params").mkdir(parents=True, exist_ok=True)
    rows = []
    if real_split not in ("fixed", "train"):
        raise ValueError(f"real_split must be 'fixed' or 'train', got {real_split!r}")
    for anatomy in anatomies(n, seed, max_size, real, only, real_split):
        maps, z = look.target(anatomy.x, anatomy.mask)
        target = ""
        if not with_params:
            target = f"target/{anatomy.name}.dcm"
            (folder / "target").mkdir(exist_ok=True)
            presentation = radiograph_dataset(z, bits=16, photometric="MONOCHROME2", modality="CR",
                                              uid_key=f"{seed}-{anatomy.name}-{style}")
            presentation.ImageType = ["DERIVED", "PRIMARY"]
            presentation.save_as(folder / target, enforce_file_format=True)
        rng = np.random.default_rng([seed, 1, sum(map(ord, anatomy.name)), anatomy.index * perturbations])
        for k in range(perturbations):
            pert = random_perturbation(anatomy.x, rng)
            xp = pert.apply(anatomy.x)
            rid = f"{anatomy.name}-p{k}"
            bits = int(rng.choice([10, 12, 14, 16]))
            photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
            modality = "CR" if rng.random() < 0.5 else "DX"
            ds = radiograph_dataset(xp, bits=bits, photometric=photometric, modality=modality, uid_key=f"{seed}-{rid}")
            ds.save_as(folder / "raw" / f"{rid}.dcm", enforce_file_format=True)
            params = ""
            if with_params:
                a, b = pert.correct(maps.a, maps.b)
                params = f"params/{rid}.npz"
                np.savez_compressed(folder / params, a=_small(a), b=_small(b),
                                    wc=np.float32(maps.wc), ww=np.float32(maps.ww))
            rows.append({"id": rid, "raw": f"raw/{rid}.dcm", "target": target, "params": params,
                         "split": anatomy.split, "group": anatomy.name})
            if progress:
                progress(rid)
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if not make_zip:
        return folder
    zpath = folder.with_suffix(".zip")
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    shutil.rmtree(folder)
    return zpath
