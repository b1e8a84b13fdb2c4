"""Multi-process training gives the one-process result: loss curves of `dicom-node train` in one
process and under `torchrun --nproc_per_node 2` (gloo on CPU), same seed, same global batch.

A tiny run (a synthetic archive of small phantoms, a narrow model, one thread per process) so
that it fits the shared 2-core machine; the curves are the per-epoch history each run stores in
its checkpoint (train image MSE over every sample of the epoch, validation loss). Writes
benchmarks/results/ddp_curves.png and ddp_curves.txt.

    .venv/bin/python -m benchmarks.ddp_curves [--epochs 12] [--work var/ddp-curves]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks.stamp import cpu_description, git_commit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def train_args(archive: Path, out: Path, epochs: int) -> list[str]:
    return ["--archive", str(archive), "--out", str(out), "--cache", str(archive.parent / "cache"),
            "--downsample", "4", "--width", "8", "--epochs", str(epochs), "--batch", "4", "--crop", "96",
            "--points", "2048", "--lr", "1e-3", "--seed", "0", "--threads", "1", "--patience", str(epochs),
            "--no-progress", "--device", "cpu"]


def shown(path: Path) -> Path:
    """The path as the results file shows it: relative to the repository when inside it."""
    return path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path


def run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work", type=Path, default=REPO / "var" / "ddp-curves")
    args = parser.parse_args(argv)
    from model.checkpoint import load_checkpoint
    from training.synth import synthesise

    archive = args.work / "archive"
    if not (archive / "manifest.csv").exists():
        synthesise(archive, n=8, seed=4, perturbations=2, max_size=256, real=False)
    one, two = args.work / "one.pt", args.work / "two.pt"
    cli = [sys.executable, "-m", "cli", "train"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                "-m", "cli", "train"]
    run(cli + train_args(archive, one, args.epochs))
    run(torchrun + train_args(archive, two, args.epochs))
    histories = {name: load_checkpoint(path.with_name(path.name + ".last")).meta["history"]
                 for name, path in (("1 process", one), ("2 processes (gloo)", two))}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (name, history), style in zip(histories.items(), ("-o", "--x")):
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["train_image_mse"] for h in history], style, label=name)
        axes[1].plot(epochs, [h["val_loss"] for h in history], style, label=name)
    for ax, title in zip(axes, ("train image MSE (every sample of the epoch)", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("dicom-node train: 1 process vs torchrun 2 processes, seed 0, global batch 4")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "ddp_curves.png", dpi=100)

    a, b = histories.values()
    worst_val = max(abs(x["val_loss"] - y["val_loss"]) / x["val_loss"] for x, y in zip(a, b))
    worst_train = max(abs(x["train_image_mse"] - y["train_image_mse"]) / x["train_image_mse"] for x, y in zip(a, b))
    lines = [
        f"commit {git_commit()}, {cpu_description()}",
        f"command: .venv/bin/python -m benchmarks.ddp_curves --epochs {args.epochs}",
        f"  1 process:   dicom-node train {shlex.join(train_args(shown(archive), shown(one), args.epochs))}",
        "  2 processes: torchrun --standalone --nproc_per_node 2 -m cli train (the same options)",
        "epoch  train_mse(1)  train_mse(2)  val_loss(1)  val_loss(2)",
        *(f"{x['epoch']:5d}  {x['train_image_mse']:.4e}    {y['train_image_mse']:.4e}    "
          f"{x['val_loss']:.4e}   {y['val_loss']:.4e}" for x, y in zip(a, b)),
        f"largest relative difference: train image MSE {worst_train:.2%}, validation loss {worst_val:.2%}",
    ]
    (RESULTS / "ddp_curves.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
