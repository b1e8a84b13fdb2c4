"""CLI commands of the training side: synth, train, evaluate (registered in cli).

Heavy modules (torch, the training code) are imported inside the command bodies.
"""
from __future__ import annotations

import shlex
import sys

import click


class ProgressLine:
    """A one-line progress display rewritten with \\r on a terminal; silent in a pipe or a log
    file, where \\r would pile every update onto one endless line."""

    def __init__(self, render):
        self.render, self.shown = render, sys.stderr.isatty()

    def __call__(self, *args) -> None:
        if self.shown:
            click.echo("\r" + self.render(*args), nl=False, err=True)

    def end(self) -> None:
        if self.shown:
            click.echo("", err=True)


@click.command("synth")
@click.option("--out", "out", required=True, type=click.Path(), help="Archive folder (or .zip path) to write.")
@click.option("--n", "n", default=40, show_default=True, type=click.IntRange(1), help="Number of phantom anatomies.")
@click.option("--seed", default=0, show_default=True, type=int, help="Everything is a function of the seed.")
@click.option("--perturbations", "perturbations", default=4, show_default=True, type=click.IntRange(1),
              help="Acquisitions (x' = alpha x + beta) per anatomy.")
@click.option("--zip", "make_zip", is_flag=True, help="Write a .zip instead of a folder.")
@click.option("--max-size", default=4096, show_default=True, type=click.IntRange(64, 4096),
              help="Scale the phantom sizes (1000–4096 px by default) so the longest side is at most this.")
@click.option("--real/--no-real", default=True, show_default=True, help="Include the pydicom-data radiographs.")
@click.option("--real-split", default="fixed", show_default=True, type=click.Choice(["fixed", "train"]),
              help="fixed: RG1 in train and RG3 in test; train: every real radiograph in train (hold one out in `train` instead).")
@click.option("--only-split", "only", multiple=True, type=click.Choice(["train", "val", "test"]),
              help="Write only the rows of this split (repeatable); they are identical to the full archive's.")
def synth_command(out, n, seed, perturbations, make_zip, max_size, real, real_split, only):
    """Write a synthetic annotated archive (phantoms + real radiographs, exact ground truth)."""
    from training.synth import synthesise

    count = [0]
    line = ProgressLine(lambda rid: f"{count[0]} images ({rid})")

    def progress(rid):
        count[0] += 1
        line(rid)

    path = synthesise(out, n, seed, perturbations, max_size=max_size, real=real, make_zip=make_zip, progress=progress,
                      only=tuple(only) or None, real_split=real_split)
    line.end()
    click.echo(f"wrote {count[0]} acquisitions to {path}")


@click.command("train")
@click.option("--archive", required=True, type=click.Path(exists=True), help="Annotated archive (folder or .zip).")
@click.option("--out", "out", required=True, type=click.Path(), help="Best checkpoint; W.last and W.train-state beside it.")
@click.option("--downsample", default=8, show_default=True, type=click.Choice(["4", "8", "16"]), help="Model resolution.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--batch", default=4, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda | cuda:N")
@click.option("--resume", default=None, type=click.Path(), help="Continue the run whose best checkpoint is W.")
@click.option("--width", default=32, show_default=True, type=click.IntRange(1), help="ResUNet feature width.")
@click.option("--lowpass-radius", default=3, show_default=True, type=click.IntRange(0),
              help="Radius (low-res px) of the fixed low-pass L(x) in the relative parameterisation.")
@click.option("--parameterisation", default="prior", show_default=True,
              type=click.Choice(["relative", "absolute", "tissue", "prior"]), help="How the raw outputs become the maps (model/net.py).")
@click.option("--real-fraction", default=0.34, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of each epoch drawn from the real radiographs (groups real-*), with heavier augmentation.")
@click.option("--correction-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Prior parameterisation: weight of the mean squared correction in the loss (0: none).")
@click.option("--hold-out", "hold_out", multiple=True, help="Leave the rows of this group (prefix) out of training and validation; repeatable.")
@click.option("--work-size", default=0, show_default=True, type=click.IntRange(0),
              help="Run the ResUNet on a copy of the /ds image resized to this longer side (0: as is).")
@click.option("--crop", default=512, show_default=True, type=click.IntRange(32), help="Full-res crop side (image term).")
@click.option("--points", default=16384, show_default=True, type=click.IntRange(0),
              help="Full-res pixels scattered over the whole image in the image term (0: crop only).")
@click.option("--image-weight", default=1.0, show_default=True, type=float, help="Weight of the image MSE term.")
@click.option("--robust-scale", default=0.002, show_default=True, type=click.FloatRange(0),
              help="0: image term = MSE; t > 0: t log(1 + MSE / t) per sample (a few unfittable samples weigh less).")
@click.option("--map-weights", default="0.05,0.05,0.05,0.05", show_default=True, help="Weights of the a,b,wc,ww MSE terms.")
@click.option("--patience", default=10, show_default=True, type=click.IntRange(1), help="Early stop after N epochs.")
@click.option("--max-minutes", default=0.0, show_default=True, type=float, help="Stop before passing this wall time (0: none).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=0, show_default=True, type=int, help="Torch threads per process (0: cores/processes).")
@click.option("--no-augment", is_flag=True, help="Disable on-the-fly augmentation.")
@click.option("--cache", default="", help="Cache folder for decoded inputs (default: beside the archive).")
@click.option("--no-progress", is_flag=True, help="No progress bar (per-epoch lines only).")
def train_command(archive, out, downsample, epochs, lr, batch, device, resume, width, crop, image_weight, map_weights,
                  patience, max_minutes, seed, threads, no_augment, cache, no_progress, points, lowpass_radius, work_size,
                  parameterisation, real_fraction, hold_out, robust_scale, correction_weight):
    """Train the interpretable-mapping model on an annotated archive (works under torchrun)."""
    from model.predictor import resolve_device
    from training.loop import TrainConfig, train

    device = _device(device, resolve_device)
    try:
        weights = tuple(float(v) for v in map_weights.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 4:
        raise click.BadParameter("four comma-separated weights: a,b,wc,ww", param_hint="--map-weights")
    cfg = TrainConfig(archive=archive, out=out, downsample=int(downsample), width=width, lowpass_radius=lowpass_radius, work_size=work_size,
                      parameterisation=parameterisation, epochs=epochs, lr=lr,
                      batch=batch, crop=crop, points=points, image_weight=image_weight, map_weights=weights, patience=patience,
                      max_minutes=max_minutes, seed=seed, device=device, threads=threads, augment=not no_augment,
                      cache=cache, resume=resume or "", progress=not no_progress, real_fraction=real_fraction,
                      hold_out=tuple(hold_out), robust_scale=robust_scale, correction_weight=correction_weight)
    train(cfg, command=" ".join(shlex.quote(a) for a in sys.argv))


@click.command("evaluate")
@click.option("--archive", required=True, type=click.Path(exists=True), help="Annotated archive (folder or .zip).")
@click.option("--weights", required=True, type=click.Path(), help="Checkpoint to evaluate.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--csv", "csv_path", default=None, type=click.Path(), help="Per-image results as CSV.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda | cuda:N")
@click.option("--cache", default="", help="Cache folder for decoded inputs (default: beside the archive).")
@click.option("--group", "groups", multiple=True, help="Only the rows of this group (prefix), e.g. a held-out real radiograph; repeatable.")
@click.option("--guard", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Also score the model behind the window guard with this max_burnt_out (0: no such row).")
def evaluate_command(archive, weights, split, csv_path, device, cache, groups, guard):
    """PSNR/SSIM/map MAE/consistency of a model vs references (A) percentile window and (B) teacher."""
    from model.predictor import resolve_device
    from training.evaluate import evaluate

    device = _device(device, resolve_device)
    line = ProgressLine(lambda rid: f"{rid:<40}")
    result = evaluate(archive, weights, split=split, device=device, csv_path=csv_path, cache=cache or None,
                      progress=line, only_groups=tuple(groups), guard=guard)
    line.end()
    n = result.summary[0]["images"]
    click.echo(f"split {split}: {n} images; PSNR/SSIM of z (displayed), full resolution, data_range 1")
    click.echo(result.table())
    m = result.summary[0]
    if "a_mae" in m:  # Table 1 baselines have no maps
        click.echo(f"model map MAE: a {m['a_mae']:.4f}  b {m['b_mae']:.4f}  wc {m['wc_mae']:.4f}  ww {m['ww_mae']:.4f}")
    click.echo(f"model PSNR of the voi presentation (y under its one aggregate window): {m['psnr_voi']:.2f} dB")
    if csv_path:
        click.echo(f"per-image results: {csv_path}")


def _device(name: str, resolve) -> str:
    """auto/cpu/cuda[:N] as the concrete device string, or a usage error naming the option."""
    try:
        return str(resolve(name))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
