"""DICOM out: the derived instance of design.md, checked by pydicom, DCMTK and dciodvfy."""
import copy
import os
import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut

from dicom_node.enhancer import Enhancer
from dicom_node.reader import load_dataset, read_radiograph
from dicom_node.writer import DX_FOR_PRESENTATION, ModelStamp, derive_instance, is_derived_by_us
from support.helpers import make_constant_checkpoint, phantom_dataset, testdata

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
A, B, WC, WW = 1.2, -0.1, 0.45, 0.3


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_constant_checkpoint(tmp_path_factory.mktemp("w") / "c.pt", a=A, b=B, wc=WC, ww=WW)


@pytest.fixture(scope="module")
def chest():
    return load_dataset(testdata("RG1_UNCR.dcm"))


def _saved(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_voi_mode_stores_y_and_a_sigmoid_window(weights, chest, tmp_path):
    derived = _saved(Enhancer(weights, "cpu", "voi").enhance(chest), tmp_path / "out.dcm")
    x = read_radiograph(chest)
    expected = np.rint(np.clip(A * x + B, 0, 1) * 65535).astype(np.uint16)
    assert np.abs(derived.pixel_array.astype(int) - expected.astype(int)).max() <= 1
    assert derived.PhotometricInterpretation == "MONOCHROME2"
    assert (derived.BitsStored, derived.BitsAllocated, derived.PixelRepresentation) == (16, 16, 0)
    assert float(derived.WindowCenter) == pytest.approx(65535 * WC, rel=1e-5)
    assert float(derived.WindowWidth) == pytest.approx(65535 * WW, rel=1e-5)
    assert derived.VOILUTFunction == "SIGMOID"
    assert derived.WindowCenterWidthExplanation
    assert derived.ImageType[0] == "DERIVED"
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == chest.SOPInstanceUID
    assert derived.SourceImageSequence[0].ReferencedSOPClassUID == chest.SOPClassUID
    assert "enhanced" in derived.SeriesDescription
    assert "model" in derived.DerivationDescription
    assert derived.SOPInstanceUID != chest.SOPInstanceUID
    assert derived.SeriesInstanceUID != chest.SeriesInstanceUID
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert derived.get(keyword) == chest.get(keyword)


def test_written_window_reproduces_the_presentation_in_a_dicom_viewer_pipeline(tmp_path):
    # Maps that vary over the image (fixed random weights): the tags must carry the aggregate window.
    import torch

    from model.checkpoint import save_checkpoint
    from model.net import ModelConfig, build_model

    torch.manual_seed(7)
    weights = tmp_path / "random.pt"
    save_checkpoint(weights, build_model(ModelConfig(width=8)))
    source = load_dataset(testdata("RG3_UNCR.dcm"))
    enhancer = Enhancer(weights, "cpu", "voi")
    derived = _saved(enhancer.enhance(source), tmp_path / "out.dcm")
    prediction = enhancer.predictor(read_radiograph(source))
    shown = apply_voi_lut(derived.pixel_array, derived)  # pydicom's PS3.3 C.11.2 implementation
    expected = 65535 * prediction.z_aggregate().numpy()
    assert np.abs(shown - expected).max() < 3.0  # uint16 rounding of y, amplified by the window slope


def test_burn_in_mode_stores_z_with_a_full_range_linear_window(weights, chest, tmp_path):
    derived = _saved(Enhancer(weights, "cpu", "burn-in").enhance(chest), tmp_path / "out.dcm")
    x = read_radiograph(chest)
    z = 1 / (1 + np.exp(-4 * (np.clip(A * x + B, 0, 1) - WC) / WW))
    assert np.abs(derived.pixel_array.astype(float) - 65535 * z).max() <= 1.01
    assert derived.VOILUTFunction == "LINEAR"
    shown = apply_voi_lut(derived.pixel_array, derived)
    assert np.abs(shown - derived.pixel_array).max() <= 1.0  # the window leaves z as it is


def test_dcmtk_renders_the_output(weights, chest, tmp_path):
    if shutil.which("dcmj2pnm") is None and not os.environ.get("CI"):
        pytest.skip("DCMTK not installed (.ci/run installs it)")
    from matplotlib.pyplot import imread

    derived = Enhancer(weights, "cpu", "voi").enhance(chest)
    derived.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    result = subprocess.run(["dcmj2pnm", "+Wi", "1", "+on", str(tmp_path / "out.dcm"), str(tmp_path / "out.png")],
                            env=DCMTK_ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # DCMTK shows the stored y under the file's SIGMOID window: the presentation z, to one 8-bit step
    shown = imread(tmp_path / "out.png")
    y = derived.pixel_array / 65535.0
    wc, ww = float(derived.WindowCenter) / 65535, float(derived.WindowWidth) / 65535
    assert shown.shape == y.shape
    assert np.abs(shown - 1 / (1 + np.exp(-4 * (y - wc) / ww))).max() <= 1.5 / 255


def _dciodvfy_errors(path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    return {re.sub(r"^Error - ", "", line.strip()) for line in lines if line.strip().startswith("Error")}


@pytest.mark.parametrize("source_name", ["RG1_UNCR.dcm", "RG3_J2KR.dcm", "phantom-DX", "phantom-CR-MONOCHROME1",
                                         "CT_small.dcm", "MR_small.dcm"])
@pytest.mark.parametrize("mode", ["voi", "burn-in"])
def test_dciodvfy_finds_no_error_the_source_did_not_have(weights, tmp_path, source_name, mode):
    if shutil.which("dciodvfy") is None and not os.environ.get("CI"):
        pytest.skip("dicom3tools not installed (.ci/run installs it)")
    if source_name.startswith("phantom"):
        _, modality, *photometric = source_name.split("-")
        source = phantom_dataset(300, 240, modality=modality, photometric=(photometric or ["MONOCHROME2"])[0])
        source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
        source_path = tmp_path / "source.dcm"
    else:
        source_path = testdata(source_name)
    source = load_dataset(source_path)
    derived = Enhancer(weights, "cpu", mode).enhance(source)
    derived.save_as(tmp_path / "derived.dcm", enforce_file_format=True)
    new_errors = _dciodvfy_errors(tmp_path / "derived.dcm") - _dciodvfy_errors(source_path)
    assert not new_errors, new_errors


def test_dx_for_processing_becomes_dx_for_presentation(weights, tmp_path):
    source = phantom_dataset(300, 240, modality="DX")
    derived = _saved(Enhancer(weights, "cpu").enhance(source), tmp_path / "dx.dcm")
    assert derived.SOPClassUID == DX_FOR_PRESENTATION
    assert derived.file_meta.MediaStorageSOPClassUID == DX_FOR_PRESENTATION
    assert derived.PresentationIntentType == "FOR PRESENTATION"
    assert (derived.RescaleSlope, derived.RescaleIntercept) == (1, 0)  # identity Modality LUT


def test_same_input_twice_gives_the_same_uids_and_another_model_or_mode_new_ones(weights, chest, tmp_path):
    first = Enhancer(weights, "cpu").enhance(chest)
    again = Enhancer(weights, "cpu").enhance(chest)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    other_model = make_constant_checkpoint(tmp_path / "other.pt", a=1.1, b=-0.1, wc=WC, ww=WW)
    other = Enhancer(other_model, "cpu").enhance(chest)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    burn_in = Enhancer(weights, "cpu", "burn-in").enhance(chest)
    assert burn_in.SOPInstanceUID != first.SOPInstanceUID


def test_images_of_one_series_land_in_one_derived_series(weights):
    first = phantom_dataset(200, 160, seed=1)
    second = phantom_dataset(200, 160, seed=1)
    second.SOPInstanceUID = pydicom.uid.generate_uid()
    enhancer = Enhancer(weights, "cpu")
    a, b = enhancer.enhance(first), enhancer.enhance(second)
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


def test_source_dataset_is_never_modified(weights, chest):
    before = copy.deepcopy(chest)
    Enhancer(weights, "cpu").enhance(chest)
    assert chest == before
    assert chest.file_meta == before.file_meta


def test_our_output_is_recognised_and_a_modality_derived_image_is_not(weights, chest, tmp_path):
    derived = _saved(Enhancer(weights, "cpu").enhance(chest), tmp_path / "out.dcm")
    assert is_derived_by_us(derived)
    assert not is_derived_by_us(chest)
    console_derived = phantom_dataset(100, 100)
    console_derived.ImageType = ["DERIVED", "SECONDARY"]
    console_derived.DerivationDescription = "console post-processing"
    assert not is_derived_by_us(console_derived)


def test_constructor_validates_its_input(chest):
    stamp = ModelStamp(name="m", identity="0" * 64)
    with pytest.raises(ValueError, match="y must be a numpy array of the source's shape"):
        derive_instance(chest, y=np.zeros((10, 10)), window=(0.5, 0.5), stamp=stamp)
    with pytest.raises(ValueError, match="mode"):
        derive_instance(chest, y=np.zeros((1955, 1841)), window=(0.5, 0.5), stamp=stamp, mode="sepia")
    with pytest.raises(ValueError, match="burn-in mode needs z"):
        derive_instance(chest, y=np.zeros((1955, 1841)), window=(0.5, 0.5), stamp=stamp, mode="burn-in")
    with pytest.raises(ValueError, match="window"):
        derive_instance(chest, y=np.zeros((1955, 1841)), window=(0.5, 0.0), stamp=stamp)
    with pytest.raises(TypeError, match="source must be a pydicom Dataset"):
        derive_instance({"not": "a dataset"}, y=np.zeros((2, 2)), window=(0.5, 0.5), stamp=stamp)


@pytest.mark.parametrize("syntax", ["jpeg2000-lossless", "rle", "jpeg-ls-lossless"])
def test_a_compressed_output_decodes_to_the_uncompressed_output_exactly_and_passes_dciodvfy(weights, tmp_path, syntax):
    from dicom_node.writer import OUTPUT_SYNTAXES

    source_path = testdata("RG1_UNCR.dcm")
    source = load_dataset(source_path)
    plain = _saved(Enhancer(weights, "cpu", "voi").enhance(source), tmp_path / "plain.dcm")
    packed = _saved(Enhancer(weights, "cpu", "voi", output_syntax=syntax).enhance(source), tmp_path / "packed.dcm")

    assert packed.file_meta.TransferSyntaxUID == OUTPUT_SYNTAXES[syntax]
    # RLE (byte planes) gains little on a radiograph's noisy low byte; the JPEGs about half
    limit = 1.0 if syntax == "rle" else 0.8
    assert (tmp_path / "packed.dcm").stat().st_size < limit * (tmp_path / "plain.dcm").stat().st_size
    assert packed.SOPInstanceUID == plain.SOPInstanceUID  # the same instance, only encoded differently
    np.testing.assert_array_equal(packed.pixel_array, plain.pixel_array)
    if shutil.which("dciodvfy") is None and not os.environ.get("CI"):
        pytest.skip("dicom3tools not installed (.ci/run installs it)")
    assert not _dciodvfy_errors(tmp_path / "packed.dcm") - _dciodvfy_errors(source_path)


def test_every_configurable_output_syntax_has_an_encoding():
    from dicom_node.config import OUTPUT_TRANSFER_SYNTAXES
    from dicom_node.writer import OUTPUT_SYNTAXES

    assert tuple(OUTPUT_SYNTAXES) == OUTPUT_TRANSFER_SYNTAXES
