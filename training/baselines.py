"""The paper's Table 1 baselines, as models the training loop and `evaluate` handle like ours.

Every model here maps the full-resolution normalised image x (N, 1, H, W) in [0, 1] to the
displayed image z in [0, 1] in two steps, like the proposed model:

    out = model(downsample_image(x, config.downsample))   # the network, on the low-res image
    z = render(model, x, out)                             # a fixed rule applied at full resolution

For the proposed model `out` is the maps a, b, wc, ww and the rule is the shared remap. A
baseline has its own `out` and rule, `apply_rule(x, fields)`: `fields` is `out` itself for a per-image
output (`spatial = False`), or `out` bilinearly upsampled to x's pixels (`spatial = True`) exactly
as the proposed maps are. `render` does this for the whole image or a crop of it and
`render_points` for scattered pixels (both as the training loss needs them); `enhance(model, x)`
runs network and rule and returns Enhancement(z, maps), maps None for models without them.
A baseline is an `nn.Module` with a `.config`
(`ModelConfig(arch="baseline:<name>", ...)`, settings specific to it in `config.extra`),
built by `BASELINES` (name -> builder): pass it to `model.net.build_model` and
`model.checkpoint.load_checkpoint`, and a baseline checkpoint rebuilds like any other.

Learned baselines (paper, section 3):
  baseline:resunet-image  the same ResUNet backbone at downsample 8 predicting the enhanced image
                          itself at low resolution, upsampled bilinearly (the blurry baseline).
  baseline:dlbc           DLBC (Aboobacker et al. 2021): a CNN predicting one global window
                          (wc, ww), applied to x with the shared `sigmoid_window`; no regional LUT.
  baseline:lut            image-adaptive LUT (Zeng et al., "3DLUT", grayscale form): K learned basis
                          1-D LUTs of P points mixed by per-image weights from a small CNN, applied
                          to every full-resolution pixel by linear interpolation.
  baseline:sup-dce        Zero-DCE's curve x <- x + r (x^2 - x), 8 iterations with per-pixel r from
                          DCE-Net (run at low resolution, r upsampled, as Zero-DCE++), trained
                          supervised on the target.
Classical (no training): `clahe` here; the percentile window and the teacher-on-input
references live in `training.evaluate`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.net import InterpretableResUNet, ModelConfig, conv_norm_act, mirror_averaged, robust_stats
from model.remap import downsample_image, remap, sample_bilinear, sigmoid_window
from training.dataset import crop_maps


class Enhancement(NamedTuple):
    z: torch.Tensor  # (N, 1, H, W) displayed image in [0, 1]
    maps: torch.Tensor | None  # (N, 4, h, w) a, b, wc, ww for interpretable models, else None


def produces_maps(model: nn.Module) -> bool:
    """Whether the model's output is the interpretable a, b, wc, ww maps (map loss/MAE apply)."""
    return not hasattr(model, "apply_rule")


def render(model: nn.Module, x: torch.Tensor, out: torch.Tensor, top: int = 0, left: int = 0) -> torch.Tensor:
    """The displayed image z (N, 1, h, w) of x, the crop at (top, left) of the image whose
    low-resolution network output is `out`."""
    factor = model.config.downsample
    if produces_maps(model):
        if top == 0 and left == 0:  # the whole image, or its top-left crop: the inference path
            return remap(x, *out.split(1, dim=1), downsample=factor).z
        return remap(x, *crop_maps(out, top, left, tuple(x.shape[-2:]), factor).split(1, dim=1)).z
    fields = crop_maps(out, top, left, tuple(x.shape[-2:]), factor) if model.spatial else out
    return model.apply_rule(x, fields)


def render_points(model: nn.Module, x: torch.Tensor, out: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
    """z (N, P) at P full-resolution pixels (rows/cols rc (P, 2)) whose input values are x (N, P)."""
    if produces_maps(model):
        return remap(x, *sample_bilinear(out, rc[:, 0], rc[:, 1], model.config.downsample).unbind(1)).z
    x4 = x[:, None, None, :]  # (N, 1, 1, P): a one-row image
    fields = sample_bilinear(out, rc[:, 0], rc[:, 1], model.config.downsample)[:, :, None, :] if model.spatial else out
    return model.apply_rule(x4, fields)[:, 0, 0]


def enhance(model: nn.Module, x: torch.Tensor) -> Enhancement:
    """The displayed image (and the maps, where the model has them) of full-resolution x.

    x: (N, 1, H, W) or (H, W); the same two steps for the proposed model and every baseline.
    """
    x4 = x if x.dim() == 4 else x.reshape(1, 1, *x.shape[-2:])
    out = mirror_averaged(model, downsample_image(x4, model.config.downsample))  # as model.predictor
    return Enhancement(render(model, x4, out), out if produces_maps(model) else None)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")


class GlobalEncoder(nn.Module):
    """Small CNN: low-res image -> a feature vector (strided convs, global mean, image stats).

    The shared front end of the global baselines (DLBC, adaptive LUT). As in DLBC and 3DLUT the
    image is first resized to a fixed `size` square (the output is per image, so the aspect ratio
    matters less than a fixed receptive field); like the proposed model it sees the image
    normalised by its robust statistics, and the statistics themselves.
    """

    def __init__(self, width: int, levels: int, n_out: int, size: int = 64):
        super().__init__()
        if size < 2 ** (levels + 1):
            raise ValueError(f"encoder size {size} is too small for {levels} strided levels")
        self.size = size
        layers = [conv_norm_act(2, width)]
        layers += [conv_norm_act(width, width, stride=2) for _ in range(levels)]
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(width + 4, width), nn.LeakyReLU(0.1), nn.Linear(width, n_out))

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        stats = robust_stats(low)
        low = F.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        normalised = (low - stats[:, 1, None, None, None]) / stats[:, 3, None, None, None]
        h = self.convs(torch.cat([normalised, low], dim=1))
        return self.mlp(torch.cat([h.mean(dim=(2, 3)), stats], dim=1))


class ImageResUNet(InterpretableResUNet):
    """The proposed backbone with a one-channel head: the enhanced image at 1/downsample."""

    def __init__(self, config: ModelConfig):
        # the image head has no maps to parameterise: the backbone sees the image and its
        # statistics as the relative parameterisation does, whatever the config says
        super().__init__(replace(config, parameterisation="relative"))
        self.head = nn.Conv2d(config.width, 1, 1)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        """The enhanced image (N, 1, h, w) at low resolution."""
        h0, w0 = low.shape[-2:]
        stats = robust_stats(low)
        out = self.head(self.features(_pad_to_multiple(low, self.multiple), stats))[..., :h0, :w0]
        return torch.sigmoid(out)

    spatial = True

    def apply_rule(self, x, fields):
        return fields  # the upsampled image itself: x is not used at full resolution


class DLBC(nn.Module):
    """Global window only: z = sigmoid_window(x, wc, ww), (wc, ww) per image from a CNN.

    extra: encoder_size [64] (the CNN's fixed input side).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = GlobalEncoder(config.width, config.levels, 2, int(config.extra.get("encoder_size", 64)))

    def window(self, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, w = self.encoder(low).unbind(dim=1)
        return torch.sigmoid(c), self.config.min_ww + F.softplus(w)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        """The window (N, 2): wc, ww."""
        wc, ww = self.window(low)
        return torch.stack([wc, ww], dim=1)

    spatial = False

    def apply_rule(self, x, window):
        return sigmoid_window(x, window[:, 0, None, None, None], window[:, 1, None, None, None])


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-image 1-D LUT (N, P) sampled on [0, 1] applied to x (N, 1, H, W) by linear interpolation."""
    n, points = lut.shape
    pos = x.clamp(0.0, 1.0).reshape(n, -1) * (points - 1)
    i0 = pos.floor().long().clamp(0, points - 2)
    frac = pos - i0
    lo, hi = torch.gather(lut, 1, i0), torch.gather(lut, 1, i0 + 1)
    return torch.lerp(lo, hi, frac).reshape(x.shape)


class AdaptiveLUT(nn.Module):
    """Image-adaptive LUT, grayscale: z = clip(sum_k w_k(x) LUT_k(x), 0, 1), all at full resolution.

    extra: lut_bases [8], lut_points [33] (the paper's 3DLUT setting), encoder_size [64]. As in Zeng et al. the
    first basis starts as the identity and the others at zero, and the weights start at (1, 0, ...).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        k = int(config.extra.get("lut_bases", 8))
        p = int(config.extra.get("lut_points", 33))
        bases = torch.zeros(k, p)
        bases[0] = torch.linspace(0.0, 1.0, p)
        self.bases = nn.Parameter(bases)
        self.encoder = GlobalEncoder(config.width, config.levels, k, int(config.extra.get("encoder_size", 64)))
        last = self.encoder.mlp[-1]
        with torch.no_grad():
            last.weight.mul_(0.01)
            last.bias.zero_()
            last.bias[0] = 1.0

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        """The per-image LUT (N, P)."""
        return self.encoder(low) @ self.bases

    spatial = False

    def apply_rule(self, x, lut):
        return apply_lut(x, lut).clamp(0.0, 1.0)


class SupDCE(nn.Module):
    """Zero-DCE curves trained supervised: 8 iterations of x <- x + r_i (x^2 - x), r_i in [-1, 1].

    DCE-Net (7 convs of `width` features, symmetric skip concatenations, tanh head) runs on the
    image downsampled by config.downsample; the r maps are upsampled to full resolution
    (Zero-DCE++'s speed-up). extra: dce_iterations [8].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.iterations = int(config.extra.get("dce_iterations", 8))
        conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="replicate")  # noqa: E731
        self.c1, self.c2, self.c3, self.c4 = conv(1, w), conv(w, w), conv(w, w), conv(w, w)
        self.c5, self.c6, self.c7 = conv(2 * w, w), conv(2 * w, w), conv(2 * w, self.iterations)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        """The r maps (N, iterations, h, w) at low resolution."""
        h1 = F.relu(self.c1(low))
        h2 = F.relu(self.c2(h1))
        h3 = F.relu(self.c3(h2))
        h4 = F.relu(self.c4(h3))
        h5 = F.relu(self.c5(torch.cat([h3, h4], 1)))
        h6 = F.relu(self.c6(torch.cat([h2, h5], 1)))
        return torch.tanh(self.c7(torch.cat([h1, h6], 1)))

    spatial = True

    def apply_rule(self, x, r):
        z = x.clamp(0.0, 1.0)
        for i in range(self.iterations):
            z = z + r[:, i : i + 1] * (z * z - z)
        return z


BASELINES = {
    "baseline:resunet-image": ImageResUNet,
    "baseline:dlbc": DLBC,
    "baseline:lut": AdaptiveLUT,
    "baseline:sup-dce": SupDCE,
}


def baseline_config(name: str, **overrides) -> ModelConfig:
    """The config of a learned baseline as Table 1 trains it ("dlbc" or "baseline:dlbc")."""
    arch = name if name.startswith("baseline:") else f"baseline:{name}"
    if arch not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    defaults = {
        "baseline:resunet-image": dict(downsample=8, width=32, levels=5),
        "baseline:dlbc": dict(downsample=8, width=32, levels=4),
        "baseline:lut": dict(downsample=8, width=32, levels=4, extra={"lut_bases": 8, "lut_points": 33}),
        "baseline:sup-dce": dict(downsample=8, width=32, levels=5, extra={"dce_iterations": 8}),
    }[arch]
    return ModelConfig(arch=arch, **{**defaults, **overrides})


def clahe(x: np.ndarray, clip_limit: float = 0.01, kernel_fraction: float = 1 / 8) -> np.ndarray:
    """Classical CLAHE (scikit-image) on the normalised image: the no-training regional reference.

    The input's own min..max is stretched to the full range first (as `equalize_adapthist` does);
    the contextual regions are `kernel_fraction` of each side.
    """
    from skimage.exposure import equalize_adapthist

    x = np.asarray(x, dtype=np.float32)
    kernel = tuple(max(8, int(round(s * kernel_fraction))) for s in x.shape)
    return equalize_adapthist(x, kernel_size=kernel, clip_limit=clip_limit).astype(np.float32)
