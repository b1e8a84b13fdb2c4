"""DICOM radiograph → normalised image x in [0, 1] (design.md, remap step 1).

Pure functions `(arr, ds) -> arr`, in the manner of pydicom's `pixels.processing`, each naming
the part of the standard it implements. Decoding is pydicom's, with the pylibjpeg / pyjpegls
plugins behind its decoder registry: no hand-written codec here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from dicom_node.errors import UnsupportedImage

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def load_dataset(path: str | Path) -> Dataset:
    """Read a DICOM file, turning every way it can fail into UnsupportedImage."""
    path = Path(path)
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise UnsupportedImage(f"{path}: not a DICOM file (no DICM preamble or header)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedImage(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None


def check_radiograph(ds: Dataset) -> None:
    """Single-frame monochrome image with pixel data, or UnsupportedImage saying why."""
    if "PixelData" not in ds:
        raise UnsupportedImage("no Pixel Data: not an image")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedImage(f"Photometric Interpretation {photometric or 'missing'}: only MONOCHROME1/2 radiographs are enhanced")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedImage(f"{frames} frames: only single-frame images are enhanced")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(keyword) in (None, 0):
            raise UnsupportedImage(f"{keyword} missing or zero")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored values of the one frame, through pydicom's decoder registry."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedImage(f"transfer syntax {getattr(tsyntax, 'name', tsyntax)} cannot be decoded: {exc}") from None
    except Exception as exc:  # codecs raise ValueError/RuntimeError/... on truncated or corrupt data
        raise UnsupportedImage(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    if arr.shape != (ds.Rows, ds.Columns):
        raise UnsupportedImage(f"decoded pixel data has shape {arr.shape}, expected ({ds.Rows}, {ds.Columns})")
    return arr


def stored_range(ds: Dataset) -> tuple[int, int]:
    """Range of stored values that Bits Stored and Pixel Representation allow (PS3.3 C.7.6.3.1)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def modality_range(ds: Dataset) -> tuple[float, float]:
    """Range of the modality LUT output over the stored range (PS3.3 C.11.1)."""
    if "ModalityLUTSequence" in ds and ds.ModalityLUTSequence:
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float((1 << lut_bits) - 1)
    lo, hi = stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None:  # pydicom applies a rescale only when both are present
        return float(lo), float(hi)
    slope, intercept = float(slope), float(intercept)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], max(ends[1], ends[0] + 1.0)  # a zero slope must not divide by zero


def modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rescale Slope/Intercept or Modality LUT Sequence (PS3.3 C.11.1), via pydicom."""
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def normalise(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Scale the modality values to [0, 1] by the stored bit depth; MONOCHROME1 inverted so
    that higher means brighter (PS3.3 C.7.6.3.1.2)."""
    lo, hi = modality_range(ds)
    x = (arr - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        x = np.float32(1.0) - x
    return np.clip(x, 0.0, 1.0, out=x)


def read_radiograph(ds: Dataset) -> np.ndarray:
    """x in [0, 1], float32 (H, W), or UnsupportedImage saying why not."""
    check_radiograph(ds)
    return normalise(modality_lut(decode_pixels(ds), ds), ds)
