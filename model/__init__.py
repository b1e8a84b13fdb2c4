"""Model: network, remap formula, checkpoints, predictor. Imports neither dicom_node nor training."""
