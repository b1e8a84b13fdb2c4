"""Model: network, remap formula, checkpoints, predictor. Imports neither dicom_node nor training."""
from pathlib import Path

#: The bundled default model (kept importable without torch, for the CLI's option defaults).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.pt"
