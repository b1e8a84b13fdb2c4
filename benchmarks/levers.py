"""What channels-last, bf16 and torch.compile give a trained model's network on this CPU.

    .venv/bin/python -m benchmarks.levers [--repeats 10] [--weights W]

The bundled model's checkpoint with its correction head made non-zero (seeded), so that the
network runs, image and mirror, as it does for a trained model (the bundled model's head is
zero and inference skips it). Each lever times `Predictor.predict` on a 2500x2000 phantom
(downsample, the network twice, the mirror mean: what the worker runs per image), median of N
after a warm-up call (for torch.compile the warm-up is the compile, reported apart), as a
ratio to plain float32 measured in the same run, and the largest difference of its maps from
float32's (a, b, wc, ww are in [0, 1]-scaled units; the remap turns 1e-3 of b into about 65
of 65535 output units).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.stamp import cpu_description, git_commit
from model import DEFAULT_WEIGHTS
from model.predictor import Predictor
from support.helpers import phantom_dataset


def _trained_like(weights, seed: int) -> Predictor:
    predictor = Predictor(weights, "cpu")
    model = predictor.checkpoint.model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.05)
    assert model.corrects()
    return predictor


def _time(predict, xt, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(first call s, median s of the next `repeats`, the maps)."""
    started = time.perf_counter()
    maps = predict(xt)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(xt)
        times.append(time.perf_counter() - started)
    return first, statistics.median(times), maps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = phantom_dataset(2500, 2000, bits=12, seed=11)
    x = ds.pixel_array.astype(np.float32) / 4095.0
    predictor = _trained_like(args.weights, args.seed)
    model = predictor.checkpoint.model
    xt = predictor.pre_process(x)

    def plain(t):
        return predictor.predict(t)

    def bf16(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return predictor.predict(t).float()

    results = {}
    first, median, reference = _time(plain, xt, args.repeats)
    results["float32 (reference)"] = (first, median, 0.0)
    _, median_bf16, maps = _time(bf16, xt, args.repeats)
    results["bf16 autocast"] = (None, median_bf16, float((maps - reference).abs().max()))
    model.to(memory_format=torch.channels_last)
    _, median_cl, maps = _time(plain, xt, args.repeats)
    results["channels-last"] = (None, median_cl, float((maps - reference).abs().max()))
    model.to(memory_format=torch.contiguous_format)
    # the whole forward, then only its convolutional part (the rest calls numpy: graph breaks)
    for name, install, remove in (
            ("torch.compile", lambda: setattr(predictor.checkpoint, "model", torch.compile(model)),
             lambda: setattr(predictor.checkpoint, "model", model)),
            ("torch.compile features", lambda: setattr(model, "features", torch.compile(model.features)),
             lambda: model.__dict__.pop("features", None))):
        install()
        try:
            first_c, median_c, maps = _time(plain, xt, args.repeats)
            results[name] = (first_c, median_c, float((maps - reference).abs().max()))
        except Exception as exc:  # a dynamo or inductor failure: reported, not fatal
            results[name] = (None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        finally:
            remove()
            torch._dynamo.reset()

    base = results["float32 (reference)"][1]
    print(f"levers benchmark: commit {git_commit()}; {cpu_description()}; torch {torch.__version__}")
    print(f"  Predictor.predict (the network twice: image and mirror) on a 2500x2000 phantom; weights "
          f"{args.weights} with a seeded non-zero correction head; median of {args.repeats}")
    for name, (first, median, diff) in results.items():
        if median is None:
            print(f"  {name:<22} {diff}")
            continue
        warm = f"   first call (compile) {first:6.1f} s" if name.startswith("torch.compile") else ""
        difference = f"{diff:.1e}" if isinstance(diff, float) else diff
        print(f"  {name:<22} {median * 1000:7.1f} ms   {base / median:5.2f}x float32's speed   "
              f"largest map difference {difference}{warm}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
