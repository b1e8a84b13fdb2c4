"""The parameter maps a, b, wc, ww as a DICOM Parametric Map (PS3.3 A.75), built with highdicom.

This is what makes an enhancement verifiable by a third party from two DICOM objects alone: the
source radiograph and this Parametric Map. With x from the source (design.md, remap step 1) and
the four maps from here, `y = clip(a*x + b, 0, 1)` and `z = 1/(1 + exp(-4(y - wc)/ww))`
reproduce the enhanced image.

What is stored, and why
- The maps at the model's resolution (1/downsample of the source in each direction), float32,
  exactly the numbers the network produced: one frame per map, each frame with its own Real
  World Value Mapping (identity slope/intercept, LUT Label "a", "b", "wc" or "ww", unit UCUM "1",
  LUT Explanation naming the formula). Full resolution would add 16 bytes per source pixel
  (about 58 MB for a 1955x1841 CR) of data that carries no more information: the full-resolution
  maps are a fixed bilinear upsampling of these.
- The upsampling is standard bilinear interpolation with half-pixel centres and clamp-to-edge,
  which the geometry below states in physical terms: map pixel (i, j) is centred on source pixel
  (i*d + (d-1)/2, j*d + (d-1)/2), d = the downsample factor. Interpolating a map at the source's
  pixel centres, values beyond the outermost map samples held constant, gives the full-resolution
  map (`model.remap.upsample_maps` does exactly this; `source_pixel_spacing` and the Plane
  Position/Pixel Measures of this object give the same numbers to any other resampler).

Geometry of a radiograph without a frame of reference
CR and DX images have no Frame of Reference and no patient-space position (a projection has
none), while the Parametric Map IOD makes the Frame of Reference module and the Pixel Measures,
Plane Position (Patient) and Plane Orientation (Patient) functional groups mandatory. Instead of
dropping the object we give it a new Frame of Reference of its own, the plane of the source
image, with a UID derived deterministically from the source SOP Instance UID (so every map of
the same radiograph shares it):
- origin (0, 0, 0) = the centre of the source's first (top-left) pixel; Position Reference
  Indicator empty (Type 2: no anatomical reference point exists);
- axes along the source's rows and columns: Image Orientation (Patient) from the source's
  Patient Orientation when it names two single orthogonal directions (e.g. L\\F for a PA chest
  gives 1\\0\\0\\0\\0\\-1), else the nominal 1\\0\\0\\0\\1\\0;
- spacing = the source's Pixel Spacing, else its Imager Pixel Spacing, else a nominal 1 mm when
  the source states none (`source_pixel_spacing`); the map's Pixel Spacing is d times that and
  its Image Position (Patient) is ((d-1)/2 pixels, (d-1)/2 pixels) from the origin.
The Derivation Image Sequence says Spatial Locations Preserved NO (the grids differ) and points at
the source image, as does the Source Image Sequence.

UIDs: SOP Instance and Series Instance UIDs come from `writer.derived_uid` (kinds
"parametric-map" and "parametric-map-series"), so processing the same image with the same model
again gives the same UIDs and a retry can never duplicate the object in PACS.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from dicom_node.writer import DERIVATION_PREFIX, PRIVATE_CREATOR, PRIVATE_GROUP, ModelStamp, derived_uid

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
MAP_NAMES = ("a", "b", "wc", "ww")  # the frame order; model.net.MAP_NAMES, without importing torch
KIND = "parametric-map"
UID_MODE = "maps"  # the maps do not depend on the output mode (voi / burn-in): one object for both
LUT_EXPLANATIONS = {  # LO, at most 64 characters each
    "a": "slope a of y = clip(a*x + b, 0, 1); x, y on [0, 1]",
    "b": "offset b of y = clip(a*x + b, 0, 1); x, y on [0, 1]",
    "wc": "centre wc of z = 1/(1 + exp(-4(y - wc)/ww)); y on [0, 1]",
    "ww": "width ww of z = 1/(1 + exp(-4(y - wc)/ww)); y on [0, 1]",
}
NOMINAL_SPACING = (1.0, 1.0)
_DIRECTIONS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}
_TYPE_2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                       "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_NOT_FROM_SOURCE = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "FrameOfReferenceUID",
                    "PositionReferenceIndicator", "ImageOrientationPatient", "ImagePositionPatient",
                    "PixelSpacing", "SliceThickness")
_LUT_LABEL = 0x00409210  # (0040,9210) LUT Label
_RWVM_SEQUENCE = 0x00409096  # (0040,9096) Real World Value Mapping Sequence


@dataclass(frozen=True)
class MapsFromDicom:
    """The maps as read back from a Parametric Map, ready for `model.remap.remap`."""

    maps: dict[str, np.ndarray]  # name -> (h, w) float32, exactly as stored
    downsample: int  # source pixels per map pixel, from the geometry
    source_uid: str  # SOP Instance UID of the source image


def frame_of_reference_uid(source_sop_instance_uid: str) -> UID:
    """The Frame of Reference of a source image that has none: one per source image."""
    return generate_uid(entropy_srcs=["dicom-node frame of reference", str(source_sop_instance_uid)])


def source_pixel_spacing(source: Dataset) -> tuple[float, float]:
    """(row, column) spacing of the source in the map's frame of reference: Pixel Spacing, else
    Imager Pixel Spacing, else nominal 1 mm (both values must be positive to count)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        try:
            spacing = (float(value[0]), float(value[1]))
        except (TypeError, ValueError, IndexError):
            continue
        if all(math.isfinite(s) and s > 0 for s in spacing):
            return spacing
    return NOMINAL_SPACING


def image_orientation(source: Dataset) -> list[float]:
    """Row and column direction cosines from Patient Orientation, else the nominal 1\\0\\0\\0\\1\\0."""
    orientation = source.get("PatientOrientation")
    values = [str(v).strip().upper() for v in orientation] if orientation and not isinstance(orientation, str) else []
    if len(values) == 2 and all(v in _DIRECTIONS for v in values):
        row, col = _DIRECTIONS[values[0]], _DIRECTIONS[values[1]]
        if sum(r * c for r, c in zip(row, col)) == 0:
            return [float(v) for v in row + col]
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _validate(source: Dataset, maps: np.ndarray, downsample: int, stamp: ModelStamp) -> None:
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        if keyword not in source:
            raise ValueError(f"source has no {keyword}")
    if not isinstance(stamp, ModelStamp):
        raise TypeError(f"stamp must be a ModelStamp, got {type(stamp).__name__}")
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    if not isinstance(maps, np.ndarray) or maps.dtype != np.float32:
        raise TypeError(f"maps must be a float32 numpy array, got {getattr(maps, 'dtype', type(maps).__name__)}")
    rows, cols = int(source.Rows), int(source.Columns)
    expected = (len(MAP_NAMES), -(-rows // downsample), -(-cols // downsample))
    if maps.shape != expected:
        raise ValueError(f"maps must have shape {expected} (a, b, wc, ww of a {rows}x{cols} image at 1/{downsample}), got {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("maps must be finite")


def _geometry_source(source: Dataset, spacing: tuple[float, float], orientation: list[float]) -> Dataset:
    """The source's attributes without its pixels, placed in the frame of reference of its plane
    (a new Dataset: the source is never modified)."""
    geometry = Dataset()
    for element in source:
        if element.keyword not in _NOT_FROM_SOURCE:
            geometry.add(copy.deepcopy(element))  # highdicom shares elements with the map it builds
    for keyword in _TYPE_2_FROM_SOURCE:  # highdicom reads these; Type 2 in the map: empty if unknown
        if keyword not in geometry:
            setattr(geometry, keyword, None)
    geometry.FrameOfReferenceUID = frame_of_reference_uid(source.SOPInstanceUID)
    geometry.PositionReferenceIndicator = ""
    geometry.ImageOrientationPatient = orientation
    geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
    geometry.PixelSpacing = list(spacing)
    geometry.SliceThickness = None  # a projection has no slice thickness; highdicom reads the key
    return geometry


def _software_version() -> str:
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parametric_map(source: Dataset, *, maps: np.ndarray, downsample: int, stamp: ModelStamp):
    """The Parametric Map of the four maps predicted for `source` (see the module docstring).

    maps: (4, h, w) float32 a, b, wc, ww at the model's resolution, h = ceil(Rows / downsample),
    w = ceil(Columns / downsample): `Prediction.maps`. Returns a highdicom ParametricMap (a
    pydicom Dataset) with file meta, ready to save or send.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _validate(source, maps, downsample, stamp)
    spacing = source_pixel_spacing(source)
    orientation = image_orientation(source)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    offset = (downsample - 1) / 2.0
    position = offset * spacing[1] * row_dir + offset * spacing[0] * col_dir

    mappings = []
    for name, values in zip(MAP_NAMES, maps):
        mappings.append([hd.pm.RealWorldValueMapping(
            lut_label=name,
            lut_explanation=LUT_EXPLANATIONS[name],
            unit=codes.UCUM.NoUnits,
            value_range=(float(values.min()), float(values.max())),
            slope=1.0,
            intercept=0.0,
        )])
    series_description = f"{source.get('SeriesDescription', '') or source.get('Modality', '')} enhancement maps".strip()
    pm = hd.pm.ParametricMap(
        source_images=[_geometry_source(source, spacing, orientation)],
        pixel_array=np.ascontiguousarray(np.moveaxis(maps, 0, -1)[None]),  # (1 plane, h, w, 4 maps)
        series_instance_uid=derived_uid(source.SeriesInstanceUID, stamp, UID_MODE, KIND + "-series"),
        series_number=int(source.get("SeriesNumber") or 0) + 2000,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, stamp, UID_MODE, KIND),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer="dicom-node",
        manufacturer_model_name=stamp.name[:64],
        software_versions=_software_version(),
        device_serial_number=stamp.identity[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings,
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ENHANCEMAPS",
        content_description=f"a, b, wc, ww at 1/{downsample}; bilinear to source grid"[:64],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[downsample * spacing[0], downsample * spacing[1]], slice_thickness=None),
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", orientation),
        plane_positions=[hd.PlanePositionSequence("PATIENT", [float(v) for v in position])],
        series_description=series_description[-64:],
    )
    _finish(pm, source, maps, downsample, stamp)
    return pm


def _finish(pm: Dataset, source: Dataset, maps: np.ndarray, downsample: int, stamp: ModelStamp) -> None:
    """What highdicom leaves to the caller: frames told apart by their map, a window per map,
    General Series Laterality, and our marker."""
    # Dimension Index: the four frames share one plane position, so the map (LUT Label) is a
    # second dimension; without it all frames would have the same Dimension Index Values.
    organisation = pm.DimensionIndexSequence[0].DimensionOrganizationUID
    index = Dataset()
    index.DimensionOrganizationUID = organisation
    index.DimensionIndexPointer = _LUT_LABEL
    index.FunctionalGroupPointer = _RWVM_SEQUENCE
    index.DimensionDescriptionLabel = "Parameter map"
    pm.DimensionIndexSequence.append(index)
    # A window per frame over the map's own range (a spans other values than wc), so a viewer
    # opens every map with usable contrast.
    shared = pm.SharedFunctionalGroupsSequence[0]
    del shared.FrameVOILUTSequence
    if "SpacingBetweenSlices" in shared.PixelMeasuresSequence[0]:  # one projection plane: no slices
        del shared.PixelMeasuresSequence[0].SpacingBetweenSlices
    for number, (frame, values) in enumerate(zip(pm.PerFrameFunctionalGroupsSequence, maps), start=1):
        frame.FrameContentSequence[0].DimensionIndexValues = [1, number]
        lo, hi = float(values.min()), float(values.max())
        voi = Dataset()
        voi.WindowCenter = f"{(lo + hi) / 2:.6g}"
        voi.WindowWidth = f"{max(hi - lo, 1e-6):.6g}"
        voi.VOILUTFunction = "LINEAR_EXACT"  # widths below 1 are only allowed with an exact function
        voi.WindowCenterWidthExplanation = f"{MAP_NAMES[number - 1]} min to max"
        frame.FrameVOILUTSequence = [voi]
    # General Series Laterality (Type 2C): as the source says, else empty (unknown / unpaired).
    pm.Laterality = source.get("Laterality", "") or source.get("ImageLaterality", "") or ""
    if pm.Laterality not in ("", "L", "R"):
        pm.Laterality = ""
    pm.DerivationDescription = f"{DERIVATION_PREFIX}; parameter maps; model {stamp.name} sha256:{stamp.identity}"
    block = pm.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", stamp.name[:64])
    block.add_new(0x02, "LO", stamp.identity[:64])
    block.add_new(0x03, "CS", "MAPS")
    block.add_new(0x04, "US", downsample)


def downsample_factor(pm: Dataset, source: Dataset) -> int:
    """Source pixels per map pixel, from the two objects' standard geometry attributes alone."""
    map_spacing = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    ratios = [m / s for m, s in zip(map_spacing, source_pixel_spacing(source))]
    factor = round(ratios[0])
    if factor < 1 or any(abs(r - factor) > 1e-3 * factor for r in ratios):
        raise ValueError(f"pm's Pixel Spacing {map_spacing} is not an integer multiple of the source's")
    return factor


def read_parametric_map(pm: Dataset, source: Dataset) -> MapsFromDicom:
    """The four maps of `pm` (written by `build_parametric_map`) for the image `source`, from
    standard attributes only: frame LUT Labels, Real World Value Mapping, Pixel Measures."""
    for name, value in (("pm", pm), ("source", source)):
        if not isinstance(value, Dataset):
            raise TypeError(f"{name} must be a pydicom Dataset, got {type(value).__name__}")
    if str(pm.get("SOPClassUID", "")) != PARAMETRIC_MAP_STORAGE:
        raise ValueError(f"pm is not a Parametric Map (SOP Class {pm.get('SOPClassUID', 'missing')})")
    referenced = {str(item.ReferencedSOPInstanceUID) for item in pm.get("SourceImageSequence", [])}
    if str(source.get("SOPInstanceUID")) not in referenced:
        raise ValueError(f"pm was not derived from source {source.get('SOPInstanceUID')} (it references {sorted(referenced)})")
    frames = pm.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    shared = pm.SharedFunctionalGroupsSequence[0]
    maps: dict[str, np.ndarray] = {}
    for frame, item in zip(frames, pm.PerFrameFunctionalGroupsSequence):
        mapping = (item.get("RealWorldValueMappingSequence") or shared.RealWorldValueMappingSequence)[0]
        slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
        values = np.asarray(frame, dtype=np.float32)
        if (slope, intercept) != (1.0, 0.0):
            values = (values * np.float32(slope) + np.float32(intercept)).astype(np.float32)
        maps[str(mapping.LUTLabel)] = values
    missing = [name for name in MAP_NAMES if name not in maps]
    if missing:
        raise ValueError(f"pm has no frame labelled {', '.join(missing)}")
    return MapsFromDicom(maps=maps, downsample=downsample_factor(pm, source), source_uid=str(source.SOPInstanceUID))
