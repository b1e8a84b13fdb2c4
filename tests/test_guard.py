"""The window guard ([model] max_burnt_out): a seat belt against burnt-out anatomy, recorded."""
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner

from cli import main
from dicom_node.enhancer import Enhancer
from dicom_node.reader import load_dataset, read_radiograph
from dicom_node.writer import PRIVATE_CREATOR, PRIVATE_GROUP
from model.anatomy import find_anatomy_mask
from model.remap import SATURATION_REACH, sigmoid_window, window_guard
from support.helpers import make_constant_checkpoint, testdata
from training.real_radiographs import burnt_out, viewer_display


@pytest.fixture(scope="module")
def harsh_weights(tmp_path_factory):
    """A model that shows RG1 through a narrow window: a third of the anatomy burns out."""
    return make_constant_checkpoint(tmp_path_factory.mktemp("w") / "harsh.pt", a=1.0, b=0.0, wc=0.8, ww=0.08)


@pytest.fixture(scope="module")
def chest():
    return load_dataset(testdata("RG1_UNCR.dcm"))


def test_window_guard_widens_as_little_as_keeps_the_asked_fraction_in_range():
    u = torch.cat([torch.linspace(-3, 0.5, 1000), torch.zeros(4000)])  # a long dark tail
    shift, scale = window_guard(u, 0.02)
    after = ((u - shift) / scale).abs() > SATURATION_REACH
    assert float(after.float().mean()) <= 0.02
    assert scale >= 1.0 and shift < 0  # widened, and moved towards the tail
    inside = torch.linspace(-0.5, 0.5, 1000)
    assert window_guard(inside, 0.02) == (0.0, 1.0)  # nothing to do
    with pytest.raises(ValueError, match="max_burnt_out"):
        window_guard(u, 0.0)


@pytest.mark.parametrize("mode", ["voi", "burn-in"])
def test_the_guard_keeps_the_anatomy_out_of_saturation_and_says_so(harsh_weights, chest, mode):
    body = find_anatomy_mask(read_radiograph(chest))
    unguarded = Enhancer(harsh_weights, "cpu", mode, max_burnt_out=0.0).enhance(chest)
    guarded = Enhancer(harsh_weights, "cpu", mode, max_burnt_out=0.02).enhance(chest)
    assert burnt_out(viewer_display(unguarded), body) > 0.2
    assert burnt_out(viewer_display(guarded), body) <= 0.025
    assert "window guard" not in unguarded.DerivationDescription
    assert "window guard: widened" in guarded.DerivationDescription
    block = guarded.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x04].value.startswith("window guard")
    assert guarded.SOPInstanceUID == unguarded.SOPInstanceUID  # the same derived instance, better shown


def test_the_guard_leaves_a_sane_window_alone(chest, tmp_path):
    gentle = make_constant_checkpoint(tmp_path / "gentle.pt", a=1.0, b=0.0, wc=0.65, ww=0.6)
    plain = Enhancer(gentle, "cpu", max_burnt_out=0.0).enhance(chest)
    guarded = Enhancer(gentle, "cpu", max_burnt_out=0.02).enhance(chest)
    assert guarded.DerivationDescription == plain.DerivationDescription
    assert np.array_equal(guarded.pixel_array, plain.pixel_array)
    assert (guarded.WindowCenter, guarded.WindowWidth) == (plain.WindowCenter, plain.WindowWidth)


def test_enhance_reports_each_guarded_file(harsh_weights, tmp_path):
    result = CliRunner().invoke(main, ["enhance", str(testdata("RG1_UNCR.dcm")), "--out", str(tmp_path / "out"),
                                       "--weights", str(harsh_weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "guarded" in result.output and "window guard: widened" in result.output
    (written,) = (tmp_path / "out").glob("*.dcm")
    assert "window guard" in pydicom.dcmread(written).DerivationDescription
    off = CliRunner().invoke(main, ["enhance", str(testdata("RG1_UNCR.dcm")), "--out", str(tmp_path / "off"),
                                    "--weights", str(harsh_weights), "--device", "cpu", "--max-burnt-out", "0"])
    assert "guarded" not in off.output


def test_sigmoid_saturation_reach_is_where_the_display_leaves_its_two_percent_margins():
    edge = torch.tensor([SATURATION_REACH, -SATURATION_REACH])
    assert sigmoid_window(edge, 0.0, 1.0).tolist() == pytest.approx([0.98, 0.02], abs=1e-6)
