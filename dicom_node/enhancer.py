"""Radiograph dataset in → derived enhanced dataset out: reader → predictor → writer."""
from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.errors import UnsupportedImage
from dicom_node.reader import read_radiograph
from dicom_node.writer import MODES, OUTPUT_SYNTAXES, ModelStamp, derive_instance, encode_pixels
from model.predictor import Prediction, Predictor


#: What a derived instance (and its Parametric Map) is built from and points back to.
SOURCE_IDENTITY = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class Enhancer:
    """Loads the model once (lazily) and enhances one dataset per call; calls from several
    threads share network calls when `batch` > 1 (0: 8 on a GPU, 1 on the CPU)."""

    def __init__(self, weights: str | Path, device: str = "auto", mode: str = "voi", max_burnt_out: float = 0.0,
                 output_syntax: str = "explicit", batch: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if output_syntax not in OUTPUT_SYNTAXES:
            raise ValueError(f"output_syntax must be one of {', '.join(OUTPUT_SYNTAXES)}, got {output_syntax!r}")
        self.mode, self.output_syntax = mode, output_syntax
        self.predictor = Predictor(weights, device, max_burnt_out=max_burnt_out, batch=batch)

    @property
    def stamp(self) -> ModelStamp:
        return ModelStamp(name=self.predictor.name, identity=self.predictor.identity)

    def enhance(self, ds: Dataset) -> Dataset:
        """The new derived instance; UnsupportedImage for anything that is not a radiograph."""
        return self.enhance_with_prediction(ds)[0]

    def enhance_with_prediction(self, ds: Dataset) -> tuple[Dataset, Prediction]:
        """The derived instance and the Prediction it was written from (its maps feed the
        Parametric Map, `parametric_map(ds, prediction)`)."""
        missing = [k for k in SOURCE_IDENTITY if not ds.get(k)]
        if missing:
            raise UnsupportedImage(f"no {', '.join(missing)}: a derived instance must reference its source")
        x = read_radiograph(ds)
        burn_in = self.mode == "burn-in"
        prediction = self.predictor(x, want_z=burn_in)
        derived = derive_instance(
            ds,
            y=prediction.y.cpu().numpy(),
            z=prediction.z.cpu().numpy() if burn_in else None,
            window=prediction.window,
            stamp=self.stamp,
            mode=self.mode,
            guard_note=prediction.guard.describe() if prediction.guard else None,
        )
        return encode_pixels(derived, self.output_syntax), prediction

    def parametric_map(self, ds: Dataset, prediction: Prediction) -> Dataset:
        """The DICOM Parametric Map of the prediction's maps a, b, wc, ww, referencing `ds`."""
        from dicom_node.parametric_map import build_parametric_map

        return build_parametric_map(
            ds, maps=prediction.maps.detach().cpu().float().numpy(), downsample=prediction.downsample, stamp=self.stamp
        )
