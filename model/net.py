"""The paper's ResUNet that predicts the four parameter maps a, b, wc, ww at low resolution.

Architecture (paper, section 2): 5 resolution levels, each a residual block of three
conv → InstanceNorm → LeakyReLU layers, a fixed width (32). Additions, each measured against
the plain recipe (docs/training.md): the input is normalised by robust image statistics and
those statistics plus pooled bottleneck features reach every decoder level (global context),
and the regional LUT is parameterised like the teacher's tissue equalisation ("tissue", the
default):

    y = a (x - L) + kappa (L - median(x)) + level,   i.e.  b = level + (kappa - a) L - kappa median
    a = exp(s) * A_REF / spread(x),   kappa = sigmoid(k) * A_REF / spread(x),   level = sigmoid(t)

where L = G*(x m) / G*(m) is the normalised Gaussian low-pass of x inside a predicted anatomy
weight m (sigma a fixed fraction of the image, as the teacher's), a the detail gain and kappa
the compression of the low-pass. Under an acquisition change x' = alpha x + beta the spread,
median and L move with the acquisition while s, k, t and m stay put, and what is left for the
network to predict is smooth: it does not have to re-create the anatomy's edges in b.
"relative" (b = level - a * box-lowpass(x), the previous default) and "absolute" (a, b
regressed directly) remain for old checkpoints and comparisons.
The outputs still are plain maps a >= 0, b, wc in [0, 1], ww >= min_ww: the formula does not change.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ARCHITECTURES, ModelConfig

MAP_NAMES = ("a", "b", "wc", "ww")
A_REF = 0.5  # a at s = 0 maps the image's robust spread onto half the output range
LOWPASS_WORK = 64  # px, longer side of the copy the tissue parameterisation's L is computed on
# The prior parameterisation's learned corrections (InterpretableResUNet.corrected_teacher), in the
# order of ModelConfig.correction_bounds: a and kappa within a factor exp(Ba), exp(Bk) of the
# prior's, the level within Bl of the body's spread, wc within Bc of the prior's window width, ww
# within a factor exp(Bw).
CORRECTIONS = ("a", "kappa", "level", "wc", "ww")


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


def robust_stats(x: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image (p2, p50, p98, spread) of a (N, 1, h, w) image, as (N, 4); with a body mask
    (N, 1, h, w), of the pixels inside it."""
    levels = torch.tensor([0.02, 0.5, 0.98], device=x.device, dtype=x.dtype)
    rows = []
    for i in range(x.shape[0]):
        values = x[i].flatten() if body is None else x[i][body[i] > 0.5]
        if values.numel() < 16:
            values = x[i].flatten()
        if values.numel() > 65536:  # quantile cost grows with size; a strided sample is plenty
            values = values[:: values.numel() // 65536 + 1]
        rows.append(torch.quantile(values, levels))
    q = torch.stack(rows)
    spread = (q[:, 2] - q[:, 0]).clamp_min(0.02)
    return torch.cat([q, spread[:, None]], dim=1)


def body_masks(x: torch.Tensor, downsample: int) -> torch.Tensor:
    """The classical anatomy mask (model.anatomy) of each image of a (N, 1, h, w) batch at
    1/downsample of the full resolution, as 0/1."""
    from model.anatomy import find_anatomy_mask

    found = [torch.from_numpy(find_anatomy_mask(img[0].detach().float().cpu().numpy(), downsample)) for img in x]
    return torch.stack(found)[:, None].to(device=x.device, dtype=x.dtype)


class InterpretableResUNet(nn.Module):
    """Low-res normalised image (N, 1, h, w) in [0, 1] → maps (N, 4, h, w): a, b, wc, ww."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        w, n = config.width, config.levels
        self.prior = config.parameterisation == "prior"
        # sees the image only through its robust statistics (and, with the prior, its body mask)
        self.invariant = config.parameterisation in ("tissue", "prior")
        n_stats = 3 if self.prior else 2 if self.invariant else 4
        self.stem = ResidualBlock(1 if config.parameterisation == "tissue" else 2, w)
        self.down = nn.ModuleList([conv_norm_act(w, w, stride=2) for _ in range(n - 1)])
        self.enc = nn.ModuleList([ResidualBlock(w, w) for _ in range(n - 1)])
        self.context = nn.Sequential(nn.Linear(w + n_stats, w), nn.LeakyReLU(0.1), nn.Linear(w, w))
        self.dec = nn.ModuleList([ResidualBlock(2 * w, w) for _ in range(n - 1)])
        self.context_proj = nn.ModuleList([nn.Linear(w, w) for _ in range(n - 1)])
        self.head = nn.Conv2d(w, 5 if self.prior else 6 if self.invariant else 4, 1)
        if self.prior:  # a zero correction at the start: the untrained model is the teacher
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def corrects(self) -> bool:
        """False for a prior model whose head is all zeros (its untrained start, which training
        keeps when no epoch beats it): its correction is exactly zero, so at inference the network
        need not run and a mirrored pass adds nothing (mirror_averaged). Training runs it."""
        return not self.prior or bool(self.head.weight.any() or self.head.bias.any())

    @property
    def multiple(self) -> int:
        return 2 ** (self.config.levels - 1)

    def lowpass(self, x: torch.Tensor) -> torch.Tensor:
        r = self.config.lowpass_radius
        if r == 0:
            return x
        return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)

    def features(self, x: torch.Tensor, stats: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
        median, spread = stats[:, 1, None, None, None], stats[:, 3, None, None, None]
        normalised = (x - median) / spread
        if self.invariant:
            # Only what a global gain/offset of the acquisition leaves unchanged: the network's
            # raw outputs, and so y (module docstring), are then exactly invariant to it.
            image, summary = normalised, (stats[:, [0, 2]] - stats[:, 1:2]) / stats[:, 3:4]
            if body is not None:
                image = torch.cat([normalised, body], dim=1)
                summary = torch.cat([summary, body.mean(dim=(1, 2, 3))[:, None]], dim=1)
        else:
            image, summary = torch.cat([normalised, x], dim=1), stats
        h = self.stem(image)
        skips = []
        for down, enc in zip(self.down, self.enc):
            skips.append(h)
            h = enc(down(h))
        context = self.context(torch.cat([h.mean(dim=(2, 3)), summary], dim=1))
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
        body = body_masks(x, self.config.downsample) if self.prior else None
        stats = robust_stats(x, body)
        work = x if body is None else torch.cat([x, body], dim=1)
        size = self.config.work_size
        if size and max(h0, w0) > size:
            scale = size / max(h0, w0)
            hw = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            work = F.interpolate(work, size=hw, mode="area")
        h1, w1 = work.shape[-2:]
        # Pad to a multiple of 2**(levels-1), and to at least two pixels at the bottom level:
        # InstanceNorm cannot normalise a 1x1 map, which tiny or very thin inputs would reach.
        m = self.multiple
        pad_h, pad_w = max((-h1) % m, 2 * m - h1), max((-w1) % m, 2 * m - w1)
        padded = F.pad(work, (0, pad_w, 0, pad_h), mode="replicate")
        image, work_body = (padded, None) if body is None else (padded[:, :1], padded[:, 1:])
        if not self.training and not self.corrects():  # the head would output exact zeros
            raw = x.new_zeros(x.shape[0], self.head.out_channels, h0, w0)
        else:
            raw = self.head(self.features(image, stats, work_body))[..., :h1, :w1]
            if (h1, w1) != (h0, w0):
                raw = F.interpolate(raw, size=(h0, w0), mode="bilinear", align_corners=False)
        if self.prior:
            return self.corrected_teacher(raw, x, stats, body)
        return self.constrain(raw, x, stats)

    def tissue_lowpass(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Normalised convolution G*(x m) / G*(m), the teacher's L, with a predicted anatomy
        weight m: Gaussian sigma = lowpass_sigma x the shorter side, computed on a copy whose
        longer side is at most LOWPASS_WORK px (the kernel is large), resized back bilinearly."""
        h, w = x.shape[-2:]
        scale = min(1.0, LOWPASS_WORK / max(h, w))
        hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        both = F.interpolate(torch.cat([x * weight, weight], dim=1), size=hw, mode="area")
        sigma = max(self.config.lowpass_sigma * min(hw), 0.5)
        radius = max(1, min(int(3 * sigma), max(hw) - 1))
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).repeat(2, 1, 1)
        both = F.conv2d(F.pad(both, (radius, radius, 0, 0), mode="replicate"), kernel[:, :, None, :], groups=2)
        both = F.conv2d(F.pad(both, (0, 0, radius, radius), mode="replicate"), kernel[:, :, :, None], groups=2)
        fallback = (both[:, :1].sum(dim=(2, 3), keepdim=True) / both[:, 1:].sum(dim=(2, 3), keepdim=True).clamp_min(1e-6))
        low = (both[:, :1] + 1e-3 * fallback) / (both[:, 1:] + 1e-3)
        return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)

    def constrain(self, raw: torch.Tensor, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        s, t, c, w = raw[:, :4].unbind(dim=1)
        if self.config.parameterisation == "tissue":
            # y = a (x - L) + kappa (L - median) + level (module docstring)
            compression, anatomy = raw[:, 4], torch.sigmoid(raw[:, 5:6])
            unit = A_REF / stats[:, 3, None, None]
            a = torch.exp(s.clamp(-8.0, 8.0)) * unit
            kappa = torch.sigmoid(compression) * unit
            L = self.tissue_lowpass(x, anatomy)[:, 0]
            b = torch.sigmoid(t) + (kappa - a) * L - kappa * stats[:, 1, None, None]
        elif self.config.parameterisation == "relative":
            a = torch.exp(s.clamp(-8.0, 8.0)) * (A_REF / stats[:, 3, None, None])
            b = torch.sigmoid(t) - a * self.lowpass(x)[:, 0]
        else:
            a = F.softplus(s)
            b = t
        wc = torch.sigmoid(c)
        ww = self.config.min_ww + F.softplus(w)
        return torch.stack([a, b, wc, ww], dim=1)


    def corrected_teacher(self, raw: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        """The prior parameterisation: the classical prior's maps (model.teacher.prior_maps, with
        the config's calibrated parameters) computed on the input itself, each moved by a
        bounded learned correction (config.correction_bounds). A raw output of zero is the prior, so an
        image unlike any seen in training degrades towards it instead of anywhere the network's
        extrapolation leads.

            a     = g exp(Ba tanh s)                      detail gain
            kappa = (1 - k) exp(Bk tanh r)                low-pass compression
            level = mean_body(L) + Bl spread tanh t        level of the body
            wc    = wc_p + Bc ww_p tanh c,   ww = ww_p exp(Bw tanh w)
        where each tanh is blurred by a Gaussian of sigma config.correction_sigma, and wc_p, ww_p
        the prior's window: its percentiles of the corrected y over the body's interior."""
        from model.teacher import masked_lowpass, prior_maps

        prior = self.config.prior
        # The corrections are smooth: what they are for (a smooth gain/offset field of the
        # acquisition, a regional level, a site's local contrast) is smooth, and a correction
        # with pixel detail would only add noise to the prior's exact detail.
        n, _, h, w = raw.shape
        bounded = torch.tanh(raw[:, :5]).reshape(n * 5, 1, h, w)
        smooth = masked_lowpass(bounded, torch.ones_like(bounded), self.config.correction_sigma,
                                prior.work_size).reshape(n, 5, h, w)
        self.correction_energy = (smooth ** 2).mean()  # for an optional penalty in training
        # the teacher judges its window at 1/window_downsample of the full image; this is 1/downsample
        factor = max(1, prior.window_downsample // self.config.downsample)
        bounds = dict(zip(CORRECTIONS, self.config.correction_bounds))
        return prior_maps(x, body, prior, smooth, bounds, stats[:, 3], factor)


def mirror_averaged(model: nn.Module, low: torch.Tensor) -> torch.Tensor:
    """Inference with test-time mirror averaging: the mean of the network's output for the
    image and for its left-right mirror (mirrored back where the output is spatial).

    A radiograph's appearance does not depend on which side is left, so the two predictions
    estimate the same maps; their mean has less error (measured: +0.4 dB PSNR) for twice the
    network time (the remap, the expensive part at full resolution, runs once). The mean of
    valid maps is valid: a >= 0, ww >= min_ww still hold. A prior model without a correction
    (InterpretableResUNet.corrects) is the teacher: one pass (its mirror agrees to 66-140 dB)."""
    out = model(low)
    if not model.training and not getattr(model, "corrects", lambda: True)():
        return out
    mirrored = model(low.flip(-1))
    if mirrored.dim() == 4 and mirrored.shape[-2:] == low.shape[-2:]:
        mirrored = mirrored.flip(-1)
    return (out + mirrored) / 2


ModelBuilder = Callable[[ModelConfig], nn.Module]


def build_model(config: ModelConfig, baselines: Mapping[str, ModelBuilder] | None = None) -> nn.Module:
    """The model a config describes. Other architectures ("baseline:<name>") are built by the
    builder `baselines` names for them (training.baselines.BASELINES): this package never
    imports training/, so whoever loads a baseline says how to build it."""
    if config.arch == "interpretable":
        return InterpretableResUNet(config)
    baselines = baselines or {}
    builder = baselines.get(config.arch)
    if builder is None:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {ARCHITECTURES + tuple(baselines)}")
    return builder(config)
