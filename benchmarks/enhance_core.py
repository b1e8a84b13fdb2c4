"""Per-stage time of enhancing one 2500x2000 uncompressed radiograph on this machine's CPU.

    python -m benchmarks.enhance_core [--weights W] [--repeats N]

Prints decode, predict, remap, encode and total seconds (median of N runs), and the remap
time as a ratio to a plain numpy copy of the same float32 image measured in the same run.
Targets on the 2-core CI machine: total <= 0.25 s, remap <= 2x the copy.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.stamp import cpu_description, git_commit
from dicom_node.reader import load_dataset, read_radiograph
from dicom_node.writer import ModelStamp, derive_instance
from model import DEFAULT_WEIGHTS
from model.checkpoint import save_checkpoint
from model.net import ModelConfig, build_model
from model.predictor import Predictor
from support.helpers import phantom_dataset


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-core-"))
    weights = args.weights
    if not weights.is_file():  # timing does not depend on the weights' values
        weights = workdir / "untrained.pt"
        save_checkpoint(weights, build_model(ModelConfig()))
    source_path = workdir / "radiograph.dcm"
    phantom_dataset(2500, 2000, bits=14, seed=11).save_as(source_path, enforce_file_format=True)
    predictor = Predictor(weights, "cpu")
    stamp = ModelStamp(predictor.name, predictor.identity)

    rows = {k: [] for k in ("decode", "predict", "remap", "encode", "total", "numpy copy")}
    for _ in range(args.repeats + 1):  # the first run warms caches and is dropped
        start = time.perf_counter()
        ds = load_dataset(source_path)
        x, t_decode = timed(read_radiograph, ds)
        t_decode = time.perf_counter() - start
        xt = predictor.pre_process(x)
        maps, t_predict = timed(predictor.predict, xt)
        prediction, t_remap = timed(predictor.post_process, xt, maps, False)
        buffer = io.BytesIO()

        def encode():
            derived = derive_instance(ds, y=prediction.y.numpy(), window=prediction.window, stamp=stamp)
            derived.save_as(buffer, enforce_file_format=True)

        _, t_encode = timed(encode)
        total = time.perf_counter() - start
        _, t_copy = timed(np.copy, x)
        for key, value in zip(rows, (t_decode, t_predict, t_remap, t_encode, total, t_copy)):
            rows[key].append(value)

    med = {k: statistics.median(v[1:]) for k, v in rows.items()}
    print(f"enhance core: commit {git_commit()}; {cpu_description()}")
    print(f"  2500x2000 uncompressed, CPU, torch threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"weights: {weights}")
    for key, value in med.items():
        print(f"  {key:<11} {value * 1000:8.1f} ms")
    print(f"  remap / numpy copy ratio: {med['remap'] / med['numpy copy']:.2f}x   (target <= 2x)")
    print(f"  total: {med['total']:.3f} s   (target <= 0.25 s)")


if __name__ == "__main__":
    main()
