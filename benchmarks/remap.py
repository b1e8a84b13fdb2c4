"""The remap as the node runs it, against a numpy copy measured in the same run.

    .venv/bin/python -m benchmarks.remap [--rows 2500 --cols 2000] [--repeats 30] [--threads N] [--compare]

A 2500x2000 uint16 radiograph (12 bits stored) is normalised by the node's reader, the maps
come from the shipped model at /8 (predicted once, outside the timing), and what is timed is
`Predictor.post_process` (the call the worker and `dicom-node enhance` make): voi mode (y only,
the node's default) and burn-in mode (y and z). The references, in the same run and process:
`arr.copy()` of the uint16 stored pixels and of the float32 normalised image that the remap
reads (x; y and z are float32 images of the same size). Target: remap <= 2x the copy.
Medians of `--repeats` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.stamp import cpu_description, git_commit
from dicom_node.reader import read_radiograph
from model import DEFAULT_WEIGHTS
from model.predictor import Predictor
from support.helpers import phantom_dataset


def timed_in_turn(fns: dict, repeats: int) -> dict:
    """Seconds of each function, run one after the other in every round: name -> list."""
    for fn in fns.values():  # warm-up: page faults of fresh buffers, caches, compiled kernels
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--compare", action="store_true",
                        help="also time the torch fallback the fused kernel replaced, in the same rounds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = phantom_dataset(args.rows, args.cols, bits=12, seed=11)
    stored = ds.pixel_array  # uint16
    x = read_radiograph(ds)  # float32 in [0, 1], as the node normalises it
    predictor = Predictor(args.weights, "cpu")
    xt = predictor.pre_process(x)
    maps = predictor.predict(xt)

    from model import remap as remap_module

    def with_torch_bands(want_z: bool):  # the lever's "before": the separable torch path it replaced
        state = list(remap_module._numba_state)
        remap_module._numba_state[:] = [False]
        try:
            predictor.post_process(xt, maps, want_z=want_z)
        finally:
            remap_module._numba_state[:] = state

    fns = {
        "numpy copy, uint16 stored pixels": stored.copy,
        "numpy copy, float32 x": x.copy,
        "remap voi (y)": lambda: predictor.post_process(xt, maps, want_z=False),
        "remap burn-in (y and z)": lambda: predictor.post_process(xt, maps, want_z=True),
    }
    if args.compare and remap_module._fused_available():
        fns["remap voi, torch bands"] = lambda: with_torch_bands(False)
        fns["remap burn-in, torch bands"] = lambda: with_torch_bands(True)
    times = timed_in_turn(fns, args.repeats)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    copy32, copy16 = "numpy copy, float32 x", "numpy copy, uint16 stored pixels"

    print(f"remap benchmark: commit {git_commit()}; {cpu_description()}")
    print(f"  {args.rows}x{args.cols} uint16 (12 bits stored); maps at /{predictor.checkpoint.config.downsample}; "
          f"kernel: {remap_module.kernel_name()}; {args.repeats} rounds, fastest and median")
    for name in times:
        line = f"  {name:<34} {best[name] * 1e3:7.2f} ms  (median {med[name] * 1e3:6.2f})"
        if name.startswith("remap"):
            line += (f"   {best[name] / best[copy32]:4.2f}x the float32 copy (median {med[name] / med[copy32]:4.2f}x),"
                     f" {best[name] / best[copy16]:4.2f}x the uint16 copy")
        print(line)
    ratio = best["remap voi (y)"] / best[copy32]
    print(f"  target remap <= 2x a copy (voi, float32 copy, fastest runs): {'met' if ratio <= 2 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
