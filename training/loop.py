"""Training loop: read it top to bottom (nanoGPT's train.py is the model for its shape).

    dicom-node train --archive A --out W            # one process
    torchrun --nproc_per_node 2 -m cli train --archive A --out W   # DDP, same result

Loss (paper, Eqn 1): MSE(z_pred, z_gt) on full-resolution crops, z_pred = remap(crop of x, maps
upsampled from the prediction) through model.remap, plus MSE of each of a, b, wc, ww at the
model's resolution. Weights per term are in TrainConfig (Eqn 1 = all ones). A Table 1 baseline
(TrainConfig.arch "baseline:<name>", training.baselines) has no maps: it is trained on the same
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
from model.net import ModelConfig, build_model
from model.remap import percentile_window, remap, sample_bilinear
from training.archive import Archive
from training.baselines import BASELINES, produces_maps, render, render_points
from training.dataset import NO_AUGMENT, REAL_AUGMENT, AugmentConfig, crop_maps, make_sample
from training.errors import ArchiveError


@dataclass
class TrainConfig:
    archive: str = ""
    out: str = "var/train/model.pt"
    arch: str = "interpretable"  # or a Table 1 baseline, "baseline:<name>" (training.baselines)
    model_extra: dict = field(default_factory=dict)  # ModelConfig.extra: the baseline's own settings
    downsample: int = 8
    width: int = 32
    levels: int = 5
    parameterisation: str = "prior"
    lowpass_radius: int = 3  # L(x) of the relative parameterisation, low-res pixels
    lowpass_sigma: float = 0.06  # L(x) of the tissue parameterisation, fraction of the shorter side
    work_size: int = 0  # ModelConfig.work_size: the ResUNet's input longer side (0 = as is)
    epochs: int = 30
    lr: float = 1e-3
    min_lr_ratio: float = 0.02  # cosine decays to lr * this
    warmup_steps: int = 50
    batch: int = 4
    crop: int = 512  # full-resolution crop side for the image term
    points: int = 16384  # full-resolution pixels scattered over the whole image, also in the image term
    image_weight: float = 1.0
    robust_scale: float = 0.002  # 0: the image term is the MSE (Eqn 1); t > 0: t log(1 + MSE / t) per sample
    correction_weight: float = 0.0  # prior parameterisation: weight of the mean squared (bounded) correction
    map_weights: tuple = (0.05, 0.05, 0.05, 0.05)  # a, b, wc, ww (Eqn 1: all 1; see docs/training.md)
    patience: int = 10  # epochs without a better validation loss before stopping
    max_minutes: float = 0.0  # 0 = no limit; else stop before an epoch would pass it
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads per process; 0 = cores / processes
    augment: bool = True
    real_fraction: float = 0.34  # share of each epoch's samples drawn from real radiographs (heavier augmentation)
    hold_out: tuple = ()  # groups left out of training and validation (leave-one-real-out)
    cache: str = ""
    resume: str = ""
    stop_after_epochs: int = 0  # stop (as if interrupted) once this many epochs are done; 0 = never
    progress: bool = True


def sample_loss(model, s, cfg: TrainConfig, device, net=None) -> tuple[torch.Tensor, dict]:
    """Eqn 1 for one sample: image MSE on the full-resolution crop + MSE of every map. net: the
    model as it runs the forward pass (wrapped in DistributedDataParallel under torchrun)."""
    pred = (net or model)(s.x_low[None].to(device))  # (1, 4, h, w)
    if not produces_maps(model):
        return baseline_loss(model, pred, s, cfg, device)
    size = tuple(s.x_crop.shape[-2:])
    full = crop_maps(pred, s.top, s.left, size, cfg.downsample)
    z = remap(s.x_crop[None].to(device), *full.split(1, dim=1)).z
    image = weighted_mse(z, s.z_crop[None].to(device), s.weight, device)
    if s.pts_rc is not None:  # the whole image: scattered full-resolution pixels through the same remap
        at = sample_bilinear(pred, s.pts_rc[:, 0].to(device), s.pts_rc[:, 1].to(device), cfg.downsample)[0]  # (4, P)
        zp = remap(s.pts_x.to(device), *at.unbind(0)).z.reshape(-1)
        image = 0.5 * (image + weighted_mse(zp, s.pts_z.to(device), s.pts_weight, device))
    gt = s.maps.to(device)
    maps = [F.mse_loss(pred[0, i], gt[i]) for i in range(4)]
    total = cfg.image_weight * robust(image, cfg.robust_scale) + sum(w * m for w, m in zip(cfg.map_weights, maps))
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
            z = remap(x, *pred.split(1, dim=1), downsample=cfg.downsample).z
        else:
            z = render(model, x[None, None], pred)[0, 0]
        image = F.mse_loss(z, torch.from_numpy(np.asarray(item.z, dtype=np.float32)).to(device))
        loss = cfg.image_weight * robust(image, cfg.robust_scale).item()
        image = image.item()
        if has_maps:
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
    warmup = min(cfg.warmup_steps, total // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction()))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


def train(cfg: TrainConfig, command: str = "") -> dict:
    # ---- processes and device ----------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    main = rank == 0
    log = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)

    # ---- data: rank 0 decodes and caches, the others wait and then read the cache --------
    archive = Archive(cfg.archive, cfg.downsample, cache=cfg.cache or None)
    if main:
        t0 = time.time()
        archive.items()
        log(f"archive {cfg.archive}: {len(archive.rows)} rows cached in {time.time() - t0:.0f}s")
    if world > 1:
        torch.distributed.barrier()
    held = lambda item: any(item.group.startswith(g) for g in cfg.hold_out)  # noqa: E731
    train_items = [i for i in archive.items("train") if not held(i)]
    val_items = [i for i in archive.items("val") if not held(i)]
    if not train_items:
        raise ArchiveError(f"archive {cfg.archive}: no rows with split 'train'")
    if not val_items:
        log("warning: no 'val' rows; validating on the training rows")
        val_items = train_items
    augment_for = (lambda item: REAL_AUGMENT if is_real(item) else AugmentConfig()) if cfg.augment else (lambda item: NO_AUGMENT)

    # ---- model and optimiser ---------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    mconf = ModelConfig(arch=cfg.arch, downsample=cfg.downsample, width=cfg.width, levels=cfg.levels,
                        parameterisation=cfg.parameterisation, lowpass_radius=cfg.lowpass_radius,
                        lowpass_sigma=cfg.lowpass_sigma, work_size=cfg.work_size,
                        extra=dict(cfg.model_extra))
    model = build_model(mconf, BASELINES).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    out = Path(cfg.out)
    steps_per_epoch = math.ceil(len(epoch_order(train_items, cfg, 0)) / cfg.batch)
    total_steps = steps_per_epoch * cfg.epochs
    state = {"epoch": 0, "step": 0, "best": float("inf"), "best_epoch": -1, "bad_epochs": 0, "elapsed": 0.0, "history": []}
    if cfg.resume:
        resume = Path(cfg.resume)
        ckpt = load_checkpoint(resume.with_name(resume.name + ".last"), "cpu", BASELINES)
        model.load_state_dict(ckpt.model.state_dict())
        saved = torch.load(resume.with_name(resume.name + ".train-state"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"resumed from {resume} at epoch {state['epoch']}")
    for p in model.parameters():  # every parameter has a gradient, zero where unused, in every step
        p.grad = torch.zeros_like(p)
    model.train()
    # DDP broadcasts rank 0's weights at the start and averages the gradients of each step
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=cfg.arch != "interpretable")  # a baseline may leave some unused
    start_time = time.time() - state["elapsed"]
    time_fraction = (lambda: (time.time() - start_time) / (cfg.max_minutes * 60)) if cfg.max_minutes else (lambda: 0.0)
    schedule = lr_schedule(optimizer, total_steps, cfg, state["step"], time_fraction)

    def save(path: Path, val: dict):
        meta = {"train_config": {k: v for k, v in asdict(cfg).items()}, "epoch": state["epoch"], "step": state["step"],
                "val": val, "best_val_loss": state["best"], "archive": str(cfg.archive), "command": command,
                "world_size": world, "history": state["history"]}
        return save_checkpoint(path, model, meta)

    # ---- the start is a candidate too: the prior parameterisation starts at the teacher, and
    # a run that cannot improve on it keeps it rather than its least bad epoch (a random start
    # of any other model is no candidate)
    starts_at_teacher = cfg.arch == "interpretable" and cfg.parameterisation == "prior"
    if starts_at_teacher and state["epoch"] == 0 and state["best_epoch"] < 0:
        val = validate(model, val_items, cfg, device, rank, world)
        state["best"], state["best_epoch"], state["start_val_loss"] = val["loss"], 0, val["loss"]
        log(f"epoch   0  (the start)  val loss {val['loss']:.3e} psnr {val['psnr']:.2f} dB")
        if main:
            save(out, val)

    # ---- epochs --------------------------------------------------------------------------------
    start = start_time
    epoch_seconds = 0.0
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        if cfg.max_minutes and (time.time() - start) + epoch_seconds > cfg.max_minutes * 60:
            log(f"stopping: another epoch would pass --max-minutes {cfg.max_minutes}")
            break
        t_epoch = time.time()
        order = epoch_order(train_items, cfg, epoch)
        batches = [np.arange(i, min(i + cfg.batch, len(order))) for i in range(0, len(order), cfg.batch)]
        bar = None
        if main and cfg.progress and sys.stderr.isatty():  # a bar in a log file is noise
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        sums = {}
        for batch in batches:
            optimizer.zero_grad(set_to_none=False)
            # each process takes every world-th sample; DDP averages over processes, so a loss
            # scaled by world / global batch gives the one-process step
            mine = [(int(position), world) for j, position in enumerate(batch) if j % world == rank]
            if not mine:  # DDP needs every process in every step: a sample that weighs nothing
                mine = [(int(batch[0]), 0)]
            for k, (position, scale) in enumerate(mine):
                item = train_items[order[position]]
                rng = np.random.default_rng([cfg.seed, epoch, position])  # a repeated row gets its own draw
                s = make_sample(item, rng, cfg.crop, cfg.downsample, augment_for(item), points=cfg.points)
                last = k == len(mine) - 1  # gradients are averaged once, after the last sample
                with net.no_sync() if world > 1 and not last else contextlib.nullcontext():
                    loss, parts = sample_loss(model, s, cfg, device, net)
                    (loss / len(batch) * scale).backward()
                if scale:
                    for key, v in parts.items():
                        sums[key] = sums.get(key, 0.0) + v
                    sums["n"] = sums.get("n", 0) + 1
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            state["step"] += 1
            if bar:
                bar.update(1)
                bar.set_postfix(img=f"{sums.get('image', 0) / max(sums.get('n', 1), 1):.2e}")
        if bar:
            bar.close()
        val = validate(model, val_items, cfg, device, rank, world)
        state["epoch"] += 1
        epoch_seconds = time.time() - t_epoch
        state["elapsed"] = time.time() - start
        n = max(sums.get("n", 1), 1)
        record = {"epoch": state["epoch"], "train_image_mse": sums.get("image", 0) / n,
                  **{f"train_{k}_mse": sums.get(k, 0) / n for k in ("a", "b", "wc", "ww")},
                  "val_loss": val["loss"], "val_psnr": val["psnr"], "lr": lr,
                  "seconds": epoch_seconds}
        state["history"].append(record)
        improved = val["loss"] < state["best"]
        if improved:
            state["best"], state["best_epoch"], state["bad_epochs"] = val["loss"], state["epoch"], 0
        else:
            state["bad_epochs"] += 1
        log(f"epoch {state['epoch']:3d}  train img {record['train_image_mse']:.2e} a {record['train_a_mse']:.2e} "
            f"b {record['train_b_mse']:.2e} wc {record['train_wc_mse']:.2e} ww {record['train_ww_mse']:.2e}  "
            f"val loss {val['loss']:.3e} psnr {val['psnr']:.2f} dB  lr {record['lr']:.1e}  "
            f"{epoch_seconds:.0f}s{'  *best' if improved else ''}")
        if main:
            if improved:
                save(out, val)
            save(out.with_name(out.name + ".last"), val)
            torch.save({"optimizer": optimizer.state_dict(), "state": state, "train_config": asdict(cfg)},
                       out.with_name(out.name + ".train-state"))
        if cfg.stop_after_epochs and state["epoch"] >= cfg.stop_after_epochs and state["epoch"] < cfg.epochs:
            log(f"stopping after epoch {state['epoch']} as asked; --resume {out} continues")
            break
        if state["bad_epochs"] >= cfg.patience:
            log(f"early stop: no better validation loss for {cfg.patience} epochs")
            break
    log(f"done: best val loss {state['best']:.3e} at epoch {state['best_epoch']}, {state['elapsed'] / 60:.1f} min; best -> {out}")
    if world > 1:
        torch.distributed.barrier()
    return state
