"""The classical anatomy mask (model.anatomy) on the real radiographs and on phantoms."""
import numpy as np
import pytest
import torch

from dicom_node.reader import load_dataset, read_radiograph
from model.anatomy import find_anatomy_mask
from model.remap import downsample_image
from support.helpers import testdata
from training.phantoms import make_phantom


@pytest.fixture(scope="module")
def chest():
    return read_radiograph(load_dataset(testdata("RG1_UNCR.dcm")))


@pytest.fixture(scope="module")
def tibia():
    return read_radiograph(load_dataset(testdata("RG3_UNCR.dcm")))


def iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_the_chest_is_anatomy_almost_everywhere_but_the_air_above_the_shoulders(chest):
    mask = find_anatomy_mask(chest)
    assert 0.95 < mask.mean() < 0.995
    assert not mask[:40, :40].any()  # the top-left corner is direct exposure
    rows, cols = chest.shape
    assert mask[rows // 2 - 200: rows // 2 + 200, cols // 2 - 200: cols // 2 + 200].all()  # mediastinum
    assert mask[int(0.85 * rows):, cols // 3: 2 * cols // 3].mean() > 0.95  # below the diaphragm too


def test_the_tibia_mask_leaves_out_collimation_air_and_the_lead_marker(tibia):
    mask = find_anatomy_mask(tibia)
    assert 0.18 < mask.mean() < 0.3
    assert not mask[:, :300].any() and not mask[:, 1400:].any()  # collimation on both sides
    assert not mask[1350:1500, 1130:1230].any()  # the "R" marker in the direct exposure
    assert mask[800, 750:1050].all()  # the leg itself
    assert (tibia[mask] < 0.999).all()  # nothing of the saturated collimation plateau


@pytest.mark.parametrize("name, mirrored", [("chest", 0.9), ("tibia", 0.999)])
def test_the_mask_ignores_a_global_gain_and_offset_and_mostly_a_mirror(request, name, mirrored):
    """A borderline region (the dim band at the chest's right side) may fall either way when the
    image is mirrored: the resampling pads on one side only."""
    x = request.getfixturevalue(name)
    mask = find_anatomy_mask(x)
    assert iou(find_anatomy_mask(0.8 * x + 0.05), mask) > 0.97
    assert (find_anatomy_mask(x[:, ::-1].copy())[:, ::-1] == mask).mean() > mirrored


@pytest.mark.parametrize("name", ["chest", "tibia"])
def test_the_network_finds_the_same_mask_on_its_one_eighth_input(request, name):
    x = request.getfixturevalue(name)
    full = find_anatomy_mask(x)
    low = downsample_image(torch.from_numpy(x), 8)[0, 0].numpy()
    from_low = find_anatomy_mask(low, 8)
    assert iou(np.repeat(np.repeat(from_low, 8, 0), 8, 1)[: x.shape[0], : x.shape[1]], full) > 0.98


@pytest.mark.parametrize("anatomy", ["chest", "pelvis", "limb"])
def test_phantom_masks_roughly_agree_with_the_truth(anatomy):
    """Roughly: the mask finder misses direct exposure inside a collimated field where it is not
    flat enough (IoU 0.4-0.9 on phantoms, docs/training.md); synth's targets use what it finds."""
    ph = make_phantom(anatomy, 2000, 1800, seed=1)
    assert iou(find_anatomy_mask(ph.x), ph.mask) > 0.75


def test_a_flat_image_is_all_anatomy_rather_than_nothing():
    assert find_anatomy_mask(np.full((300, 200), 0.4, np.float32)).all()
    with pytest.raises(ValueError, match="2-D"):
        find_anatomy_mask(np.zeros((2, 3, 4)))
