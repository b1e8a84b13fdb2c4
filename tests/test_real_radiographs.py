"""The bundled model on the real radiographs, as a viewer shows them: the real-radiograph targets.

The same metrics as `python -m benchmarks.real_radiographs` (training/real_radiographs.py), on
RG1 (chest) and RG3 (tibia), their MONOCHROME twins and three smooth perturbations each, so a
model that burns anatomy out, flattens it or wobbles with the acquisition fails CI.
"""
from pathlib import Path

import pytest

from dicom_node.enhancer import Enhancer
from dicom_node.reader import load_dataset
from model import DEFAULT_WEIGHTS
from support.helpers import testdata
from training.real_radiographs import classical_methods, enhancer_method, measure, variants

IMAGES = ("RG1_UNCR", "RG3_UNCR")
OURS = ("ours voi", "ours burn-in")


@pytest.fixture(scope="module")
def measured():
    inputs = []
    for name in IMAGES:
        path = Path(testdata(f"{name}.dcm"))
        inputs += variants(path, load_dataset(path), perturbations=3, kinds=("mono-twin",))
    classical = classical_methods()
    methods = {"own window": classical["own window"], "CLAHE": classical["CLAHE"]}
    for mode in ("voi", "burn-in"):  # the model alone: the window guard is off
        methods[f"ours {mode}"] = enhancer_method(Enhancer(DEFAULT_WEIGHTS, "cpu", mode, max_burnt_out=0.0))
    return measure(inputs, methods)


def _rows(measured, method):
    return [r for r in measured.rows if r["method"] == method]


@pytest.mark.parametrize("method", OURS)
def test_no_more_than_two_percent_of_the_anatomy_is_shown_pure_white_or_black(measured, method):
    worst = max(_rows(measured, method), key=lambda r: r["burnt"])
    assert worst["burnt"] <= 0.02, worst


@pytest.mark.parametrize("method", OURS)
def test_local_contrast_is_at_least_one_and_a_half_times_the_files_own_window(measured, method):
    worst = min(_rows(measured, method), key=lambda r: r["contrast_ratio"])
    assert worst["contrast_ratio"] >= 1.5, worst


@pytest.mark.parametrize("method", OURS)
def test_the_structures_survive(measured, method):
    worst = min(_rows(measured, method), key=lambda r: r["ssim"])
    assert worst["ssim"] >= 0.6, worst


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("image", IMAGES)
def test_a_smooth_change_of_the_acquisition_moves_the_output_no_more_than_clahe(measured, method, image):
    ours, clahe = measured.consistency[(image, method)], measured.consistency[(image, "CLAHE")]
    assert ours <= clahe, (ours, clahe)


@pytest.mark.parametrize("method", OURS)
@pytest.mark.parametrize("image", IMAGES)
def test_the_monochrome2_twin_displays_like_its_monochrome1_original(measured, method, image):
    assert measured.twin_difference[(image, method)] <= 1 / 255
