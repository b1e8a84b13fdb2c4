"""Checkpoints that rebuild their own model: config + weights + identity + format version.

The identity is a content hash of the config and every weight, so two checkpoints with the
same identity compute the same maps. It names the model in the derived DICOM instances and
seeds their UIDs, and loading re-computes it to detect a corrupt file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.net import ModelBuilder, ModelConfig, build_model

FORMAT = "dicom-node-checkpoint"
FORMAT_VERSION = 1
# What a checkpoint written before a ModelConfig field existed meant by it: its pixels must not change.
LEGACY_CONFIG = {"correction_bounds": (0.5, 0.7, 0.3, 0.5, 0.5)}


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model: torch.nn.Module
    config: ModelConfig
    identity: str
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short human name used in DICOM Derivation Description and logs."""
        return f"{self.config.arch}-ds{self.config.downsample}-{self.identity[:12]}"


def model_identity(config: ModelConfig | dict, state_dict: dict) -> str:
    """Content hash of the config (every field, the prior's parameters included) and weights."""
    digest = hashlib.sha256(json.dumps(config if isinstance(config, dict) else asdict(config), sort_keys=True).encode())
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict | None = None) -> str:
    """Write model (which carries .config) atomically; returns its identity."""
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    identity = model_identity(config, state)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "state_dict": state,
        "identity": identity,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return identity


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    baselines: Mapping[str, ModelBuilder] | None = None) -> Checkpoint:
    """Load and verify a checkpoint; every failure is a CheckpointError naming the file.
    baselines: builders of the architectures other than ours (model.net.build_model)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model weights {path}: no such file")
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"model weights {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"model weights {path}: not a {FORMAT} file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"model weights {path}: format version {payload.get('format_version')!r}, this program reads {FORMAT_VERSION}"
        )
    try:
        stored = payload["config"]
        config = ModelConfig(**{**LEGACY_CONFIG, **stored})
        model = build_model(config, baselines)
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"model weights {path}: does not match its architecture ({exc})") from None
    identity = model_identity(config, payload["state_dict"])
    if identity != payload.get("identity") and model_identity(stored, payload["state_dict"]) == payload.get("identity"):
        identity = payload["identity"]  # written before some field existed: the identity it was made with
    if identity != payload.get("identity"):
        raise CheckpointError(f"model weights {path}: content hash mismatch, the file is corrupt")
    model.eval()
    return Checkpoint(model=model.to(device), config=config, identity=identity, meta=payload.get("meta", {}))
