"""Training loop: read it top to bottom (nanoGPT's train.py is the model for its shape).

    dicom-node train --archive A --out W            # one process
    torchrun --nproc_per_node 2 -m cli train --archive A --out W   # DDP, same result

Loss (paper, Eqn 1): MSE(z_pred, z_gt) on full-resolution crops, z_pred = remap(crop of x, maps
upsampled from the prediction) through model.remap, plus MSE of each of a, b, wc, ww at the
model's resolution. Weights per term are in TrainConfig (Eqn 1 = all ones). A Table 1 baseline
(TrainConfig.model.arch "baseline:<name>", training.baselines) has no maps: it is trained on the same
image term alone, rendered by its own rule (`training.baselines.render`).

Defaults differ from the paper's (Adam lr 1e-5, batch 1, trained to convergence on an A100):
we have ~30 minutes on 2 CPU cores, i.e. a few thousand samples. lr 1e-3 with warm-up and
cosine decay converges in that budget (1e-5 barely moves in it); batch 4 averages the
randomly placed image crops, so the step is less noisy at that larger rate.

Multi-process: under torchrun (WORLD_SIZE > 1) each process takes every world-th sample of
each global batch, per-sample losses are scaled by world/global batch and DistributedDataParallel
averages the gradients across processes (gloo on CPU, nccl on GPU), so a step equals the
one-process step up to float summation order. Augmentation is seeded per (epoch, sample),
never per process.

Files: W (best validation loss), W.last (last epoch), W.train-state (optimizer, epoch, RNG
state, early-stop counters: what --resume needs). Checkpoints are model.checkpoint's format,
with the training config and history in meta.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint, save_checkpoint
from model.net import build_model
from model.remap import percentile_window, remap, sample_bilinear
from training.archive import Archive
from training.baselines import BASELINES, produces_maps, render, render_points
from training.dataset import NO_AUGMENT, REAL_AUGMENT, AugmentConfig, crop_maps, make_sample
from training.config import TrainConfig
from training.errors import ArchiveError


def sample_loss(model, s, cfg: TrainConfig, device, net=None) -> tuple[torch.Tensor, dict]:
    """Eqn 1 for one sample: image MSE on the full-resolution crop + MSE of every map. net: the
    model as it runs the forward pass (wrapped in DistributedDataParallel under torchrun)."""
    pred = (net or model)(s.x_low[None].to(device))  # (1, 4, h, w)
    if not produces_maps(model):
        return baseline_loss(model, pred, s, cfg, device)
    size = tuple(s.x_crop.shape[-2:])
    full = crop_maps(pred, s.top, s.left, size, cfg.model.downsample)
    z = remap(s.x_crop[None].to(device), *full.split(1, dim=1)).z
    image = weighted_mse(z, s.z_crop[None].to(device), s.weight, device)
    if s.pts_rc is not None:  # the whole image: scattered full-resolution pixels through the same remap
        at = sample_bilinear(pred, s.pts_rc[:, 0].to(device), s.pts_rc[:, 1].to(device), cfg.model.downsample)[0]  # (4, P)
        zp = remap(s.pts_x.to(device), *at.unbind(0)).z.reshape(-1)
        image = 0.5 * (image + weighted_mse(zp, s.pts_z.to(device), s.pts_weight, device))
    gt = s.maps.to(device)
    maps = [F.mse_loss(pred[0, i], gt[i]) for i in range(4)]
    total = cfg.image_weight * robust(image, cfg.robust_scale)
    if s.exact:  # maps fitted to a target-only row are no ground truth: what is displayed is
        total = total + sum(w * m for w, m in zip(cfg.map_weights, maps))
    if cfg.correction_weight and hasattr(model, "correction_energy"):  # stay the teacher unless it pays
        total = total + cfg.correction_weight * model.correction_energy
    return total, {"image": image.item(), "a": maps[0].item(), "b": maps[1].item(), "wc": maps[2].item(), "ww": maps[3].item()}


def robust(mse: torch.Tensor, scale: float) -> torch.Tensor:
    """t log(1 + mse / t): the MSE where it is small, growing only logarithmically beyond t, so a
    few samples the model cannot fit (an acquisition whose classical anatomy mask failed) do
    not outweigh all the others. scale 0 leaves the MSE as it is."""
    return scale * torch.log1p(mse / scale) if scale > 0 else mse


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, device) -> torch.Tensor:
    """MSE over the pixels with weight 1 (a synthetic collimation or marker weighs 0)."""
    if weight is None:
        return F.mse_loss(pred, target)
    weight = weight.to(device).reshape(pred.shape)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def is_real(item) -> bool:
    """A real radiograph's row (synth names their groups real-*), as opposed to a phantom's."""
    return item.group.startswith("real-")


def epoch_order(items, cfg: "TrainConfig", epoch: int) -> np.ndarray:
    """The rows of one epoch, shuffled: every row once, and the real radiographs drawn again
    (with replacement) until they make up cfg.real_fraction of the epoch."""
    rng = np.random.default_rng([cfg.seed, epoch])
    real = [i for i, item in enumerate(items) if is_real(item)]
    order = list(range(len(items)))
    if real and cfg.real_fraction > 0 and len(real) < len(items):
        others = len(items) - len(real)
        wanted = math.ceil(cfg.real_fraction * others / (1 - cfg.real_fraction))
        order += list(rng.choice(real, size=max(0, wanted - len(real))))
    return rng.permutation(np.array(order))


def baseline_loss(model, pred, s, cfg: TrainConfig, device) -> tuple[torch.Tensor, dict]:
    """A Table 1 baseline has no maps: the image term alone, on the same crop and pixels."""
    z = render(model, s.x_crop[None].to(device), pred, s.top, s.left)
    image = weighted_mse(z, s.z_crop[None].to(device), s.weight, device)
    if s.pts_rc is not None:
        zp = render_points(model, s.pts_x[None].to(device), pred, s.pts_rc.to(device))[0]
        image = 0.5 * (image + weighted_mse(zp, s.pts_z.to(device), s.pts_weight, device))
    return cfg.image_weight * image, {"image": image.item()}


@torch.no_grad()
def validate(model, items, cfg: TrainConfig, device, rank: int, world: int) -> dict:
    """Whole-image validation, exactly as the predictor runs: maps from the cached /ds input,
    remap of the full-resolution x. Returns mean loss, image MSE and PSNR over the split."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for i, item in enumerate(items):
        if i % world != rank:
            continue
        x_low, maps_gt = item.low()
        pred = model(torch.from_numpy(x_low)[None, None].to(device))
        x = torch.from_numpy(np.asarray(item.x, dtype=np.float32)).to(device)
        has_maps = produces_maps(model)
        if has_maps:
            z = remap(x, *pred.split(1, dim=1), downsample=cfg.model.downsample).z
        else:
            z = render(model, x[None, None], pred)[0, 0]
        image = F.mse_loss(z, torch.from_numpy(np.asarray(item.z, dtype=np.float32)).to(device))
        loss = cfg.image_weight * robust(image, cfg.robust_scale).item()
        image = image.item()
        if has_maps and getattr(item, "exact", True):  # map terms only where the maps are ground truth
            gt = torch.from_numpy(maps_gt).to(device)
            maps = [F.mse_loss(pred[0, k], gt[k]).item() for k in range(4)]
            loss += sum(w * m for w, m in zip(cfg.map_weights, maps))
        sums += torch.tensor([loss, image, 1.0], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    n = max(sums[2].item(), 1.0)
    loss, image = sums[0].item() / n, sums[1].item() / n
    return {"loss": loss, "image_mse": image, "psnr": -10 * math.log10(max(image, 1e-12))}


class PercentileWindowMaps(torch.nn.Module):
    """The identity-map baseline as a "model": a = 1, b = 0 and a global window from the 1st /
    99th percentiles of the image (reference (A) of evaluate), so `validate` can score it."""

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        wc, ww = torch.stack([torch.stack(percentile_window(image)) for image in x_low]).unbind(1)
        ones = torch.ones_like(x_low)
        return torch.cat([ones, 0 * ones, wc[:, None, None, None] * ones, ww[:, None, None, None] * ones], dim=1)


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig, done_steps: int = 0,
                time_fraction=lambda: 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (at most a tenth of the run), then cosine decay to lr * min_lr_ratio; the
    optimizer's lr is that of step `done_steps` on return, and of each next step after every
    `.step()`.

    With --max-minutes the decay follows whichever is further along, the steps or the wall time
    (time_fraction(): the share of it used), so a run on a busy machine still anneals before its
    time is up."""
    warmup = warmup_steps(total, cfg)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction()))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    """The learning rate's linear warm-up: cfg.warmup_steps, at most a tenth of the run."""
    return min(cfg.warmup_steps, total // 10)


@dataclass
class Run:
    """One training run as its steps share it: the processes, the model and its optimizer, and the
    state a checkpoint keeps (epoch, step, best validation loss, early-stop counter, history)."""

    cfg: TrainConfig
    command: str
    world: int
    rank: int
    device: torch.device
    model: torch.nn.Module = None
    net: torch.nn.Module = None  # the model as the forward pass runs it (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer = None
    schedule: torch.optim.lr_scheduler.LRScheduler = None
    state: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "best": float("inf"), "best_epoch": -1,
                                                 "bad_epochs": 0, "elapsed": 0.0, "history": []})
    started: float = 0.0  # wall clock at the start, less the time already spent before a resume
    warmup_steps: int = 0
    asked: dict = None  # the training config as asked for (before calibration moved its prior)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def log(self, *args) -> None:
        if self.main:
            print(*args, flush=True)

    def time_fraction(self) -> float:
        """The share of --max-minutes used (0 without a limit)."""
        return (time.time() - self.started) / (self.cfg.max_minutes * 60) if self.cfg.max_minutes else 0.0


def train(cfg: TrainConfig, command: str = "") -> dict:
    """The recipe: the processes, the data, the model (or the run to resume), the start as a
    candidate, then epochs of Eqn 1 steps, each validated and checkpointed, until the epochs,
    the patience or the time run out. Returns the run's state."""
    t0 = time.time()
    run = start_processes(cfg, command)
    train_items, val_items = load_splits(run)
    if starts_at_teacher(cfg) and cfg.calibrate and not cfg.resume:
        calibrate_the_prior(run, train_items, val_items)
        run.state["elapsed"] = time.time() - t0  # calibration counts against --max-minutes
    build_or_resume(run, train_items)
    if starts_at_teacher(cfg) and run.state["epoch"] == 0 and run.state["best_epoch"] < 0:
        validate_the_start(run, val_items)
    epoch_seconds = 0.0
    while run.state["epoch"] < cfg.epochs:
        if cfg.max_minutes and (time.time() - run.started) + epoch_seconds > cfg.max_minutes * 60:
            run.log(f"stopping: another epoch would pass --max-minutes {cfg.max_minutes}")
            break
        t_epoch = time.time()
        train_sums, lr = train_one_epoch(run, train_items)
        val = validate(run.model, val_items, cfg, run.device, run.rank, run.world)
        epoch_seconds = time.time() - t_epoch
        record_epoch(run, train_sums, val, lr, epoch_seconds)
        if stops_after_this_epoch(run):
            break
    if run.state["best_epoch"] == 0 and starts_at_teacher(cfg):
        run.log(f"done: kept the start, the {'calibrated ' if cfg.calibrate else ''}prior with no correction: no epoch "
                f"beat its val loss {run.state['best']:.3e}; {run.state['elapsed'] / 60:.1f} min; -> {run.out}")
    else:
        run.log(f"done: best val loss {run.state['best']:.3e} at epoch {run.state['best_epoch']}, "
                f"{run.state['elapsed'] / 60:.1f} min; best -> {run.out}")
    if run.world > 1:
        torch.distributed.barrier()
    return run.state


def start_processes(cfg: TrainConfig, command: str) -> Run:
    """One process, or one of torchrun's (WORLD_SIZE > 1: gloo on CPU, nccl on GPU), with its
    device and its share of the CPU threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    return Run(cfg=cfg, command=command, world=world, rank=rank, device=device, asked=asdict(cfg))


def load_splits(run: Run) -> tuple[list, list]:
    """The train and val rows, less the held-out groups. Rank 0 decodes and caches the archive;
    the others wait for it and then read the cache."""
    cfg = run.cfg
    archive = Archive(cfg.archive, cfg.model.downsample, cache=cfg.cache or None)
    if run.main:
        t0 = time.time()
        archive.items()
        run.log(f"archive {cfg.archive}: {len(archive.rows)} rows cached in {time.time() - t0:.0f}s")
    if run.world > 1:
        torch.distributed.barrier()
    held = lambda item: any(item.group.startswith(g) for g in cfg.hold_out)  # noqa: E731
    train_items = [i for i in archive.items("train") if not held(i)]
    val_items = [i for i in archive.items("val") if not held(i)]
    if not train_items:
        raise ArchiveError(f"archive {cfg.archive}: no rows with split 'train'")
    if not val_items:
        run.log("warning: no 'val' rows; validating on the training rows")
        val_items = train_items
    return train_items, val_items


def build_or_resume(run: Run, train_items: list) -> None:
    """The model from the seed (or the last epoch of the run to resume, with its optimizer and
    state), Adam, the learning-rate schedule over every step of the run, and under torchrun the
    DDP wrapper, which broadcasts rank 0's weights and averages each step's gradients."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    ckpt = None
    if cfg.resume:  # its config holds the prior the run calibrated
        resume = Path(cfg.resume)
        ckpt = load_checkpoint(resume.with_name(resume.name + ".last"), "cpu", BASELINES)
        cfg.model = ckpt.config
    model = build_model(cfg.model, BASELINES).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ckpt is not None:
        model.load_state_dict(ckpt.model.state_dict())
        saved = torch.load(resume.with_name(resume.name + ".train-state"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        run.state = saved["state"]
        run.log(f"resumed from {resume} at epoch {run.state['epoch']}")
    for p in model.parameters():  # every parameter has a gradient, zero where unused, in every step
        p.grad = torch.zeros_like(p)
    model.train()
    run.model, run.optimizer = model, optimizer
    run.net = model if run.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
        find_unused_parameters=cfg.model.arch != "interpretable")  # a baseline may leave some unused
    run.started = time.time() - run.state["elapsed"]
    total_steps = math.ceil(len(epoch_order(train_items, cfg, 0)) / cfg.batch) * cfg.epochs
    run.schedule = lr_schedule(optimizer, total_steps, cfg, run.state["step"], run.time_fraction)
    run.warmup_steps = warmup_steps(total_steps, cfg)


def calibrate_the_prior(run: Run, train_items: list, val_items: list) -> None:
    """Fit the prior's global parameters to the training split (training.calibrate), then keep
    whichever prior, the calibrated or the one the config started with, the validation split
    prefers; the run's model config (and so its checkpoint, identity and derived UIDs) holds it.
    Every process computes the same deterministic fit."""
    from dataclasses import replace

    from training.calibrate import calibrate

    cfg = run.cfg
    fitted = calibrate(train_items, cfg.model.downsample, cfg.model.prior, cfg.calibration_images,
                       cfg.calibration_evaluations, cfg.seed)
    run.log(fitted.describe())
    scores = {}
    for name, prior in (("start", cfg.model.prior), ("calibrated", fitted.params)):
        model = build_model(replace(cfg.model, prior=prior), BASELINES).to(run.device).eval()
        scores[name] = validate(model, val_items, cfg, run.device, run.rank, run.world)
    keep = "calibrated" if scores["calibrated"]["loss"] <= scores["start"]["loss"] else "start"
    run.log(f"prior on the val split: start {scores['start']['psnr']:.2f} dB, calibrated "
            f"{scores['calibrated']['psnr']:.2f} dB; training from the {keep} prior")
    if keep == "calibrated":
        cfg.model = replace(cfg.model, prior=fitted.params)


def starts_at_teacher(cfg: TrainConfig) -> bool:
    """The prior parameterisation starts at the teacher: that start is a candidate too, and a run
    that cannot improve on it keeps it rather than its least bad epoch (a random start of any
    other model is no candidate)."""
    return cfg.model.arch == "interpretable" and cfg.model.parameterisation == "prior"


def validate_the_start(run: Run, val_items: list) -> None:
    val = validate(run.model, val_items, run.cfg, run.device, run.rank, run.world)
    run.state["best"], run.state["best_epoch"], run.state["start_val_loss"] = val["loss"], 0, val["loss"]
    run.log(f"epoch   0  (the start)  val loss {val['loss']:.3e} psnr {val['psnr']:.2f} dB")
    if run.main:
        save(run, run.out, val)


def train_one_epoch(run: Run, train_items: list) -> tuple[dict, float]:
    """One pass over the epoch's order in global batches, one optimizer step each. Returns the
    sums of the loss terms over every process (and their count "n") and the last step's
    learning rate."""
    cfg, epoch, world = run.cfg, run.state["epoch"], run.world
    augment_for = (lambda item: REAL_AUGMENT if is_real(item) else AugmentConfig()) if cfg.augment else (lambda item: NO_AUGMENT)
    order = epoch_order(train_items, cfg, epoch)
    batches = [np.arange(i, min(i + cfg.batch, len(order))) for i in range(0, len(order), cfg.batch)]
    bar = None
    if run.main and cfg.progress and sys.stderr.isatty():  # a bar in a log file is noise
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
    sums, lr = {}, cfg.lr
    for batch in batches:
        run.optimizer.zero_grad(set_to_none=False)
        # each process takes every world-th sample; DDP averages over processes, so a loss
        # scaled by world / global batch gives the one-process step
        mine = [(int(position), world) for j, position in enumerate(batch) if j % world == run.rank]
        if not mine:  # DDP needs every process in every step: a sample that weighs nothing
            mine = [(int(batch[0]), 0)]
        for k, (position, scale) in enumerate(mine):
            item = train_items[order[position]]
            rng = np.random.default_rng([cfg.seed, epoch, position])  # a repeated row gets its own draw
            s = make_sample(item, rng, cfg.crop, cfg.model.downsample, augment_for(item), points=cfg.points)
            last = k == len(mine) - 1  # gradients are averaged once, after the last sample
            with run.net.no_sync() if world > 1 and not last else contextlib.nullcontext():
                loss, parts = sample_loss(run.model, s, cfg, run.device, run.net)
                (loss / len(batch) * scale).backward()
            if scale:
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v
                sums["n"] = sums.get("n", 0) + 1
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.schedule.step()
        run.state["step"] += 1
        if bar:
            bar.update(1)
            bar.set_postfix(img=f"{sums.get('image', 0) / max(sums.get('n', 1), 1):.2e}")
    if bar:
        bar.close()
    if world > 1:  # the history reports the whole global batch, not rank 0's share of it
        keys = ("n", "image", "a", "b", "wc", "ww")
        totals = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        sums = {k: v for k, v in zip(keys, totals.tolist()) if k in sums or v}
    return sums, lr


def record_epoch(run: Run, sums: dict, val: dict, lr: float, seconds: float) -> None:
    """The epoch's line in the history and the log, the best-so-far bookkeeping, and (rank 0) the
    checkpoints: W when it is the best, W.last, and W.train-state for --resume."""
    state = run.state
    state["epoch"] += 1
    state["elapsed"] = time.time() - run.started
    n = max(sums.get("n", 1), 1)
    record = {"epoch": state["epoch"], "train_image_mse": sums.get("image", 0) / n,
              **{f"train_{k}_mse": sums.get(k, 0) / n for k in ("a", "b", "wc", "ww")},
              "val_loss": val["loss"], "val_psnr": val["psnr"], "lr": lr, "seconds": seconds}
    state["history"].append(record)
    improved = val["loss"] < state["best"]
    if improved:
        state["best"], state["best_epoch"], state["bad_epochs"] = val["loss"], state["epoch"], 0
    elif state["step"] > run.warmup_steps:  # an epoch still warming up its learning rate is no trial
        state["bad_epochs"] += 1
    run.log(f"epoch {state['epoch']:3d}  train img {record['train_image_mse']:.2e} a {record['train_a_mse']:.2e} "
            f"b {record['train_b_mse']:.2e} wc {record['train_wc_mse']:.2e} ww {record['train_ww_mse']:.2e}  "
            f"val loss {val['loss']:.3e} psnr {val['psnr']:.2f} dB  lr {record['lr']:.1e}  "
            f"{seconds:.0f}s{'  *best' if improved else ''}")
    if run.main:
        if improved:
            save(run, run.out, val)
        save(run, run.out.with_name(run.out.name + ".last"), val)
        torch.save({"optimizer": run.optimizer.state_dict(), "state": state, "train_config": asdict(run.cfg)},
                   run.out.with_name(run.out.name + ".train-state"))


def stops_after_this_epoch(run: Run) -> bool:
    """Stopped as asked (stop_after_epochs, as if interrupted) or early (patience)."""
    cfg, epoch = run.cfg, run.state["epoch"]
    if cfg.stop_after_epochs and cfg.stop_after_epochs <= epoch < cfg.epochs:
        run.log(f"stopping after epoch {epoch} as asked; --resume {run.out} continues")
        return True
    if run.state["bad_epochs"] >= cfg.patience:
        run.log(f"early stop: no better validation loss for {cfg.patience} epochs")
        return True
    return False


def save(run: Run, path: Path, val: dict) -> str:
    """A checkpoint of the model with the run's config, position, validation and history in meta."""
    state = run.state
    # the config as asked for: a second run of the same command is the same run (the checkpoint's
    # own ModelConfig holds the calibrated prior)
    meta = {"train_config": run.asked or asdict(run.cfg), "epoch": state["epoch"], "step": state["step"], "val": val,
            "best_val_loss": state["best"], "archive": str(run.cfg.archive), "command": run.command,
            "world_size": run.world, "history": state["history"]}
    return save_checkpoint(path, run.model, meta)
