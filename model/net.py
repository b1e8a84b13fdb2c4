"""The paper's ResUNet that predicts the four parameter maps a, b, wc, ww at low resolution.

Architecture (paper, section 2): 5 resolution levels, each a residual block of three
conv → InstanceNorm → LeakyReLU layers, a fixed width (32). Two additions, both measured
against the plain recipe (training/README notes): the input is normalised by robust image
statistics and those statistics plus pooled bottleneck features reach every decoder level
(global context), and the regional LUT is parameterised relative to the image:

    a = exp(s) * A_REF / spread(x)        b = t - a * L(x)

where L is a fixed low-pass of x and t the predicted local output level. Under an
acquisition change x' = alpha x + beta, spread and L move with the acquisition and t stays put,
so the network regresses quantities that do not depend on the acquisition.
The outputs still are plain maps a >= 0, b, wc in [0, 1], ww >= min_ww: the formula does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

MAP_NAMES = ("a", "b", "wc", "ww")
ARCHITECTURES = ("interpretable",)
PARAMETERISATIONS = ("relative", "absolute")
A_REF = 0.5  # a at s = 0 maps the image's robust spread onto half the output range


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint."""

    arch: str = "interpretable"
    downsample: int = 8
    width: int = 32
    levels: int = 5
    parameterisation: str = "relative"
    min_ww: float = 0.02
    lowpass_radius: int = 3  # low-res pixels, the L(x) of the relative parameterisation
    work_size: int = 0  # 0: the ResUNet runs on the /downsample image as it is; N: on a copy resized
    #                     so its longer side is at most N (see InterpretableResUNet.forward)
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
        if self.work_size < 0:
            raise ValueError(f"work_size must be >= 0, got {self.work_size!r}")
        if not 0 < self.min_ww < 1:
            raise ValueError(f"min_ww must be within (0, 1), got {self.min_ww!r}")


def conv_norm_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode="replicate"),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
    )


class ResidualBlock(nn.Module):
    """Three conv layers with an identity (or 1x1 projected) shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(conv_norm_act(c_in, c_out), conv_norm_act(c_out, c_out), conv_norm_act(c_out, c_out))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


def robust_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-image (p2, p50, p98, spread) of a (N, 1, h, w) image, as (N, 4)."""
    flat = x.flatten(1)
    if flat.shape[1] > 65536:  # quantile cost grows with size; a strided sample is plenty
        flat = flat[:, :: flat.shape[1] // 65536 + 1]
    q = torch.quantile(flat, torch.tensor([0.02, 0.5, 0.98], device=x.device, dtype=x.dtype), dim=1).T
    spread = (q[:, 2] - q[:, 0]).clamp_min(0.02)
    return torch.cat([q, spread[:, None]], dim=1)


class InterpretableResUNet(nn.Module):
    """Low-res normalised image (N, 1, h, w) in [0, 1] → maps (N, 4, h, w): a, b, wc, ww."""

    n_stats = 4

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        w, n = config.width, config.levels
        self.stem = ResidualBlock(2, w)
        self.down = nn.ModuleList([conv_norm_act(w, w, stride=2) for _ in range(n - 1)])
        self.enc = nn.ModuleList([ResidualBlock(w, w) for _ in range(n - 1)])
        self.context = nn.Sequential(nn.Linear(w + self.n_stats, w), nn.LeakyReLU(0.1), nn.Linear(w, w))
        self.dec = nn.ModuleList([ResidualBlock(2 * w, w) for _ in range(n - 1)])
        self.context_proj = nn.ModuleList([nn.Linear(w, w) for _ in range(n - 1)])
        self.head = nn.Conv2d(w, 4, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.config.levels - 1)

    def lowpass(self, x: torch.Tensor) -> torch.Tensor:
        r = self.config.lowpass_radius
        if r == 0:
            return x
        return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)

    def features(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        median, spread = stats[:, 1, None, None, None], stats[:, 3, None, None, None]
        normalised = (x - median) / spread
        h = self.stem(torch.cat([normalised, x], dim=1))
        skips = []
        for down, enc in zip(self.down, self.enc):
            skips.append(h)
            h = enc(down(h))
        context = self.context(torch.cat([h.mean(dim=(2, 3)), stats], dim=1))
        h = h + context[:, :, None, None]
        for dec, proj, skip in zip(self.dec, self.context_proj, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, skip], dim=1)) + proj(context)[:, :, None, None]
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With config.work_size, the ResUNet sees an area-resized copy whose longer side is at
        most work_size: the same anatomy then spans the same number of network pixels whatever
        the detector size (1000–4096 px), and the cost per image is bounded. Its raw outputs
        (log-gain s, level t, window c, w: all smooth) are resized back bilinearly, and the
        constraint still uses L(x) and the statistics of the full /downsample image, so the
        detail in b keeps the model's resolution."""
        h0, w0 = x.shape[-2:]
        stats = robust_stats(x)
        work = x
        size = self.config.work_size
        if size and max(h0, w0) > size:
            scale = size / max(h0, w0)
            hw = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            work = F.interpolate(x, size=hw, mode="area")
        h1, w1 = work.shape[-2:]
        # Pad to a multiple of 2**(levels-1), and to at least two pixels at the bottom level:
        # InstanceNorm cannot normalise a 1x1 map, which tiny or very thin inputs would reach.
        m = self.multiple
        pad_h, pad_w = max((-h1) % m, 2 * m - h1), max((-w1) % m, 2 * m - w1)
        padded = F.pad(work, (0, pad_w, 0, pad_h), mode="replicate")
        raw = self.head(self.features(padded, stats))[..., :h1, :w1]
        if (h1, w1) != (h0, w0):
            raw = F.interpolate(raw, size=(h0, w0), mode="bilinear", align_corners=False)
        return self.constrain(raw, x, stats)

    def constrain(self, raw: torch.Tensor, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        s, t, c, w = raw.unbind(dim=1)
        if self.config.parameterisation == "relative":
            a = torch.exp(s.clamp(-8.0, 8.0)) * (A_REF / stats[:, 3, None, None])
            b = torch.sigmoid(t) - a * self.lowpass(x)[:, 0]
        else:
            a = F.softplus(s)
            b = t
        wc = torch.sigmoid(c)
        ww = self.config.min_ww + F.softplus(w)
        return torch.stack([a, b, wc, ww], dim=1)


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes (baseline architectures register in training.baselines)."""
    if config.arch == "interpretable":
        return InterpretableResUNet(config)
    builder = BASELINE_BUILDERS.get(config.arch)
    if builder is None:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {ARCHITECTURES + tuple(BASELINE_BUILDERS)}")
    return builder(config)


# Baseline architectures add themselves here (name -> builder) so a checkpoint of any of
# them rebuilds through build_model without this package importing training/.
BASELINE_BUILDERS: dict = {}
