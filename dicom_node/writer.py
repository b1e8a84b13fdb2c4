"""The derived instance the node writes for an enhanced radiograph (design.md, "What the node writes").

One constructor, `derive_instance`, that validates its input the way highdicom's constructors do
and builds a new Dataset; the source dataset is never modified.
"""
from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import dataclass

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID, generate_uid
from pydicom.valuerep import format_number_as_ds

MODES = ("voi", "burn-in")
#: config.OUTPUT_TRANSFER_SYNTAXES (the names [model] output_transfer_syntax takes) -> transfer syntax.
OUTPUT_SYNTAXES = {"explicit": uid.ExplicitVRLittleEndian, "jpeg2000-lossless": uid.JPEG2000Lossless,
                   "rle": uid.RLELossless, "jpeg-ls-lossless": uid.JPEGLSLossless}
CR_STORAGE = uid.ComputedRadiographyImageStorage
DX_FOR_PRESENTATION = uid.DigitalXRayImageStorageForPresentation
DX_FOR_PROCESSING = uid.DigitalXRayImageStorageForProcessing
# Classes whose IOD makes the Modality LUT (Rescale) mandatory: DX family (PS3.3 C.8.11.3).
REQUIRES_RESCALE = {DX_FOR_PRESENTATION, DX_FOR_PROCESSING,
                    uid.DigitalMammographyXRayImageStorageForPresentation,
                    uid.DigitalMammographyXRayImageStorageForProcessing,
                    uid.DigitalIntraOralXRayImageStorageForPresentation,
                    uid.DigitalIntraOralXRayImageStorageForProcessing}
#: The classes meant by the modality names of [model] enhance and of synthetic archives.
SOP_CLASSES_BY_MODALITY = {"CR": (CR_STORAGE,), "DX": (DX_FOR_PRESENTATION, DX_FOR_PROCESSING)}


def enhanced_classes(entries: tuple[str, ...]) -> frozenset[str]:
    """[model] enhance entries (CR, DX or SOP Class UIDs) as SOP Class UIDs: the node's rule for
    what is enhanced (everything else passes through), shared by the worker and `enhance`."""
    uids: set[str] = set()
    for entry in entries:
        uids.update(SOP_CLASSES_BY_MODALITY.get(entry.upper(), (entry,)))
    return frozenset(uids)


FOR_PROCESSING_TO_PRESENTATION = {
    DX_FOR_PROCESSING: DX_FOR_PRESENTATION,
    "1.2.840.10008.5.1.4.1.1.1.2.1": "1.2.840.10008.5.1.4.1.1.1.2",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "1.2.840.10008.5.1.4.1.1.1.3",
}

# Our marker, recognised on any instance so a derived image is never enhanced twice.
PRIVATE_GROUP = 0x0013
PRIVATE_CREATOR = "DICOM-NODE ENHANCE 1"
DERIVATION_PREFIX = "dicom-node interpretable-mapping enhancement"

# Elements describing the source's pixel encoding or presentation, replaced in the derived image.
_DROPPED = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "SmallestImagePixelValue",
    "LargestImagePixelValue", "PixelPaddingValue", "PixelPaddingRangeLimit", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence",
    "ModalityLUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType", "IconImageSequence",
    "PlanarConfiguration", "RedPaletteColorLookupTableDescriptor", "SourceImageSequence",
    "DerivationCodeSequence", "SOPInstanceUID", "SeriesInstanceUID", "PresentationLUTShape",
    "PresentationLUTSequence", "ReferencedImageSequence", "PixelAspectRatio",
)
_LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                   "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203"}


@dataclass(frozen=True)
class ModelStamp:
    """What the derived instance says about the model that made it."""

    name: str
    identity: str  # content hash of the checkpoint


def derived_uid(source_uid: str, stamp: ModelStamp, mode: str, kind: str) -> UID:
    """Deterministic UID: the same source, model and mode always give the same UID."""
    return generate_uid(entropy_srcs=[kind, str(source_uid), stamp.identity, mode])


def is_derived_by_us(ds: Dataset) -> bool:
    """True for an instance any dicom-node derived: our private creator or our derivation text.
    Image Type DERIVED alone proves nothing: modalities send DERIVED images too."""
    creator_tag = (PRIVATE_GROUP << 16) | 0x0010
    for offset in range(0x10, 0x100):
        element = ds.get((PRIVATE_GROUP << 16) | offset)
        if element is not None and str(element.value).strip() == PRIVATE_CREATOR:
            return True
        if (PRIVATE_GROUP << 16) | offset > creator_tag + 0x10:
            break
    return str(ds.get("DerivationDescription", "")).startswith(DERIVATION_PREFIX)


def _validate(source: Dataset, y: np.ndarray, window: tuple[float, float], z: np.ndarray | None, mode: str):
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        if keyword not in source:
            raise ValueError(f"source has no {keyword}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    shape = (int(source.Rows), int(source.Columns))
    if not isinstance(y, np.ndarray) or y.shape != shape:
        raise ValueError(f"y must be a numpy array of the source's shape {shape}, got {getattr(y, 'shape', type(y))}")
    if mode == "burn-in" and (not isinstance(z, np.ndarray) or z.shape != shape):
        raise ValueError(f"burn-in mode needs z of the source's shape {shape}")
    wc, ww = window
    if not (0.0 <= wc <= 1.0 and 0.0 < ww):
        raise ValueError(f"window must have wc in [0, 1] and ww > 0, got {window}")


def _to_uint16(values: np.ndarray) -> bytes:
    return np.rint(np.clip(values, 0.0, 1.0) * 65535.0).astype("<u2").tobytes()


def _ds_str(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2)."""
    return format_number_as_ds(float(value))


def derive_instance(
    source: Dataset,
    *,
    y: np.ndarray,
    window: tuple[float, float],
    stamp: ModelStamp,
    mode: str = "voi",
    z: np.ndarray | None = None,
    guard_note: str | None = None,
) -> Dataset:
    """The new derived instance of an enhanced radiograph.

    y: regional-LUT output in [0, 1]; window: aggregate (wc, ww) on [0, 1]; z: per-pixel window
    output, needed for mode "burn-in"; guard_note: what the window guard changed, if it did (in
    the Derivation Description and the private block). Patient, study and equipment identity are
    kept; pixel encoding, UIDs, image type and presentation are new.
    """
    _validate(source, y, window, z, mode)
    ds = Dataset()
    for element in source:
        if element.tag.group == 0x0002 or element.tag.is_private or element.keyword in _DROPPED:
            continue
        if element.tag.group in (0x6000, 0x6002, 0x6004, 0x6006):  # overlays belong to the source pixels
            continue
        ds.add(copy.deepcopy(element))  # a copy: setting a value on ds must never edit the source

    source_class = str(source.SOPClassUID)
    sop_class = FOR_PROCESSING_TO_PRESENTATION.get(source_class, source_class)
    now = _dt.datetime.now(_dt.timezone.utc)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derived_uid(source.SOPInstanceUID, stamp, mode, "sop")
    ds.SeriesInstanceUID = derived_uid(source.SeriesInstanceUID, stamp, mode, "series")
    ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + 1000
    description = f"{source.get('SeriesDescription', '') or source.get('Modality', '')} enhanced".strip()
    ds.SeriesDescription = description[-64:]
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    old_type = list(source.get("ImageType", [])) if source.get("ImageType") else []
    ds.ImageType = ["DERIVED", "PRIMARY" if sop_class in REQUIRES_RESCALE else "SECONDARY"] + old_type[2:]
    ds.DerivationDescription = f"{DERIVATION_PREFIX}; model {stamp.name} sha256:{stamp.identity}; mode {mode}"
    if guard_note:
        ds.DerivationDescription += f"; {guard_note}"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = Sequence([reference])
    if sop_class != source_class:
        ds.PresentationIntentType = "FOR PRESENTATION"

    # Image Pixel module (PS3.3 C.7.6.3): 16-bit unsigned MONOCHROME2, higher is brighter.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = _to_uint16(y if mode == "voi" else z)
    ds["PixelData"].VR = "OW"
    if sop_class in REQUIRES_RESCALE or ("RescaleSlope" in source and "RescaleIntercept" in source):
        # an identity Modality LUT where the IOD requires one (DX, CT, ...): the stored values
        # are the presentation's, in no physical unit
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    if sop_class in REQUIRES_RESCALE:
        ds.PixelIntensityRelationshipSign = -1  # higher value = less beam intensity = brighter
        ds.PresentationLUTShape = "IDENTITY"  # DX: MONOCHROME2 is shown as stored (PS3.3 C.8.11.3.1.2)
    lossy = source.get("LossyImageCompression") == "01" or source.file_meta.get("TransferSyntaxUID") in _LOSSY_SYNTAXES
    ds.LossyImageCompression = "01" if lossy else "00"

    # VOI LUT module (PS3.3 C.11.2): the presentation as tags, re-windowable by the reader.
    if mode == "voi":
        wc, ww = window
        ds.WindowCenter, ds.WindowWidth = _ds_str(65535.0 * wc), _ds_str(65535.0 * ww)
        ds.VOILUTFunction = "SIGMOID"
        ds.WindowCenterWidthExplanation = "ENHANCED SIGMOID"
    else:
        ds.WindowCenter, ds.WindowWidth = "32768", "65536"
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "FULL RANGE"

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", stamp.name[:64])
    block.add_new(0x02, "LO", stamp.identity[:64])
    block.add_new(0x03, "CS", mode.upper().replace("-", "_"))
    if guard_note:
        block.add_new(0x04, "LO", guard_note[:64])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def encode_pixels(ds: Dataset, syntax: str) -> Dataset:
    """`ds` (a derived instance, Explicit VR Little Endian) with its pixels encoded losslessly in
    the OUTPUT_SYNTAXES `syntax`, by pydicom's encoders (RLE natively, JPEG 2000 through
    pylibjpeg-openjpeg, JPEG-LS through pyjpegls); decoding gives the same pixels back exactly."""
    if syntax not in OUTPUT_SYNTAXES:
        raise ValueError(f"output transfer syntax must be one of {', '.join(OUTPUT_SYNTAXES)}, got {syntax!r}")
    if syntax != "explicit":
        ds.compress(OUTPUT_SYNTAXES[syntax], generate_instance_uid=False)
    return ds
