"""Inference as pre_process → predict → post_process (the MONAI Deploy operator shape).

The model is loaded once, lazily, on the chosen device; everything after the network is the
shared `remap` so inference computes exactly what training optimised.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.net import MAP_NAMES, mirror_averaged
from model.remap import downsample_image, remap, sigmoid_window, upsample_maps


def resolve_device(device: str) -> torch.device:
    """auto = the first CUDA device when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
        return torch.device(device)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class Prediction:
    """The enhancement of one image: y and z at full resolution, the maps at low resolution."""

    x: torch.Tensor  # (H, W) normalised input
    y: torch.Tensor  # (H, W) after the regional LUT
    z: torch.Tensor | None  # (H, W) after the per-pixel window; None when not asked for
    maps: torch.Tensor  # (4, h, w) a, b, wc, ww at the model's resolution
    downsample: int
    window: tuple[float, float]  # robust aggregate (wc, ww) over the image

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
    def __init__(self, weights: str | Path, device: str = "auto"):
        self.weights = Path(weights)
        self.device = resolve_device(device)
        self._checkpoint: Checkpoint | None = None

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = load_checkpoint(self.weights, self.device)
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
        low = downsample_image(x, self.checkpoint.config.downsample)
        return mirror_averaged(self.checkpoint.model, low)[0]

    @torch.inference_mode()
    def post_process(self, x: torch.Tensor, maps: torch.Tensor, want_z: bool = True) -> Prediction:
        ds = self.checkpoint.config.downsample
        a, b, wc, ww = maps[:, None, None].unbind(0)  # each (1, 1, h, w)
        y, z = remap(x, a, b, wc, ww, downsample=ds, want_z=want_z)
        return Prediction(x=x, y=y, z=z if want_z else None, maps=maps, downsample=ds, window=aggregate_window(maps))

    def __call__(self, x: np.ndarray, want_z: bool = True) -> Prediction:
        xt = self.pre_process(x)
        return self.post_process(xt, self.predict(xt), want_z=want_z)
