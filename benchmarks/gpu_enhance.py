"""Enhance time per image on one device at 2048x2048, alone and in batches of same-size images.

    .venv/bin/python -m benchmarks.gpu_enhance [--device cuda] [--size 2048] [--batch 1 4 8 16] [--repeats 20]

What is timed is `Predictor` on an image already normalised in host memory (as the worker holds
it after decoding): to the device, the network at /ds (mirror-averaged, as shipped), the remap
at full resolution, y back to host memory; CUDA is synchronised before each clock reading.
Decode and encode are not in it (CPU work the same on any device; benchmarks/enhance_cli times
them). The paper reports 26 ms per 2048x2048 image on an A100. `--batch` sizes run
`Predictor.enhance_batch` (one network call for the batch); images/s is given for each.
The reference, in the same run: a host-to-device-to-host copy of the same image (the least any
device path costs), and on CUDA the network alone.
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
from support.helpers import phantom_radiograph


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels chosen (cudnn), caches, compiled kernels
    sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - started)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)

    predictor = Predictor(args.weights, args.device)
    device = predictor.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # same-size inputs: let cuDNN pick its fastest kernels
    images = [phantom_radiograph(args.size, args.size, 12, seed=i).astype(np.float32) / 4095
              for i in range(max(args.batch))]

    def one():
        predictor(images[0], want_z=False).y.cpu()

    def copy_only():
        predictor.pre_process(images[0]).cpu()

    def network_only():
        predictor.predict(predictor.pre_process(images[0]))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"enhance on a device: commit {git_commit()}; {cpu_description()}; device {device} ({name}); "
          f"torch {torch.__version__}; weights {args.weights.rsplit('/', 1)[-1]}")
    print(f"  {args.size}x{args.size}, voi (y), median of {args.repeats} after a warm-up")
    t_copy = statistics.median(timed(copy_only, device, args.repeats))
    t_net = statistics.median(timed(network_only, device, args.repeats))
    t_one = statistics.median(timed(one, device, args.repeats))
    if device.type == "cuda":  # on the CPU there is nothing to copy
        print(f"  host -> device -> host copy      {t_copy * 1e3:8.1f} ms   (reference)")
    print(f"  network (mirror-averaged, /ds)   {t_net * 1e3:8.1f} ms")
    ratio = f"{t_one / t_copy:.1f}x the copy; " if device.type == "cuda" else ""
    print(f"  enhance, one image               {t_one * 1e3:8.1f} ms   ({ratio}paper: 26 ms on an A100)")
    for n in args.batch:
        batch = images[:n]
        t = statistics.median(timed(lambda batch=batch: [p.y.cpu() for p in predictor.enhance_batch(batch, want_z=False)],
                                    device, max(3, args.repeats // max(1, n // 4))))
        print(f"  batch of {n:<3}                     {t / n * 1e3:8.1f} ms/image   {n / t:7.1f} images/s")
    if device.type == "cuda":
        print(f"  peak device memory               {torch.cuda.max_memory_allocated(device) / 2**30:8.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
