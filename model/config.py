"""What a model is: ModelConfig, stored in every checkpoint so that it rebuilds its own model,
and TeacherParams, the classical prior's global parameters it holds (model/teacher.py).

Torch-free, so the command line can build `dicom-node train`'s options from it without
importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("interpretable",)
PARAMETERISATIONS = ("relative", "absolute", "tissue", "prior")


@dataclass(frozen=True)
class TeacherParams:
    """The classical prior's global parameters (model/teacher.py says what each does). The
    defaults are the bundled model's; `dicom-node train` calibrates them to a site's archive
    (training/calibrate.py) and stores them in the checkpoint's ModelConfig.prior."""

    gain: float = 1.5  # detail gain of x - L_fine (> 1 sharpens)
    compression: float = 0.9  # of the low-pass L around the body's mean: 0 keeps it, 1 flattens it
    sigma: float = 0.06  # Gaussian sigma of L, fraction of the shorter side
    p_lo: float = 1.0  # percentiles of y inside the anatomy that set the window
    p_hi: float = 99.0
    ww_squeeze: float = 1.2  # ww = (P_hi - P_lo) / ww_squeeze
    work_size: int = 256
    min_ww: float = 0.02
    window_downsample: int = 8
    mid_gain: float = 1.5  # gain of the band L_fine - L (= gain: one detail gain, the teacher as it was)
    fine_sigma: float = 0.015  # sigma of L_fine; only used when mid_gain != gain
    gamma: float = 1.0  # tone curve y^gamma of the smooth level, before the window (1: none)

    def __post_init__(self):
        checks = {"gain": self.gain >= 0, "mid_gain": self.mid_gain >= 0, "compression": self.compression <= 1,
                  "sigma": 0 < self.sigma < 1, "fine_sigma": 0 < self.fine_sigma < 1,
                  "p_lo": 0 <= self.p_lo < self.p_hi <= 100, "ww_squeeze": self.ww_squeeze > 0,
                  "gamma": 0.1 <= self.gamma <= 10, "min_ww": 0 < self.min_ww < 1,
                  "work_size": self.work_size >= 8, "window_downsample": self.window_downsample >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"teacher parameters out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


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
    # the prior parameterisation: the classical teacher it corrects (calibrated by `train`), and
    # the Gaussian sigma (fraction of the shorter side) its corrections are smoothed by
    prior: TeacherParams = field(default_factory=TeacherParams)
    correction_bounds: tuple = field(default=(1.0, 1.5, 0.5, 1.0, 1.0), metadata={
        "help": "Prior parameterisation: bounds of the learned corrections (model/net.py): log-factor of a, "
                "log-factor of the compression, level shift in body spreads, wc shift in window widths, "
                "log-factor of ww.", "what": "five comma-separated numbers: a,kappa,level,wc,ww"})
    correction_sigma: float = field(default=0.06, metadata={
        "help": "Prior parameterisation: smoothness of the learned corrections (Gaussian sigma, fraction of the "
                "shorter side).", "min": 0.001})

    def __post_init__(self):
        if isinstance(self.prior, dict):  # as a checkpoint stores it
            object.__setattr__(self, "prior", TeacherParams(**self.prior))
        object.__setattr__(self, "correction_bounds", tuple(float(v) for v in self.correction_bounds))
        if len(self.correction_bounds) != 5 or min(self.correction_bounds) < 0:
            raise ValueError(f"correction_bounds must be five numbers >= 0, got {self.correction_bounds!r}")
        if not 0 < self.correction_sigma < 1:
            raise ValueError(f"correction_sigma must be within (0, 1), got {self.correction_sigma!r}")
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
