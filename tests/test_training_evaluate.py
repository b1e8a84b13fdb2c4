"""`dicom-node evaluate` and the bundled default model (issue 4)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from support.helpers import make_constant_checkpoint
from training.evaluate import METHODS, evaluate
from training.synth import synthesise

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "model" / "weights" / "default.pt"


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    return synthesise(tmp_path_factory.mktemp("ev") / "arch", n=4, seed=31, perturbations=3, max_size=300)


def test_evaluate_reports_fidelity_consistency_and_both_references(small_archive, tmp_path):
    weights = make_constant_checkpoint(tmp_path / "const.pt", a=1.0, b=0.0, wc=0.5, ww=0.5, downsample=8)
    result = evaluate(small_archive, weights, split="test", csv_path=tmp_path / "per_image.csv", cache=str(tmp_path / "c"))
    assert [s["method"] for s in result.summary] == list(METHODS)
    for s in result.summary:
        assert 0 < s["psnr"] < 100 and -1 <= s["ssim"] <= 1
        assert s["consistency"] >= 0 and not math.isnan(s["consistency"])
    lines = (tmp_path / "per_image.csv").read_text().splitlines()
    assert lines[0].startswith("id,group,method,")
    assert len(lines) == 1 + 3 * result.summary[0]["images"]
    # a constant window on the raw input is exactly as inconsistent as the raw input's own window
    # changes allow: y = x so its spread follows the acquisition (consistency near that of x)
    const = result.summary[0]
    assert const["consistency"] > 0.2
    assert "PSNR dB" in result.table()


def test_teacher_reference_is_consistent_where_the_perturbation_is_global(small_archive, tmp_path):
    """Reference B normalises a global gain/offset: its outputs vary far less than the inputs."""
    weights = make_constant_checkpoint(tmp_path / "const.pt")
    result = evaluate(small_archive, weights, split="test", cache=str(tmp_path / "c"))
    b = {s["method"]: s for s in result.summary}["B: teacher on input"]
    assert b["consistency"] < 0.8


@pytest.fixture(scope="module")
def fresh_test_split(tmp_path_factory):
    """The test split of a freshly synthesised archive, another seed than the bundled model's
    training archive (seed 1), at the synth defaults' full size: 2 anatomies x 3 acquisitions."""
    return synthesise(tmp_path_factory.mktemp("fresh") / "arch", n=12, seed=1234, perturbations=3, real=False,
                      only=("test",))


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model")
def test_bundled_model_meets_its_floor_on_a_fresh_test_split(fresh_test_split, tmp_path):
    result = evaluate(fresh_test_split, BUNDLED, split="test", cache=str(tmp_path / "c"))
    by = {s["method"]: s for s in result.summary}
    model, a, b = by["model"], by["A: percentile window"], by["B: teacher on input"]
    # the floor for any fresh split (30 dB, 0.97); the prior model measures 46.3 dB, 0.9998
    # here (docs/training.md), the teacher on the same input 46.3 dB
    assert model["psnr"] > 30 and model["ssim"] > 0.97, result.table()
    assert model["psnr"] > a["psnr"] + 3, result.table()
    # never worse than the classical prior it corrects (it starts there and is kept only if better)
    assert model["psnr"] > b["psnr"] - 0.5 and model["consistency"] < 1.1 * b["consistency"], result.table()
    assert model["consistency"] < a["consistency"], result.table()


def test_synth_train_evaluate_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from cli import main

    runner = CliRunner()
    arch, weights = tmp_path / "arch", tmp_path / "w.pt"
    r = runner.invoke(main, ["synth", "--out", str(arch), "--n", "4", "--seed", "3", "--perturbations", "2",
                             "--max-size", "320", "--no-real"])
    assert r.exit_code == 0, r.output
    with open(arch / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 4 * 2 and all((arch / row["raw"]).is_file() for row in manifest)  # 4 anatomies x 2
    assert "\r" not in r.output  # no progress line piled up in a pipe or a log
    r = runner.invoke(main, ["train", "--archive", str(arch), "--out", str(weights), "--epochs", "2", "--width", "4", "--downsample", "4",
                             "--crop", "64", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "epoch   2" in r.output
    trained = load_checkpoint(weights)
    assert (trained.config.width, trained.config.downsample) == (4, 4) and trained.meta["epoch"] <= 2
    r = runner.invoke(main, ["evaluate", "--archive", str(arch), "--weights", str(weights), "--csv", str(tmp_path / "e.csv")])
    assert r.exit_code == 0, r.output
    assert "B: teacher on input" in r.output
    with open(tmp_path / "e.csv") as f:
        scored = list(csv.DictReader(f))
    test_rows = [row for row in manifest if row["split"] == "test"]
    methods = {"model", "model + guard", "A: percentile window", "B: teacher on input"}
    assert {row["method"] for row in scored} == methods and len(scored) == len(methods) * len(test_rows)
    assert {row["id"] for row in scored} == {row["id"] for row in test_rows}
    assert all(float(row["psnr"]) > 5 and 0 < float(row["ssim"]) <= 1 for row in scored)
    assert "\r" not in r.output


def test_evaluate_scores_the_model_with_the_window_guard_and_without(small_archive, tmp_path):
    harsh = make_constant_checkpoint(tmp_path / "harsh.pt", a=1.0, b=0.0, wc=0.5, ww=0.05)
    result = evaluate(small_archive, harsh, split="test", cache=str(tmp_path / "c"), guard=0.02)
    by = {s["method"]: s for s in result.summary}
    assert list(by) == ["model", "model + guard", *METHODS[1:]]
    assert by["model + guard"]["psnr"] != pytest.approx(by["model"]["psnr"], abs=0.1)  # the guard acted
    plain = evaluate(small_archive, harsh, split="test", cache=str(tmp_path / "c"))
    assert [s["method"] for s in plain.summary] == list(METHODS)  # no guard asked, no guard row
