"""`dicom-node explain`: the PNG report and the JSON numbers, checked against the predictor."""
from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from dicom_node.reader import load_dataset, read_radiograph
from model.anatomy import find_anatomy_mask
from model.net import MAP_NAMES
from model.predictor import Predictor
from model.remap import remap
from support.helpers import make_seeded_checkpoint, phantom_dataset, testdata


@pytest.fixture(scope="module")
def seeded_weights(tmp_path_factory):
    return make_seeded_checkpoint(tmp_path_factory.mktemp("w") / "seeded.pt")


def _explain(tmp_path, weights, path):
    return CliRunner().invoke(main, ["explain", str(path), "--weights", str(weights), "--out", str(tmp_path / "report"),
                                     "--device", "cpu"])


def test_explain_on_rg1_writes_the_png_and_json_whose_numbers_match_the_predictor(seeded_weights, tmp_path):
    result = _explain(tmp_path, seeded_weights, testdata("RG1_UNCR.dcm"))
    assert result.exit_code == 0, result.output
    png, report = tmp_path / "report" / "RG1_UNCR.png", tmp_path / "report" / "RG1_UNCR.json"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 800 and image.shape[1] > 1600 and float(image[..., :3].std()) > 0.05  # a real picture
    summary = json.loads(report.read_text())

    predictor = Predictor(seeded_weights, "cpu")
    x = read_radiograph(load_dataset(testdata("RG1_UNCR.dcm")))
    prediction = predictor(x, want_z=True)
    assert (summary["window"]["wc"], summary["window"]["ww"]) == pytest.approx(prediction.window, abs=0)
    assert summary["model"] == {"name": predictor.name, "identity": predictor.identity, "weights": str(seeded_weights),
                                "downsample": prediction.downsample}
    assert summary["maps"]["resolution"] == list(prediction.maps.shape[-2:])
    for i, name in enumerate(MAP_NAMES):
        values = prediction.maps[i].numpy().astype(np.float64)
        stats = summary["maps"]["statistics"][name]
        assert stats["min"] == values.min() and stats["max"] == values.max()
        assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert stats["p5"] == pytest.approx(np.percentile(values, 5), rel=1e-9)
        assert stats["p95"] == pytest.approx(np.percentile(values, 95), rel=1e-9)
    assert summary["maps"]["statistics"]["wc"]["median"] == summary["window"]["wc"]

    body = find_anatomy_mask(x)
    shown = prediction.z_aggregate().numpy()
    assert summary["burnt_out"]["voi"] == {"white": float((shown[body] > 0.98).mean()), "black": float((shown[body] < 0.02).mean())}
    assert summary["coordinates"] == "(row, col) of the full-resolution image"

    full = prediction.full_maps()
    y, z = prediction.y.numpy(), prediction.z.numpy()
    points = summary["points"]
    assert [p["label"] for p in points] == ["darkest tissue", "middle tissue", "brightest tissue"]
    assert points[0]["x"] < points[1]["x"] < points[2]["x"]
    assert all(body[p["row"], p["col"]] for p in points)  # tissue, not collimation or air
    for p in points:
        r, c = p["row"], p["col"]
        assert p["x"] == float(x[r, c]) and p["y"] == float(y[r, c]) and p["z"] == float(z[r, c])
        assert [p[n] for n in MAP_NAMES] == [float(full[n][r, c]) for n in MAP_NAMES]
        # The curve through the point is the remap with the pixel's own parameters.
        assert float(remap(torch.tensor([[p["x"]]]), p["a"], p["b"], p["wc"], p["ww"]).z) == pytest.approx(p["z"], abs=1e-6)


def test_explain_reports_the_known_maps_of_a_constant_model(constant_weights, tmp_path):
    result = _explain(tmp_path, constant_weights, testdata("RG1_UNCR.dcm"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "report" / "RG1_UNCR.json").read_text())
    assert (summary["window"]["wc"], summary["window"]["ww"]) == pytest.approx((0.5, 0.5), abs=1e-5)
    for name, value in zip(MAP_NAMES, (1.0, 0.0, 0.5, 0.5)):
        stats = summary["maps"]["statistics"][name]
        assert stats["min"] == pytest.approx(value, abs=1e-5) and stats["max"] == pytest.approx(value, abs=1e-5)
    for p in summary["points"]:
        assert p["y"] == pytest.approx(p["x"], abs=1e-6)  # a = 1, b = 0: the regional LUT is the identity


@pytest.mark.parametrize("content, reason", [(b"not a dicom file", "not a DICOM file"), (None, "Photometric Interpretation")])
def test_explain_refuses_what_enhance_refuses_with_one_line(constant_weights, tmp_path, content, reason):
    if content is None:
        path = testdata("SC_rgb.dcm")  # a colour image: enhance skips it too
    else:
        path = tmp_path / "junk.dcm"
        path.write_bytes(content)
    result = _explain(tmp_path, constant_weights, path)
    assert result.exit_code == 2
    assert reason in result.output and "Traceback" not in result.output
    assert not (tmp_path / "report").exists() or not list((tmp_path / "report").iterdir())


@pytest.mark.parametrize("source", ["RG3_J2KR.dcm", "phantom-DX-MONOCHROME1"])
def test_explain_works_on_other_files_enhance_accepts(constant_weights, tmp_path, source):
    if source.startswith("phantom"):
        ds = phantom_dataset(300, 240, modality="DX", photometric="MONOCHROME1")  # no window in the file
        path = tmp_path / "phantom.dcm"
        ds.save_as(path, enforce_file_format=True)
    else:
        path = testdata(source)  # JPEG 2000 lossless
    result = _explain(tmp_path, constant_weights, path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "report" / f"{path.stem}.json").read_text())
    x = read_radiograph(load_dataset(path))
    assert [summary["source"]["rows"], summary["source"]["columns"]] == list(x.shape)
    assert all(p["x"] == float(x[p["row"], p["col"]]) for p in summary["points"])
    figure = matplotlib.image.imread(tmp_path / "report" / f"{path.stem}.png")
    assert min(figure.shape[:2]) > 300 and figure[..., :3].std() > 0.05  # the panels are drawn, not blank
