"""Training loop, checkpoints, multi-process training (issue 4)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from training.archive import Archive
from training.loop import PercentileWindowMaps, TrainConfig, train, validate
from training.synth import synthesise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """22 small anatomies (20 phantoms + 2 real), 2 acquisitions each, longest side 256 px."""
    return synthesise(tmp_path_factory.mktemp("loop") / "arch", n=20, seed=21, perturbations=2, max_size=256)


def small_config(archive, out, **kw) -> TrainConfig:
    model = dict(downsample=4, width=12, levels=4)
    model.update({k: kw.pop(k) for k in list(kw) if k in model})
    base = dict(archive=str(archive), out=str(out), model=ModelConfig(**model), epochs=6, lr=2e-3, batch=2,
                crop=128, points=4096, seed=0, threads=1, progress=False, cache=str(Path(archive).parent / "cache"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "m.pt"
    cfg = small_config(archive, out, epochs=30, lr=1e-3)
    state = train(cfg)
    return cfg, out, state


def test_short_training_beats_its_start_and_the_identity_baseline(trained, archive):
    cfg, out, state = trained
    start, best = state["start_val_loss"], state["best"]  # the prior starts at the teacher: not far to go
    items = Archive(archive, cfg.model.downsample, cache=cfg.cache).items("val")
    baseline = validate(PercentileWindowMaps(), items, cfg, torch.device("cpu"), 0, 1)
    assert best < 0.95 * start and state["best_epoch"] > 0, state["history"]
    assert best < 0.5 * baseline["loss"], (best, baseline)
    model = load_checkpoint(out).model
    ours = validate(model, items, cfg, torch.device("cpu"), 0, 1)
    assert ours["loss"] == pytest.approx(best, rel=1e-4)  # the saved checkpoint is the best one
    assert ours["psnr"] > baseline["psnr"] + 1.0


def test_checkpoint_round_trip_keeps_config_weights_and_meta(trained):
    cfg, out, state = trained
    ck = load_checkpoint(out)
    assert ck.config == cfg.model
    assert ck.meta["best_val_loss"] == pytest.approx(state["best"])
    assert ck.meta["archive"] == cfg.archive and ck.meta["train_config"]["lr"] == cfg.lr
    again = load_checkpoint(out)
    x = torch.rand(1, 1, 40, 36)
    assert torch.equal(ck.model(x), again.model(x)) and ck.identity == again.identity
    last = load_checkpoint(out.with_name(out.name + ".last"))
    assert last.meta["epoch"] == state["epoch"]


def test_resume_continues_where_the_run_stopped(archive, tmp_path):
    train(small_config(archive, tmp_path / "full.pt", epochs=3))
    part = train(small_config(archive, tmp_path / "part.pt", epochs=3, stop_after_epochs=2))  # "interrupted"
    assert part["epoch"] == 2
    resumed = train(small_config(archive, tmp_path / "part.pt", epochs=3, resume=str(tmp_path / "part.pt")))
    assert resumed["epoch"] == 3
    # resuming changes nothing: 2 + 1 epochs == 3 epochs (same schedule length, same seeds)
    a = load_checkpoint(tmp_path / "full.pt.last").model.state_dict()
    b = load_checkpoint(tmp_path / "part.pt.last").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_two_process_torchrun_matches_one_process(archive, tmp_path):
    """Same global batches, same per-sample seeds, gradients summed across the processes.

    Adam turns float-noise-sized gradients into lr-sized steps (e.g. conv biases in front of
    InstanceNorm, whose true gradient is 0), so the run uses a small lr: the weights then agree
    to a few lr-sized steps and what the model computes (its validation loss) to 1e-3."""
    args = ["--archive", str(archive), "--downsample", "4", "--width", "8", "--epochs", "2", "--batch", "4",
            "--crop", "96", "--points", "4096", "--lr", "1e-4", "--threads", "1", "--no-progress", "--cache", str(Path(archive).parent / "cache")]
    train(small_config(archive, tmp_path / "one.pt", width=8, epochs=2, batch=4, crop=96, threads=1,
                       levels=5, lr=1e-4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cli", "train",
                           *args, "--out", str(tmp_path / "two.pt")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one.pt.last")
    two = load_checkpoint(tmp_path / "two.pt.last")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    sa, sb = one.model.state_dict(), two.model.state_dict()
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    steps = two.meta["step"]
    assert worst < 2 * 1e-4 * steps, worst
    assert two.meta["val"]["loss"] == pytest.approx(one.meta["val"]["loss"], rel=1e-3)


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    from training.loop import lr_schedule

    cfg = TrainConfig(lr=1e-3, warmup_steps=5, min_lr_ratio=0.02)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = lr_schedule(optimizer, 100, cfg)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert rates[5] == pytest.approx(1e-3) and rates[-1] == pytest.approx(2e-5, rel=0.05)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))  # never rises after the warm-up
    assert rates[52] == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5), rel=0.02)  # half way: the mean
    # a resumed run picks the schedule up at its step
    again = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    lr_schedule(again, 100, cfg, done_steps=37)
    assert again.param_groups[0]["lr"] == pytest.approx(rates[37])
    # with a time limit, the decay follows the clock when it is further along than the steps
    timed = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    lr_schedule(timed, 100, cfg, done_steps=10, time_fraction=lambda: 1.0)
    assert timed.param_groups[0]["lr"] == pytest.approx(2e-5)


def test_the_train_options_are_the_config_fields_with_their_defaults(tmp_path):
    """`dicom-node train`'s options are built from TrainConfig and ModelConfig: no option left
    at its default gives anything but the dataclasses' defaults."""
    import click

    from training.commands import train_command, train_config

    def parsed(*args):
        ctx = train_command.make_context("train", ["--archive", str(tmp_path), "--out", "w.pt", *args])
        return train_config(**{**ctx.params, "device": "cpu"})

    assert parsed() == TrainConfig(archive=str(tmp_path), out="w.pt", device="cpu")
    cfg = parsed("--downsample", "16", "--work-size", "192", "--no-augment", "--no-progress", "--map-weights",
                 "0,0,0,1", "--hold-out", "real-a", "--hold-out", "real-b", "--batch", "2")
    assert cfg.model == ModelConfig(downsample=16, work_size=192)
    assert (cfg.augment, cfg.progress, cfg.map_weights, cfg.hold_out, cfg.batch) == (
        False, False, (0.0, 0.0, 0.0, 1.0), ("real-a", "real-b"), 2)
    with pytest.raises(click.BadParameter, match="four comma-separated weights: a,b,wc,ww"):
        parsed("--map-weights", "1,2")
    with pytest.raises(click.BadParameter, match="'32' is not one of '4', '8', '16'"):
        parsed("--downsample", "32")
