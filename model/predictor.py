"""Inference as pre_process → predict → post_process (the MONAI Deploy operator shape).

The model is loaded once, lazily, on the chosen device; everything after the network is the
shared `remap` so inference computes exactly what training optimised.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.batching import DynamicBatcher
from model.checkpoint import Checkpoint, load_checkpoint
from model.net import MAP_NAMES, ModelBuilder, mirror_averaged
from model.remap import SATURATION_REACH, downsample_image, remap, sigmoid_window, upsample_maps, warm_up, window_guard


#: Images per network call on a GPU by default (`batch=0`), and how long the first of a batch
#: waits for the others.
GPU_BATCH = 8
BATCH_WAIT_SECONDS = 0.02


def full_float32_on_cuda() -> None:
    """cuDNN and cuBLAS run float32 in TF32 (a 10-bit mantissa) by default on Ampere and later,
    ~1e-3 from the CPU's maps; a derived instance's UIDs do not depend on the device, so its
    pixels must not either."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def resolve_device(device: str) -> torch.device:
    """auto = the first CUDA device when present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
        return torch.device(device)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass(frozen=True)
class Guarded:
    """What the window guard did: the anatomy's burnt-out fraction before and after, and the
    widening (wc' = wc + shift * ww, ww' = scale * ww)."""

    burnt_before: float
    burnt_after: float
    shift: float
    scale: float

    def describe(self) -> str:
        return (f"window guard: widened x{self.scale:.2f}, shifted {self.shift:+.2f} ww "
                f"(burnt-out anatomy {100 * self.burnt_before:.1f} % -> {100 * self.burnt_after:.1f} %)")


@dataclass
class Prediction:
    """The enhancement of one image: y and z at full resolution, the maps at low resolution."""

    x: torch.Tensor  # (H, W) normalised input
    y: torch.Tensor  # (H, W) after the regional LUT
    z: torch.Tensor | None  # (H, W) after the per-pixel window; None when not asked for
    maps: torch.Tensor  # (4, h, w) a, b, wc, ww at the model's resolution
    downsample: int
    window: tuple[float, float]  # robust aggregate (wc, ww) over the image
    guard: Guarded | None = None  # set when the window guard widened the window

    def full_maps(self) -> dict[str, np.ndarray]:
        """a, b, wc, ww upsampled to full resolution (as the remap used them)."""
        up = upsample_maps(self.maps[None], tuple(self.x.shape), self.downsample)[0]
        return {name: up[i].cpu().numpy() for i, name in enumerate(MAP_NAMES)}

    def z_aggregate(self) -> torch.Tensor:
        """The presentation a viewer shows for `voi` output: y under the aggregate window."""
        return sigmoid_window(self.y, *self.window)


def aggregate_window(maps: torch.Tensor) -> tuple[float, float]:
    """Median of the wc and ww maps: one window the DICOM VOI LUT tags can carry."""
    return float(maps[2].median()), float(maps[3].median())


class Predictor:
    """pre_process -> predict -> post_process, then the window guard.

    max_burnt_out (0 = off): the window guard. Where the presentation would show more than this
    fraction of the anatomy (model.anatomy's mask) pure white or black, the window is widened per
    image, as little as that takes (model.remap.window_guard). It is a seat belt for anatomy the
    model never saw, recorded in the Prediction; the model itself is meant not to need it."""

    def __init__(self, weights: str | Path, device: str = "auto", max_burnt_out: float = 0.0,
                 baselines: Mapping[str, ModelBuilder] | None = None, batch: int = 0):
        if not 0 <= max_burnt_out < 1:
            raise ValueError(f"max_burnt_out must be within [0, 1), got {max_burnt_out!r}")
        if not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch must be an integer >= 0 (0: {GPU_BATCH} on a GPU, 1 on the CPU), got {batch!r}")
        self.weights = Path(weights)
        self.device = resolve_device(device)
        # Same-size images that threads predict at about the same time share one network call
        # (model.batching): a GPU's gain. On the CPU one at a time is as fast and uses less memory.
        self.batch = batch or (GPU_BATCH if self.device.type == "cuda" else 1)
        self._batcher = DynamicBatcher(self.predict_batch, self.batch, BATCH_WAIT_SECONDS) if self.batch > 1 else None
        if self.device.type == "cuda":  # inference only: training keeps TF32's speed
            full_float32_on_cuda()
        self.max_burnt_out = max_burnt_out
        self.baselines = baselines  # builders of other architectures (model.net.build_model)
        self._checkpoint: Checkpoint | None = None

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            checkpoint = load_checkpoint(self.weights, self.device, self.baselines)
            if self.device.type == "cpu":  # the remap's compiled kernel, now rather than on the first image
                warm_up(checkpoint.config.downsample)
            self._checkpoint = checkpoint
        return self._checkpoint

    @property
    def identity(self) -> str:
        return self.checkpoint.identity

    @property
    def name(self) -> str:
        return self.checkpoint.name

    def pre_process(self, x: np.ndarray) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D normalised image, got shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._batcher is not None:
            return self._batcher(x, tuple(x.shape))
        low = downsample_image(x, self.checkpoint.config.downsample)
        return mirror_averaged(self.checkpoint.model, low)[0]

    @torch.inference_mode()
    def predict_batch(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The maps (N, 4, h, w) of N same-size images (pre_process'ed) in one network call: what
        a GPU gains from several images at once. Each image's maps are those `predict` gives it
        alone (the network treats the images of a batch independently)."""
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs images of one size, got {sorted(shapes)}")
        low = downsample_image(torch.stack(xs)[:, None], self.checkpoint.config.downsample)
        return mirror_averaged(self.checkpoint.model, low)

    def enhance_batch(self, images: list[np.ndarray], want_z: bool = True) -> list[Prediction]:
        """`__call__` for several same-size images, the network run once for all of them."""
        xts = [self.pre_process(x) for x in images]
        maps = self.predict_batch(xts)
        predictions = [self.post_process(xt, m, want_z=want_z) for xt, m in zip(xts, maps)]
        if self.max_burnt_out:
            predictions = [self.guarded(p, x, per_pixel=want_z) for p, x in zip(predictions, images)]
        return predictions

    @torch.inference_mode()
    def post_process(self, x: torch.Tensor, maps: torch.Tensor, want_z: bool = True) -> Prediction:
        factor = self.checkpoint.config.downsample
        a, b, wc, ww = maps[:, None, None].unbind(0)  # each (1, 1, h, w)
        y, z = remap(x, a, b, wc, ww, downsample=factor, want_z=want_z)
        return Prediction(x=x, y=y, z=z if want_z else None, maps=maps, downsample=factor, window=aggregate_window(maps))

    def __call__(self, x: np.ndarray, want_z: bool = True) -> Prediction:
        """want_z: the per-pixel window's presentation (burn-in) is computed, and guarded; else the
        aggregate window's (voi)."""
        xt = self.pre_process(x)
        prediction = self.post_process(xt, self.predict(xt), want_z=want_z)
        if self.max_burnt_out:
            prediction = self.guarded(prediction, x, per_pixel=want_z)
        return prediction

    @torch.inference_mode()
    def guarded(self, p: Prediction, x: np.ndarray, per_pixel: bool) -> Prediction:
        """The prediction with its window widened where the presentation would burn out more of
        the anatomy than max_burnt_out (class docstring)."""
        from model.anatomy import find_anatomy_mask

        body = torch.from_numpy(find_anatomy_mask(x)).to(p.y.device)
        if per_pixel:
            full = upsample_maps(p.maps[None, 2:], tuple(p.y.shape), p.downsample)[0]
            u = ((p.y - full[0]) / full[1])[body]
        else:
            u = (p.y[body] - p.window[0]) / p.window[1]
        burnt = float((u.abs() > SATURATION_REACH).float().mean()) if u.numel() else 0.0
        if burnt <= self.max_burnt_out:
            return p
        shift, scale = window_guard(u, self.max_burnt_out)
        after = float((((u - shift) / scale).abs() > SATURATION_REACH).float().mean())
        guard = Guarded(burnt_before=burnt, burnt_after=after, shift=shift, scale=scale)
        if per_pixel:
            maps = p.maps.clone()
            maps[2] = (p.maps[2] + shift * p.maps[3]).clamp(0.0, 1.0)
            maps[3] = p.maps[3] * scale
            full = upsample_maps(maps[None, 2:], tuple(p.y.shape), p.downsample)[0]
            return replace(p, maps=maps, z=sigmoid_window(p.y, full[0], full[1]), window=aggregate_window(maps), guard=guard)
        wc, ww = p.window
        return replace(p, window=(min(max(wc + shift * ww, 0.0), 1.0), ww * scale), guard=guard)
