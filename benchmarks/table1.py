"""Reproduce the paper's Table 1 (and Figures 3, 4) on our synthetic data, in one command.

    python -m benchmarks.table1 --quick      # CI smoke run: tiny archive, short training, <= 10 min
    python -m benchmarks.table1 --medium     # the full networks on 1024 px images: ~30 min on this 2-core CPU
    python -m benchmarks.table1              # the full run: 40 anatomies x 4 acquisitions, hours on a CPU
    python -m benchmarks.table1 --medium --seeds 0 1 2 --out DIR   # each seed into DIR/seed-N, DIR/table1.md the mean

Steps, all from one seed:
  1. synth    a synthetic annotated archive (training.synth): phantoms (plus the pydicom-data
              radiographs in the full run), several perturbed acquisitions of each anatomy with
              exact ground truth, train/val/test split by anatomy.
  2. train    every learned row with the same loop (training.loop), data, epochs, learning rate,
              batch, crop, early stopping and seed: the four learned baselines of
              training.baselines and the proposed model at downsample 16, 8 and 4.
  3. evaluate every row on the same test split with the same metric code (training.evaluate):
              PSNR, SSIM, map MAE (models with maps), consistency; the classical rows
              (percentile window, teacher on input, CLAHE) are references of the same evaluation.
  4. time     seconds per image on one 2500x2000 image (best of N after a warm-up), on this CPU
              and on CUDA when present.
  5. write    <out>/table1.md (our numbers, the paper's beside them, the issue's targets
              checked), <out>/table1.json (everything measured), <out>/fig3.png, <out>/fig4.png.
Intermediate files (archive, cache, checkpoints) go to --work (default var/table1-<mode>, with
-s<seed> for a seed other than 0); a checkpoint trained with the same settings is reused, so an
interrupted full run continues where it stopped. With --seeds each seed is a whole run of its own
(archive, test split, training) and the written table is their mean: one 7-anatomy test split
moves a row's mean by more than the rows differ.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.figures import figure3, figure4
from benchmarks.stamp import cpu_description, git_commit
from benchmarks.report import METHODS, Row, mean_rows, render_seeds_table, render_table
from model.checkpoint import CheckpointError, load_checkpoint
from model.net import ModelConfig
from training.baselines import BASELINES, baseline_config, clahe, enhance, parameter_count, produces_maps
from training.evaluate import evaluate, fidelity, percentile_window_reference, teacher_reference

REPO = Path(__file__).resolve().parent.parent
CLASSICAL = {"percentile-window": percentile_window_reference, "teacher-on-input": teacher_reference, "clahe": clahe}
CONSISTENCY_LEGEND = ("for each test anatomy with several perturbed acquisitions, the mean over pixels of the "
                      "standard deviation of the output across acquisitions divided by the same of the raw inputs, "
                      "averaged over anatomies (lower is more consistent; 1 = as inconsistent as the raw "
                      "acquisitions; the target itself scores ~0).")


@dataclass(frozen=True)
class Learned:
    key: str  # benchmarks.report.METHODS key
    config: ModelConfig  # width is set by the mode


def learned_rows(width: int, levels: int = 5) -> list[Learned]:
    """The seven learned rows; `levels` is the ResUNet depth of the proposed and image-to-image rows."""
    rows = [Learned("resunet-image", baseline_config("resunet-image", width=width, levels=levels))]
    rows += [Learned(name, baseline_config(name, width=width)) for name in ("dlbc", "lut", "sup-dce")]
    rows += [Learned(f"proposed-ds{ds}", ModelConfig(downsample=ds, width=width, levels=levels)) for ds in (16, 8, 4)]
    return rows


@dataclass(frozen=True)
class Mode:
    """Data and training budget of a run; a training setting left None is the loop's default
    (training.config.TrainConfig), so the full run trains every row as `dicom-node train` does."""

    name: str
    anatomies: int  # synth --n
    perturbations: int  # acquisitions per anatomy
    max_size: int  # synth --max-size
    real: bool  # include the pydicom-data radiographs
    width: int = 32
    levels: int = 5  # ResUNet depth (paper: 5); the /16 model needs images >= 16 * (2 ** (levels - 1) + 1) px
    epochs: int | None = None
    crop: int | None = None
    batch: int | None = None
    lr: float | None = None
    patience: int | None = None
    timing_repeats: int = 5
    timing_shape: tuple = (2500, 2000)
    threads: int = 0  # torch threads when --threads is not given (0: all cores)


FULL = Mode("full", anatomies=40, perturbations=4, max_size=4096, real=True)
# Quick (CI smoke, <= 10 min on 2 cores): images <= 640 px, so the ResUNets have 4 levels (the
# /16 model must still see >= 9 low-res pixels), width 16, 60 epochs of 18 training images, one
# torch thread (~3 min from scratch on this 2-core machine; two threads thrash when another job runs).
QUICK = Mode("quick", anatomies=10, perturbations=3, max_size=640, real=False, epochs=60, width=16, crop=192,
             levels=4, batch=2, lr=1e-3, patience=100, timing_repeats=3, threads=1)

# Medium (what a 2-core CPU can do in about half an hour): the full run's networks (width 32,
# 5 levels) and anatomies, the real radiographs included, on images scaled to <= 1024 px, 60
# epochs each. The networks and the comparison are the full run's; the images are smaller.
MEDIUM = Mode("medium", anatomies=40, perturbations=4, max_size=1024, real=True, epochs=60, crop=256, batch=2,
              lr=1e-3, patience=100, timing_repeats=3)


@dataclass
class Run:
    mode: Mode
    out: Path
    work: Path
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    only: tuple = ()
    log: callable = field(default=print)

    @property
    def archive(self) -> Path:
        return self.work / "archive"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    def checkpoint(self, key: str) -> Path:
        return self.work / "models" / f"{key}.pt"


def synth_step(run: Run) -> Path:
    from training.synth import synthesise

    settings = {"n": run.mode.anatomies, "seed": run.seed, "perturbations": run.mode.perturbations,
                "max_size": run.mode.max_size, "real": run.mode.real}
    stamp = run.work / "archive.json"
    if (run.archive / "manifest.csv").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        run.log(f"synth: reusing {run.archive}")
        return run.archive
    t = time.time()
    run.work.mkdir(parents=True, exist_ok=True)
    synthesise(run.archive, settings["n"], run.seed, settings["perturbations"], max_size=settings["max_size"],
               real=settings["real"])
    stamp.write_text(json.dumps(settings))
    run.log(f"synth: {run.archive} in {time.time() - t:.0f}s")
    return run.archive


def train_config(run: Run, spec: Learned):
    from training.config import TrainConfig

    m = run.mode
    budget = {k: getattr(m, k) for k in ("epochs", "lr", "batch", "crop", "patience") if getattr(m, k) is not None}
    return TrainConfig(archive=str(run.archive), out=str(run.checkpoint(spec.key)), model=spec.config,
                       seed=run.seed, device=run.device, threads=run.threads, cache=str(run.cache), progress=False,
                       **budget)


def _comparable(cfg: dict) -> dict:
    """The settings that decide a training result (JSON-normalised: tuples become lists)."""
    return {k: v for k, v in json.loads(json.dumps(cfg, default=str)).items() if k not in ("progress", "threads", "resume")}


def train_step(run: Run, spec: Learned) -> Path:
    from training.loop import train

    cfg = train_config(run, spec)
    path = run.checkpoint(spec.key)
    try:
        done = load_checkpoint(path, baselines=BASELINES).meta.get("train_config", {})
        if _comparable(done) == _comparable(asdict(cfg)):
            run.log(f"train {spec.key}: reusing {path}")
            return path
    except CheckpointError:
        pass
    t = time.time()
    state = train(cfg, command=f"benchmarks.table1 {run.mode.name}")
    run.log(f"train {spec.key}: {len(state['history'])} epochs, best val loss {state['best']:.3e} "
            f"in {time.time() - t:.0f}s")
    return path


def time_call(fn, repeats: int, sync=None) -> float:
    """Best (minimum) seconds of fn() over `repeats` runs after one warm-up run: on a shared
    machine the minimum is the run least disturbed by other processes."""
    fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return min(times)


def timing_image(shape) -> np.ndarray:
    from training.phantoms import make_phantom

    return make_phantom("chest", *shape, seed=11).x


def time_model(weights: Path, x: np.ndarray, device: str, repeats: int) -> float:
    """Seconds per image of the shipped inference path (Predictor for the maps, enhance otherwise)."""
    from model.predictor import Predictor

    predictor = Predictor(weights, device, baselines=BASELINES)
    model = predictor.checkpoint.model
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    if produces_maps(model):
        return time_call(lambda: predictor(x), repeats, sync)

    def run_baseline():
        with torch.inference_mode():
            enhance(model, predictor.pre_process(x))

    return time_call(run_baseline, repeats, sync)


def evaluate_step(run: Run, checkpoints: dict[str, Path]) -> tuple[list[Row], dict]:
    rows, raw = [], {}
    timing_x = timing_image(run.mode.timing_shape)
    gpu = torch.cuda.is_available()
    anchor = "proposed-ds8" if "proposed-ds8" in checkpoints else next(iter(checkpoints))
    for key, path in checkpoints.items():
        refs = {k: CLASSICAL[k] for k in CLASSICAL if not run.only or k in run.only} if key == anchor else {}
        t = time.time()
        result = evaluate(run.archive, path, split="test", device=run.device, cache=str(run.cache), references=refs)
        run.log(f"evaluate {key}{' + classical references' if refs else ''}: {time.time() - t:.0f}s")
        model = load_checkpoint(path, baselines=BASELINES).model
        for s in result.summary:
            name = key if s["method"] == "model" else s["method"]
            raw[name] = s
            maps = tuple(s[f"{k}_mae"] for k in ("a", "b", "wc", "ww")) if "a_mae" in s else None
            if s["method"] == "model":
                cpu = time_model(path, timing_x, "cpu", run.mode.timing_repeats)
                cuda = time_model(path, timing_x, "cuda", max(run.mode.timing_repeats, 5)) if gpu else None
                params = parameter_count(model)
            else:
                fn = CLASSICAL[name]
                cpu, cuda, params = time_call(lambda: fn(timing_x), run.mode.timing_repeats), None, None
            rows.append(Row(key=name, psnr=s["psnr"], ssim=s["ssim"], consistency=s["consistency"],
                            seconds_cpu=cpu, seconds_gpu=cuda, params=params, map_mae=maps,
                            extra={"test_images": s["images"], "eval_seconds_per_image": s["seconds"]}))
    return rows, raw


def figures_step(run: Run, checkpoints: dict[str, Path], rows: list[Row]) -> None:
    """fig3 on one test image of a limb or hand (bone detail), fig4 on two test anatomies."""
    from training.archive import Archive
    from training.synth import anatomies

    items = Archive(run.archive, 8, cache=run.cache).items("test")
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    prefer = sorted(groups, key=lambda g: (not g.startswith(("hand", "limb")), not g.startswith("real"), g))
    masks = {a.name: a.mask for a in anatomies(run.mode.anatomies, run.seed, run.mode.max_size, real=False)}
    models = {key: load_checkpoint(path, baselines=BASELINES).model for key, path in checkpoints.items()}

    def output(key: str, x: np.ndarray) -> np.ndarray:
        if key in CLASSICAL:
            return CLASSICAL[key](x)
        with torch.inference_mode():
            return enhance(models[key], torch.from_numpy(x)).z[0, 0].numpy()

    item = groups[prefer[0]][0]
    x, gt = np.asarray(item.x, dtype=np.float32), np.asarray(item.z, dtype=np.float32)
    keys = [k for k in METHODS if k in models or (k in CLASSICAL and any(r.key == k for r in rows))]
    outputs = {METHODS[k]: output(k, x) for k in keys}
    scores = {name: "{:.2f} dB / SSIM {:.3f}".format(*fidelity(z, gt)) for name, z in outputs.items()}
    mask = masks.get(item.group)
    figure3(run.out / "fig3.png", gt, outputs, mask=mask, scores=scores,
            title=f"Figure 3 ({run.mode.name} mode): test image {item.id}, PSNR / SSIM of this image; "
                  "under each image the detail crop (yellow box), enlarged")

    multi = [g for g in prefer if len(groups[g]) >= 2][:2]
    acquisitions = [it for g in multi for it in groups[g][:3]]
    by_key = {r.key: r for r in rows}
    ours = "proposed-ds8" if "proposed-ds8" in models else next(k for k in models if k.startswith("proposed"))
    presentations = {"raw": lambda x: x, "auto-window": percentile_window_reference, "ours (ds 8)": lambda x: output(ours, x)}
    fig_rows = {name: [fn(np.asarray(it.x, dtype=np.float32)) for it in acquisitions] for name, fn in presentations.items()}
    fig_rows["target"] = [np.asarray(it.z, dtype=np.float32) for it in acquisitions]
    notes = {"auto-window": by_key["percentile-window"] if "percentile-window" in by_key else None,
             "ours (ds 8)": by_key.get(ours)}
    notes = {k: f"consistency {r.consistency:.3f}" for k, r in notes.items() if r is not None}
    notes["raw"] = "consistency 1 (by definition)"
    figure4(run.out / "fig4.png", fig_rows, [it.id for it in acquisitions], row_notes=notes,
            title=f"Figure 4 ({run.mode.name} mode): perturbed acquisitions of the same test anatomies")


def run_all(run: Run, command: str) -> str:
    t0 = time.time()
    run.out.mkdir(parents=True, exist_ok=True)
    synth_step(run)
    specs = [s for s in learned_rows(run.mode.width, run.mode.levels) if not run.only or s.key in run.only]
    if not specs:
        raise SystemExit("--only needs at least one learned row (the classical rows are evaluated beside one)")
    checkpoints = {s.key: train_step(run, s) for s in specs}
    rows, raw = evaluate_step(run, checkpoints)
    figures_step(run, checkpoints, rows)
    from training.archive import Archive

    archive = Archive(run.archive, 8, cache=run.cache)
    test = archive.items("test")
    sizes = sorted({tuple(it.shape) for it in test})
    m = run.mode
    tc = train_config(run, specs[0])
    meta = {
        "mode": m.name, "command": command,
        "archive": (f"`synth --n {m.anatomies} --perturbations {m.perturbations} --max-size {m.max_size} --seed {run.seed}"
                    f"{'' if m.real else ' --no-real'}` ({len(archive.rows)} acquisitions; split by anatomy)"),
        "test_images": f"{len(test)} ({len({it.group for it in test})} anatomies; sizes {sizes[0][0]}x{sizes[0][1]} "
                       f"to {sizes[-1][0]}x{sizes[-1][1]})",
        "training": (f"every learned row: training.loop, {tc.epochs} epochs (early stop after {tc.patience} without a "
                     f"better validation loss), Adam lr {tc.lr:g} with warm-up and cosine decay, batch {tc.batch}, "
                     f"crop {tc.crop} + {tc.points} scattered pixels, map-term weights {tuple(tc.map_weights)} "
                     f"(models with maps), augmentation on, seed {run.seed}, width {m.width}, ResUNet levels {m.levels}, "
                     f"device {run.device}"),
        "cpu": f"s/img on one {m.timing_shape[0]}x{m.timing_shape[1]} image, best of {m.timing_repeats} after a "
               f"warm-up, {cpu_description()}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "consistency": CONSISTENCY_LEGEND,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "wall_minutes": round((time.time() - t0) / 60, 1),
    }
    markdown = render_table(rows, meta)
    markdown += f"\nWall time of this run: {meta['wall_minutes']} min.\n"
    (run.out / "table1.md").write_text(markdown)
    (run.out / "table1.json").write_text(json.dumps(
        {"meta": meta, "mode": asdict(m), "rows": [asdict(r) for r in rows], "evaluate": raw}, indent=1, default=str))
    run.log(f"wrote {run.out / 'table1.md'}, fig3.png, fig4.png in {meta['wall_minutes']} min")
    return markdown


def default_work(mode: Mode, seed: int) -> Path:
    """var/table1-<mode> for seed 0 (and before seeds were named), var/table1-<mode>-s<seed> otherwise."""
    return REPO / "var" / (f"table1-{mode.name}" + (f"-s{seed}" if seed else ""))


def aggregate(out: Path, seeds: list[int], command: str) -> str:
    """<out>/table1.md and .json: the mean over <out>/seed-N/table1.json of the given seeds."""
    runs, metas, modes = {}, {}, {}
    for seed in seeds:
        path = out / f"seed-{seed}" / "table1.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run this command without --aggregate to measure seed {seed}")
        data = json.loads(path.read_text())
        runs[seed] = [Row(**r) for r in data["rows"]]
        metas[seed], modes[seed] = data["meta"], data["mode"]
    first = seeds[0]
    for seed in seeds[1:]:
        if modes[seed] != modes[first]:
            differ = sorted(k for k in modes[first] if modes[seed].get(k) != modes[first][k])
            raise SystemExit(f"seeds {first} and {seed} were measured with different settings ({', '.join(differ)}); "
                             "rerun them with the same mode and options")
    meta = {**metas[first], "command": command,
            "archive": metas[first]["archive"].replace(f"--seed {first}", "--seed N") + f" for N in {', '.join(map(str, seeds))}",
            "test_images": "; ".join(f"seed {s}: {metas[s]['test_images']}" for s in seeds),
            "training": metas[first]["training"].replace(f"seed {first}", "the archive's seed"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": f"{git_commit()} (the mean); the seeds measured at "
                      + ", ".join(f"{metas[s].get('commit', '?')} (seed {s})" for s in seeds),
            "wall_minutes": round(sum(metas[s].get("wall_minutes", 0) for s in seeds), 1)}
    means = mean_rows(runs)
    markdown = render_seeds_table(runs, means, meta)
    markdown += f"\nWall time of the seeds' last runs together: {meta['wall_minutes']} min.\n"
    (out / "table1.md").write_text(markdown)
    (out / "table1.json").write_text(json.dumps(
        {"meta": {**meta, "seeds": seeds}, "mode": modes[first], "rows": [asdict(r) for r in means],
         "per_seed": {s: [asdict(r) for r in rows] for s, rows in runs.items()}}, indent=1, default=str))
    return markdown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Reproduce the paper's Table 1 and Figures 3, 4 on synthetic data.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI smoke run: tiny archive, short training (<= 10 min).")
    size.add_argument("--medium", action="store_true", help="Full networks on <= 1024 px images (~30 min on 2 cores).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="Where table1.md, table1.json and the figures go.")
    parser.add_argument("--work", type=Path, default=None, help="Archive, cache, checkpoints (default var/table1-<mode>, -s<seed> added for a seed "
                             "other than 0; with --seeds, WORK/seed-N).")
    parser.add_argument("--seed", type=int, default=None, help="The archive's and training's seed (default 0).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="N",
                        help="Run each seed (its own archive, test split and training) into OUT/seed-N and write "
                             "OUT/table1.md as their mean.")
    parser.add_argument("--aggregate", action="store_true",
                        help="With --seeds: only rebuild the mean table from OUT/seed-N/table1.json.")
    parser.add_argument("--device", default="auto", help="Training/evaluation device: auto | cpu | cuda | cuda:N.")
    parser.add_argument("--threads", type=int, default=0, help="Torch threads (default: 1 with --quick, else all cores).")
    parser.add_argument("--epochs", type=int, default=None, help="Override the mode's epochs (same for every row).")
    parser.add_argument("--anatomies", type=int, default=None, help="Override the mode's number of synthetic anatomies.")
    parser.add_argument("--only", nargs="*", default=(), choices=list(METHODS), metavar="ROW",
                        help=f"Only these rows ({', '.join(METHODS)}).")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else MEDIUM if args.medium else FULL
    if args.epochs:
        mode = replace(mode, epochs=args.epochs)
    if args.anatomies:
        mode = replace(mode, anatomies=args.anatomies)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.aggregate and not args.seeds:
        parser.error("--aggregate needs --seeds")
    if args.seeds and args.seed is not None:
        parser.error("--seed and --seeds exclude each other")
    if args.aggregate and (args.only or args.epochs or args.anatomies):
        parser.error("--aggregate measures nothing: --only, --epochs and --anatomies apply to the runs it reads")
    threads = args.threads or mode.threads
    if threads:
        torch.set_num_threads(threads)
    command = "python -m benchmarks.table1" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed or 0]
    for seed in ([] if args.aggregate else seeds):
        out = args.out / f"seed-{seed}" if args.seeds else args.out
        work = (args.work / f"seed-{seed}" if args.seeds else args.work) if args.work else default_work(mode, seed)
        run = Run(mode=mode, out=out, work=work, seed=seed, device=device, threads=threads, only=tuple(args.only))
        print(run_all(run, command + (f"  (seed {seed})" if args.seeds else "")))
    if args.seeds:
        print(aggregate(args.out, seeds, command))


if __name__ == "__main__":
    main()
