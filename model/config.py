"""What a model is: ModelConfig, stored in every checkpoint so that it rebuilds its own model.

Torch-free, so the command line can build `dicom-node train`'s options from it without
importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("interpretable",)
PARAMETERISATIONS = ("relative", "absolute", "tissue", "prior")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint."""

    # A field with a "help" is an option of `dicom-node train` (training.commands.options_from).
    arch: str = "interpretable"
    downsample: int = field(default=8, metadata={"help": "Model resolution: the maps are at 1/downsample.",
                                                 "choices": (4, 8, 16)})
    width: int = field(default=32, metadata={"help": "ResUNet feature width.", "min": 1})
    levels: int = 5
    parameterisation: str = field(default="prior", metadata={
        "help": "How the raw outputs become the maps (model/net.py).", "choices": PARAMETERISATIONS})
    min_ww: float = 0.02
    lowpass_radius: int = field(default=3, metadata={  # the L(x) of the relative parameterisation
        "help": "Radius (low-res px) of the fixed low-pass L(x) in the relative parameterisation.", "min": 0})
    lowpass_sigma: float = 0.06  # the tissue parameterisation's L: Gaussian sigma, fraction of the shorter side
    work_size: int = field(default=0, metadata={  # see InterpretableResUNet.forward
        "help": "Run the ResUNet on a copy of the /downsample image resized to this longer side (0: as is).", "min": 0})
    extra: dict = field(default_factory=dict)  # architecture-specific settings (baselines)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES and not self.arch.startswith("baseline:"):
            raise ValueError(f"arch must be one of {ARCHITECTURES} or 'baseline:*', got {self.arch!r}")
        if self.downsample not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"downsample must be a power of two up to 32, got {self.downsample!r}")
        if not 1 <= self.levels <= 7:
            raise ValueError(f"levels must be within 1..7, got {self.levels!r}")
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width!r}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")
        if not 0 < self.lowpass_sigma < 1:
            raise ValueError(f"lowpass_sigma must be within (0, 1), got {self.lowpass_sigma!r}")
        if self.work_size < 0:
            raise ValueError(f"work_size must be >= 0, got {self.work_size!r}")
        if not 0 < self.min_ww < 1:
            raise ValueError(f"min_ww must be within (0, 1), got {self.min_ww!r}")
