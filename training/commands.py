"""CLI commands of the training side: synth, train, evaluate (registered in cli).

Heavy modules (torch, the training code) are imported inside the command bodies; `train`'s
options are built from the torch-free configs (model.config, training.config).
"""
from __future__ import annotations

import dataclasses
import shlex
import sys

import click

from model.config import ModelConfig
from training.config import TrainConfig


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


STYLE_NAMES = ("teacher", "soft", "contrast", "detail", "vendor")  # training.styles.STYLES, without importing it


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
@click.option("--style", default="teacher", show_default=True, type=click.Choice(list(STYLE_NAMES)),
              help="House style of the targets (docs/training.md): teacher, soft, contrast, detail, vendor.")
@click.option("--exact-params/--target-only", "exact_params", default=None,
              help="Params rows where the style has exact maps, or presentations only "
                   "[default: params for the teacher's style, target-only for the others].")
def synth_command(out, n, seed, perturbations, make_zip, max_size, real, real_split, only, style, exact_params):
    """Write a synthetic annotated archive (phantoms + real radiographs, in a house style)."""
    from training.synth import synthesise

    count = [0]
    line = ProgressLine(lambda rid: f"{count[0]} images ({rid})")

    def progress(rid):
        count[0] += 1
        line(rid)

    path = synthesise(out, n, seed, perturbations, max_size=max_size, real=real, make_zip=make_zip, progress=progress,
                      only=tuple(only) or None, real_split=real_split, style=style, exact_params=exact_params)
    line.end()
    click.echo(f"wrote {count[0]} acquisitions to {path}")


class NumberList(click.ParamType):
    """n comma-separated numbers, e.g. --map-weights 0.05,0.05,0.05,0.05."""

    name = "list"

    def __init__(self, n: int, what: str):
        self.n, self.what = n, what

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            numbers = ()
        if len(numbers) != self.n:
            self.fail(self.what, param, ctx)
        return numbers


def options_from(config_class) -> list:
    """click options of every field of the dataclass that has a "help" in its metadata, built from
    the field: --name-with-dashes, its default, its help, a range (min/max), choices, a repeatable
    option (multiple) or a switch to the opposite of a bool default (flag). The dataclass is then
    the one place that says what a setting is, so the command, its --help and the docs built from
    them cannot drift."""
    options = []
    for spec in dataclasses.fields(config_class):
        meta = dict(spec.metadata)
        if not meta.get("help"):
            continue
        default = spec.default
        name = meta.get("name") or "--" + spec.name.replace("_", "-")
        kwargs = {"help": meta["help"], "show_default": True}
        if isinstance(default, bool):  # a switch to the opposite, e.g. --no-augment
            options.append(click.option(meta["flag"], spec.name, flag_value=not default, default=default,
                                        help=meta["help"]))
            continue
        if meta.get("multiple"):
            kwargs.update(multiple=True, show_default=False)
        elif isinstance(default, tuple):
            kwargs.update(type=NumberList(len(default), meta.get("what", f"{len(default)} comma-separated numbers")),
                          default=",".join(str(v) for v in default))
        elif "choices" in meta:  # click chooses among strings; the field gets its own type back
            kwargs.update(type=click.Choice([str(c) for c in meta["choices"]]), default=str(default),
                          callback=lambda ctx, param, value, kind=type(default): kind(value))
        elif "min" in meta or "max" in meta:
            bounded = click.IntRange if isinstance(default, int) else click.FloatRange
            kwargs.update(type=bounded(meta.get("min"), meta.get("max")), default=default)
        else:
            kwargs.update(type=type(default), default=default, show_default=default != "")
        options.append(click.option(name, spec.name, **kwargs))
    return options


def with_options(options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


@click.command("train")
@click.option("--archive", required=True, type=click.Path(exists=True), help="Annotated archive (folder or .zip).")
@click.option("--out", "out", required=True, type=click.Path(), help="Best checkpoint; W.last and W.train-state beside it.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present) | cpu | cuda | cuda:N")
@click.option("--resume", default=None, type=click.Path(), help="Continue the run whose best checkpoint is W.")
@with_options(options_from(ModelConfig) + options_from(TrainConfig))
def train_command(archive, out, device, resume, **settings):
    """Train the interpretable-mapping model on an annotated archive (works under torchrun)."""
    from model.predictor import resolve_device
    from training.loop import train

    cfg = train_config(archive=archive, out=out, device=_device(device, resolve_device), resume=resume, **settings)
    train(cfg, command=" ".join(shlex.quote(a) for a in sys.argv))


def train_config(archive: str, out: str, device: str, resume: str | None, **settings) -> TrainConfig:
    """The TrainConfig of `train`'s options: the model's fields go to its ModelConfig."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in settings.items() if k in model_fields})
    return TrainConfig(archive=archive, out=out, device=device, resume=resume or "", model=model,
                       **{k: v for k, v in settings.items() if k not in model_fields})


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
