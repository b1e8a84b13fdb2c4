"""Real radiographs as a radiologist sees them: variants, the methods compared, and the metrics.

Real CR/DX files have no ground truth, so the enhancement is judged by what a viewer shows and
how steady it is (the real-radiograph issue):

  burnt out       % of body pixels displayed > 0.98 or < 0.02 (pure white or pure black)
  local contrast  RMS of the display minus its Gaussian blur (sigma 8 px) over the body, as a
                  ratio to the same figure for the file's own window
  structure SSIM  SSIM (scikit-image, data_range 1) of the display against a percentile window
                  of the clean image, averaged over the body: are the structures still there?
  consistency     over smooth gain/offset perturbations of one image (training.perturb, as in
                  synth): the mean over body pixels of the outputs' standard deviation divided
                  by that of the inputs, on body pixels that none of the method's outputs
                  saturates, on /4 copies (the perturbations are smooth). Lower is steadier.

The body mask is `model.anatomy.find_anatomy_mask` of the original (clean) image, carried
through each variant's geometric change (rotation and crop, downscale), so every method and
every variant of one image is judged on the same anatomy: collimation, direct exposure and the
lead marker are left out.

A display is what a conformant viewer shows: stored pixels -> modality LUT -> the file's first
VOI window (LINEAR or SIGMOID, pydicom's `apply_voi_lut`) -> MONOCHROME1 inverted -> [0, 1].
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset

from model.anatomy import find_anatomy_mask
from model.remap import downsample_image
from model.teacher import teacher_on_input
from training.evaluate import percentile_window_reference  # reference (A): a window from the image's own 1st/99th percentiles

SATURATED = (0.02, 0.98)
CONTRAST_SIGMA = 8.0


# ---- what a viewer shows --------------------------------------------------------------------

def viewer_display(ds: Dataset) -> np.ndarray:
    """The display in [0, 1] of a DICOM image as a conformant viewer shows it (module docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = copy.copy(ds)  # pydicom's windowing normalises a few tags in place
    stored = ds.pixel_array
    values = apply_modality_lut(stored, ds)
    bits = int(ds.BitsStored)
    lo, hi = (0.0, float(2**bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 0 else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if "ModalityLUTSequence" in ds:
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        lo, hi = sorted((lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
    shown = apply_voi_lut(values, ds, index=0) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else values
    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    display = (np.asarray(shown, dtype=np.float64) - lo) / max(hi - lo, 1e-9)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        display = 1.0 - display
    return np.clip(display, 0.0, 1.0).astype(np.float32)


def clahe(x: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image, clip 0.01)."""
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(np.clip(x, 0, 1), clip_limit=0.01).astype(np.float32)


def teacher_display(x: np.ndarray) -> np.ndarray:
    """The classical teacher run on the input with the mask it finds itself."""
    return teacher_on_input(x).remap(x)[1]


# ---- metrics ---------------------------------------------------------------------------------

def burnt_out(display: np.ndarray, body: np.ndarray) -> float:
    """Fraction of body pixels shown pure white (> 0.98) or pure black (< 0.02)."""
    shown = display[body]
    return float(((shown > SATURATED[1]) | (shown < SATURATED[0])).mean())


def local_contrast(display: np.ndarray, body: np.ndarray) -> float:
    """RMS of the display minus its Gaussian blur (sigma CONTRAST_SIGMA px) over the body."""
    from scipy import ndimage

    detail = display.astype(np.float64) - ndimage.gaussian_filter(display.astype(np.float64), CONTRAST_SIGMA)
    return float(np.sqrt(np.mean(detail[body] ** 2)))


def structure_ssim(display: np.ndarray, reference: np.ndarray, body: np.ndarray) -> float:
    """Mean over the body of the SSIM map of the display against a reference presentation."""
    from skimage.metrics import structural_similarity

    _, ssim_map = structural_similarity(reference.astype(np.float32), display.astype(np.float32), data_range=1.0, full=True)
    return float(ssim_map[body].mean())


def consistency(outputs: list[np.ndarray], inputs: list[np.ndarray], body: np.ndarray) -> float:
    """Spread of the outputs over the perturbations / spread of the inputs, on the body pixels no
    output saturates, at /4 (module docstring)."""
    def quarter(img):
        return downsample_image(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), 4)[0, 0].numpy()

    out = np.stack([quarter(o) for o in outputs])
    raw = np.stack([quarter(i) for i in inputs])
    mask = quarter(body.astype(np.float32)) > 0.99
    mask &= ~((out > SATURATED[1]) | (out < SATURATED[0])).any(axis=0)
    if mask.sum() < 16:
        return float("nan")
    return float(out.std(axis=0)[mask].mean() / max(raw.std(axis=0)[mask].mean(), 1e-9))


# ---- variants of a real radiograph ----------------------------------------------------------

@dataclass
class Variant:
    """One DICOM input derived from a base image, with its body mask (same geometry)."""

    image: str  # the base image's name
    name: str  # original, mono-twin, 12-bit, rotated-cropped, downscaled, j2k-lossy, perturbed-N
    ds: Dataset
    body: np.ndarray
    clean_x: np.ndarray  # x of the unperturbed image in this geometry (the structure reference)
    perturbed: bool = False
    x: np.ndarray = field(default=None, repr=False)  # x as the node reads it

    def __post_init__(self):
        if self.x is None:
            from dicom_node.reader import read_radiograph

            self.x = read_radiograph(self.ds)


def _stored(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.int64)


def _with_pixels(ds: Dataset, stored: np.ndarray, *, bits: int | None = None, photometric: str | None = None,
                 uid_suffix: str) -> Dataset:
    """A copy of ds with new stored pixels (uncompressed, explicit VR little endian) and new UIDs."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = copy.deepcopy(ds)
    bits = int(out.BitsStored) if bits is None else bits
    out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = 16, bits, bits - 1, 0
    out.Rows, out.Columns = stored.shape
    if photometric:
        out.PhotometricInterpretation = photometric
    out.PixelData = np.clip(stored, 0, 2**bits - 1).astype("<u2").tobytes()
    out["PixelData"].VR = "OW"
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in out:
            del out[keyword]
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), uid_suffix])
    return out


def _scale_window(out: Dataset, factor: float, invert_top: float | None = None) -> None:
    """Keep the file's own window on the same anatomy after its stored values were rescaled (and
    possibly inverted about invert_top)."""
    if "WindowCenter" not in out:
        return
    centers = out.WindowCenter if out["WindowCenter"].VM > 1 else [out.WindowCenter]
    widths = out.WindowWidth if out["WindowWidth"].VM > 1 else [out.WindowWidth]
    new_c = [float(c) * factor if invert_top is None else invert_top - float(c) * factor for c in centers]
    new_w = [float(w) * factor for w in widths]
    out.WindowCenter = [f"{v:.6g}"[:16] for v in new_c] if len(new_c) > 1 else f"{new_c[0]:.6g}"[:16]
    out.WindowWidth = [f"{v:.6g}"[:16] for v in new_w] if len(new_w) > 1 else f"{new_w[0]:.6g}"[:16]


def mono_twin(ds: Dataset) -> Dataset:
    """The same image in the other photometric interpretation: stored values inverted, window moved
    with them, so a viewer shows exactly the same picture."""
    top = 2 ** int(ds.BitsStored) - 1
    other = "MONOCHROME2" if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1" else "MONOCHROME1"
    out = _with_pixels(ds, top - _stored(ds), photometric=other, uid_suffix="mono-twin")
    _scale_window(out, 1.0, invert_top=top)
    return out


def other_bit_depth(ds: Dataset) -> tuple[str, Dataset]:
    """The image stored at another bit depth (12 bits, or 14 for a file stored in 12 or fewer)."""
    bits = int(ds.BitsStored)
    new = 14 if bits <= 12 else 12
    factor = (2**new - 1) / (2**bits - 1)
    out = _with_pixels(ds, np.rint(_stored(ds) * factor).astype(np.int64), bits=new, uid_suffix=f"{new}-bit")
    _scale_window(out, factor)
    return f"{new}-bit", out


def _resample_stored(stored: np.ndarray, fn) -> np.ndarray:
    return np.rint(fn(stored.astype(np.float64))).astype(np.int64)


def rotated_cropped(ds: Dataset, body: np.ndarray, angle: float = 8.0, keep: float = 0.8):
    """Rotated by `angle` degrees and cropped to the central `keep` of each side (no filled corner)."""
    from scipy import ndimage

    def geometry(img, order):
        turned = ndimage.rotate(img, angle, reshape=False, order=order, mode="nearest")
        h, w = turned.shape
        dh, dw = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
        return turned[dh:h - dh, dw:w - dw]

    out = _with_pixels(ds, _resample_stored(_stored(ds), lambda s: geometry(s, 1)), uid_suffix="rotated-cropped")
    return out, geometry(body.astype(np.float32), 1) > 0.5, geometry


def downscaled(ds: Dataset, body: np.ndarray, factor: int = 2):
    """Area-downsampled by an integer factor (a smaller detector matrix)."""
    def geometry(img, order=1):
        return downsample_image(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), factor)[0, 0].numpy()

    out = _with_pixels(ds, _resample_stored(_stored(ds), geometry), uid_suffix="downscaled")
    return out, geometry(body.astype(np.float32)) > 0.5, geometry


def perturbed(ds: Dataset, x: np.ndarray, rng: np.random.Generator, k: int) -> Dataset:
    """x' = alpha(p) x + beta(p) (training.perturb), stored as the source stores its pixels."""
    from training.perturb import random_perturbation

    xp = random_perturbation(x, rng).apply(x)
    bits = int(ds.BitsStored)
    top = 2**bits - 1
    stored = np.rint(np.clip(xp, 0, 1) * top).astype(np.int64)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        stored = top - stored
    return _with_pixels(ds, stored, uid_suffix=f"perturbed-{k}")


def lossy_copy(path: Path) -> Dataset | None:
    """pydicom-data's lossy JPEG 2000 copy of one of its radiographs (RGn_UNCR -> RGn_J2KI)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    if "_UNCR" not in path.name:
        return None
    found = get_testdata_file(path.name.replace("_UNCR", "_J2KI"))
    return dcmread(found) if found else None


def variants(path: Path, ds: Dataset, perturbations: int = 6, seed: int = 0,
             kinds: tuple = ("mono-twin", "bit-depth", "rotated-cropped", "downscaled", "j2k-lossy")) -> list[Variant]:
    """The original, its variants and `perturbations` smooth gain/offset perturbations."""
    from dicom_node.reader import read_radiograph

    name = path.stem
    x = read_radiograph(ds)
    body = find_anatomy_mask(x)
    out = [Variant(name, "original", ds, body, x, x=x)]
    if "mono-twin" in kinds:
        out.append(Variant(name, "mono-twin", mono_twin(ds), body, x))
    if "bit-depth" in kinds:
        label, other = other_bit_depth(ds)
        out.append(Variant(name, label, other, body, x))
    if "rotated-cropped" in kinds:
        turned, turned_body, geometry = rotated_cropped(ds, body)
        out.append(Variant(name, "rotated-cropped", turned, turned_body, geometry(x, 1)))
    if "downscaled" in kinds:
        small, small_body, geometry = downscaled(ds, body)
        out.append(Variant(name, "downscaled", small, small_body, geometry(x)))
    if "j2k-lossy" in kinds:
        lossy = lossy_copy(path)
        if lossy is not None:
            out.append(Variant(name, "j2k-lossy", lossy, body, x))
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    for k in range(perturbations):
        out.append(Variant(name, f"perturbed-{k}", perturbed(ds, x, rng, k), body, x, perturbed=True))
    return out


# ---- measuring methods on the variants -------------------------------------------------------

def classical_methods() -> dict:
    """name -> (Variant -> display) for the methods that need no model."""
    return {
        "own window": lambda v: viewer_display(v.ds),
        "percentile window": lambda v: percentile_window_reference(v.x),
        "CLAHE": lambda v: clahe(v.x),
        "teacher on input": lambda v: teacher_display(v.x),
    }


def enhancer_method(enhancer) -> callable:
    """Variant -> display of the derived instance an Enhancer (dicom_node.enhancer) writes."""
    return lambda v: viewer_display(enhancer.enhance(v.ds))


@dataclass
class Measured:
    rows: list[dict]  # one per (variant, method): burnt, contrast, contrast_ratio, ssim
    consistency: dict  # (image, method) -> consistency
    twin_difference: dict  # (image, method) -> mean |display(twin) - display(original)| over the body
    displays: dict  # (image, variant, method) -> display, for the contact sheet (originals only)


def measure(all_variants: list[Variant], methods: dict, keep_displays: tuple = ("original",)) -> Measured:
    rows, displays, consistency_inputs = [], {}, {}
    originals: dict = {}
    for v in all_variants:
        reference = percentile_window_reference(v.clean_x)
        own_contrast = None
        for method, show in methods.items():
            display = show(v)
            if display.shape != v.body.shape:
                raise ValueError(f"{method} on {v.image}/{v.name}: display {display.shape} vs body {v.body.shape}")
            contrast = local_contrast(display, v.body)
            if method == "own window":
                own_contrast = contrast
            rows.append({"image": v.image, "variant": v.name, "method": method, "burnt": burnt_out(display, v.body),
                         "contrast": contrast, "ssim": structure_ssim(display, reference, v.body)})
            if v.perturbed:
                consistency_inputs.setdefault((v.image, method), ([], [], v.body))[0].append(display)
                consistency_inputs[(v.image, method)][1].append(v.x)
            if v.name in ("original", "mono-twin"):
                originals[(v.image, v.name, method)] = display
            if v.name in keep_displays:
                displays[(v.image, v.name, method)] = display
        for row in rows:
            if row["image"] == v.image and row["variant"] == v.name:
                row["contrast_ratio"] = row["contrast"] / own_contrast if own_contrast else float("nan")
    steadiness = {key: consistency(outs, ins, body) for key, (outs, ins, body) in consistency_inputs.items()}
    twins = {}
    for (image, name, method), display in originals.items():
        if name == "mono-twin" and (image, "original", method) in originals:
            body = next(v.body for v in all_variants if v.image == image and v.name == "original")
            twins[(image, method)] = float(np.abs(display - originals[(image, "original", method)])[body].mean())
    return Measured(rows=rows, consistency=steadiness, twin_difference=twins, displays=displays)
