"""The path a user runs: `dicom-node enhance` on real-sized CR files, timed as a command.

N synthetic 2500x2000 12-bit CR files (uncompressed) are enhanced by the CLI twice, once one
file and once all N; the marginal time per image, (T_N - T_1) / (N - 1), leaves out the start
(Python, torch, the model). The reference, measured in the same run on the same files: pydicom
read + decode + write of each file (what any DICOM tool pays). Target: <= 0.15 s per image.

    .venv/bin/python -m benchmarks.enhance_cli [--n 9] [--rows 2500 --cols 2000] [--weights W]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from benchmarks.stamp import cpu_description, git_commit
from model import DEFAULT_WEIGHTS
from support.helpers import phantom_dataset

REPO = Path(__file__).resolve().parents[1]


def run_enhance(files: list[Path], out: Path, weights: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cli", "enhance",
                             *map(str, files), "--out", str(out), "--weights", weights, "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"dicom-node enhance failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=9)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="enhance-cli-") as tmp:
        tmp = Path(tmp)
        files = []
        for i in range(args.n):
            path = tmp / f"cr-{i}.dcm"
            phantom_dataset(args.rows, args.cols, 12, seed=i).save_as(path, enforce_file_format=True)
            files.append(path)

        def pydicom_round_trip() -> float:
            started = time.perf_counter()
            for path in files:
                ds = pydicom.dcmread(path)
                ds.pixel_array  # noqa: B018 - decode
                ds.save_as(io.BytesIO(), enforce_file_format=True)
            return (time.perf_counter() - started) / len(files)

        reference = statistics.median(pydicom_round_trip() for _ in range(args.repeats))
        one, all_ = [], []
        for r in range(args.repeats):
            one.append(run_enhance(files[:1], tmp / f"out1-{r}", args.weights))
            all_.append(run_enhance(files, tmp / f"outN-{r}", args.weights))
        t1, tn = statistics.median(one), statistics.median(all_)
        marginal = (tn - t1) / (args.n - 1)
    print(f"enhance CLI benchmark: commit {git_commit()}; {cpu_description()}; weights {Path(args.weights).name}")
    print(f"  {args.n} synthetic CR {args.rows}x{args.cols} 12-bit uncompressed; median of {args.repeats} runs")
    print(f"  dicom-node enhance, 1 file      {t1:7.2f} s   (start: Python, torch, model)")
    print(f"  dicom-node enhance, {args.n} files     {tn:7.2f} s")
    print(f"  marginal per image              {marginal:7.3f} s   (target <= 0.15 s: {'met' if marginal <= 0.15 else 'NOT met'})")
    print(f"  pydicom read+decode+write       {reference:7.3f} s per image")
    print(f"  ratio enhance / pydicom round trip: {marginal / reference:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
