"""What a training run is: TrainConfig, holding the ModelConfig of the model it trains.

Torch-free: `dicom-node train`'s options are built from these fields (training.commands), so
their names, defaults and help are written once, here and in model.config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ModelConfig


def setting(default, help: str = "", **option):
    """A TrainConfig field. With `help`, `dicom-node train` offers it as an option built from the
    field itself (training.commands.options_from): --name-with-dashes, this default, this help;
    `option` says more: min / max (a range), choices, multiple, flag (a switch that sets the
    opposite of the default), name (another option name), what (a list's format, for its error)."""
    return field(default=default, metadata={"help": help, **option} if help else {})


@dataclass
class TrainConfig:
    """One training run: the model it trains (a ModelConfig, stored in the checkpoint) and how."""

    archive: str = ""
    out: str = "var/train/model.pt"
    model: ModelConfig = field(default_factory=ModelConfig)  # or a Table 1 baseline's (training.baselines.baseline_config)
    epochs: int = setting(30, "Epochs (the cosine decay spans them all).", min=1)
    lr: float = setting(1e-3, "Peak learning rate (Adam), after a linear warm-up.")
    min_lr_ratio: float = 0.02  # cosine decays to lr * this
    warmup_steps: int = 50
    batch: int = setting(4, "Global batch: samples per optimizer step, over all processes.", min=1)
    crop: int = setting(512, "Full-res crop side (image term).", min=32)
    points: int = setting(16384, "Full-res pixels scattered over the whole image in the image term (0: crop only).", min=0)
    image_weight: float = setting(1.0, "Weight of the image MSE term.")
    robust_scale: float = setting(0.002, "0: image term = MSE; t > 0: t log(1 + MSE / t) per sample "
                                  "(a few unfittable samples weigh less).", min=0)
    correction_weight: float = setting(0.0, "Prior parameterisation: weight of the mean squared correction in the "
                                       "loss (0: none).", min=0)
    map_weights: tuple = setting((0.05, 0.05, 0.05, 0.05), "Weights of the a,b,wc,ww MSE terms (Eqn 1: all 1; "
                                 "docs/training.md).", what="four comma-separated weights: a,b,wc,ww")
    patience: int = setting(10, "Early stop after N epochs without a better validation loss.", min=1)
    max_minutes: float = setting(0.0, "Stop before an epoch would pass this wall time (0: none).")
    seed: int = setting(0, "Model initialisation, sample order and augmentation are functions of the seed.")
    device: str = "cpu"  # `dicom-node train --device` (auto: CUDA when present)
    threads: int = setting(0, "Torch threads per process (0: cores/processes).")
    augment: bool = setting(True, "Disable on-the-fly augmentation.", flag="--no-augment")
    real_fraction: float = setting(0.34, "Share of each epoch drawn from the real radiographs (groups real-*), "
                                   "with heavier augmentation.", min=0, max=0.9)
    hold_out: tuple = setting((), "Leave the rows of this group (prefix) out of training and validation; "
                              "repeatable.", multiple=True)
    cache: str = setting("", "Cache folder for decoded inputs (default: beside the archive).")
    resume: str = ""  # `dicom-node train --resume W`: continue the run whose best checkpoint is W
    stop_after_epochs: int = 0  # stop (as if interrupted) once this many epochs are done; 0 = never
    calibrate: bool = setting(True, "Do not calibrate the prior's parameters to the training split first "
                              "(training/calibrate.py).", flag="--no-calibrate")
    calibration_images: int = setting(16, "Training images the prior is calibrated on.", min=1)
    calibration_evaluations: int = 500  # Nelder–Mead's budget
    progress: bool = setting(True, "No progress bar (per-epoch lines only).", flag="--no-progress")
