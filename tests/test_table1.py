"""Table 1 end to end: every learned row trains with the shared loop and loads through evaluate;
the generator writes a table with every row and both figures (issue 6)."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from benchmarks.report import METHODS
from benchmarks.table1 import QUICK, Run, aggregate, learned_rows, run_all
from model.checkpoint import load_checkpoint
from training.archive import Archive
from training.baselines import BASELINES, baseline_config
from training.evaluate import evaluate
from training.loop import TrainConfig, train, validate
from training.synth import synthesise

# Small enough for the default suite (3-level ResUNets, so the /16 model fits 400 px images).
TINY = replace(QUICK, anatomies=4, perturbations=2, max_size=400, levels=3, epochs=1, width=4, crop=96, batch=2,
               timing_repeats=1, timing_shape=(300, 240))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return synthesise(tmp_path_factory.mktemp("t1") / "archive", n=4, seed=5, perturbations=2, max_size=320, real=False)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_trains_with_the_shared_loop_lowers_its_loss_and_loads_through_evaluate(name, archive, tmp_path):
    config = baseline_config(name, width=8, levels=3)  # 3 levels: the ResUNet fits 320 px images at /8
    out = tmp_path / f"{name.split(':')[1]}.pt"
    cfg = TrainConfig(archive=str(archive), out=str(out), model=config, epochs=4, lr=3e-3,
                      batch=2, crop=96, points=2048, augment=False, seed=0, threads=2, progress=False,
                      cache=str(Path(archive).parent / "cache"))
    torch.manual_seed(cfg.seed)  # the loop's initial model: same seed, same config
    from model.net import build_model

    start = build_model(config, BASELINES)
    items = Archive(archive, config.downsample, cache=cfg.cache).items("train")  # what it optimises (2 anatomies)
    before = validate(start, items, cfg, torch.device("cpu"), 0, 1)
    train(cfg)
    trained = load_checkpoint(out, baselines=BASELINES)
    assert trained.config.arch == config.arch and trained.config.extra == config.extra
    after = validate(trained.model, items, cfg, torch.device("cpu"), 0, 1)
    assert after["loss"] < before["loss"]
    result = evaluate(archive, out, split="test", cache=cfg.cache, references={})
    summary = result.summary[0]
    assert summary["method"] == "model" and summary["images"] == 2
    assert math.isfinite(summary["psnr"]) and 0 < summary["ssim"] <= 1 and math.isfinite(summary["consistency"])
    assert "a_mae" not in summary  # no maps, so no map MAE


def test_quick_table_generator_writes_every_row_and_both_figures(tmp_path):
    run = Run(mode=TINY, out=tmp_path / "results", work=tmp_path / "work", seed=3, device="cpu", threads=2,
              log=lambda *a: None)
    markdown = run_all(run, "python -m benchmarks.table1 --quick")
    table = (run.out / "table1.md").read_text()
    assert table.startswith(markdown.splitlines()[0])
    names = [line.split("|")[1].strip().strip("*") for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| Method")]
    assert names == list(METHODS.values())
    assert len(learned_rows(TINY.width, TINY.levels)) == 7
    measured = json.loads((run.out / "table1.json").read_text())
    assert sorted(row["key"] for row in measured["rows"]) == sorted(METHODS)  # every row measured
    assert all(math.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1 for row in measured["rows"])
    for name in ("fig3.png", "fig4.png"):
        figure = imread(run.out / name)
        assert figure.shape[0] > 100 and figure[..., :3].std() > 0.05  # drawn, not blank
    assert imread(run.out / "fig3.png").shape[1] > imread(run.out / "fig3.png").shape[0]  # two bands of six panels, wider than tall
    assert "Targets (issue 6)" in table and "Quick-mode numbers" in table
    # the checkpoints are reused by a second run with the same settings (an interrupted full run resumes)
    logs = []
    run_all(replace(run, log=logs.append), "again")
    assert sum("reusing" in line for line in logs) == 1 + 7


def test_the_seeds_table_reads_each_seeds_json_back(tmp_path):
    run = Run(mode=replace(TINY, anatomies=3), out=tmp_path / "results" / "seed-1", work=tmp_path / "work", seed=1,
              device="cpu", threads=2, only=("proposed-ds8", "percentile-window"), log=lambda *a: None)
    single = run_all(run, "one seed")
    with pytest.raises(SystemExit, match="seed-2/table1.json is missing"):
        aggregate(tmp_path / "results", [1, 2], "two seeds")
    (tmp_path / "results" / "seed-2").mkdir()
    (tmp_path / "results" / "seed-2" / "table1.json").write_bytes((run.out / "table1.json").read_bytes())
    both = aggregate(tmp_path / "results", [1, 2], "two seeds")
    assert (tmp_path / "results" / "table1.md").read_text() == both and "mean of 2 seeds" in both

    def rows_of(markdown):  # the first table's rows: two equal seeds average to the single seed's numbers
        table = markdown.split("## Per seed")[0]
        return [line.split("|")[2:4] for line in table.splitlines() if line.startswith("| ") and "Method" not in line]

    assert rows_of(both) == rows_of(single) and len(rows_of(single)) == 2
    saved = json.loads((tmp_path / "results" / "table1.json").read_text())
    assert [r["psnr"] for r in saved["rows"]] == pytest.approx([r["psnr"] for r in saved["per_seed"]["1"]])
    other = json.loads((run.out / "table1.json").read_text())
    other["mode"]["epochs"] += 1  # a seed trained with other settings is not averaged in
    (tmp_path / "results" / "seed-2" / "table1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"different settings \(epochs\)"):
        aggregate(tmp_path / "results", [1, 2], "two seeds")
