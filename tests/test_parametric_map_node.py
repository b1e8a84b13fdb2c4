"""[model] parametric_map: the node sends the maps as a Parametric Map with the enhanced image,
to a real Orthanc, and a resend never duplicates anything."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.parametric_map import MAP_NAMES, PARAMETRIC_MAP_STORAGE, read_parametric_map
from dicom_node.reader import read_radiograph
from model.predictor import Predictor
from model.remap import remap
from support.helpers import make_seeded_checkpoint, testdata
from support.node_peers import NodeProcess, Orthanc, storescu, wait_until




def _with_parametric_map(node: NodeProcess) -> NodeProcess:
    text = node.config.read_text()
    assert "forward_original = true\n" in text
    node.config.write_text(text.replace("forward_original = true\n", "forward_original = true\nparametric_map = true\n"))
    return node


def read_uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.timeout(240)
def test_orthanc_receives_the_parametric_map_with_the_enhanced_image_and_a_resend_duplicates_nothing(tmp_path, peers):
    weights = make_seeded_checkpoint(tmp_path / "seeded.pt")
    orthanc = Orthanc(tmp_path / "orthanc")
    peers.append(orthanc)
    orthanc.start()
    node = _with_parametric_map(NodeProcess(tmp_path / "node", weights, [orthanc.destination]))
    peers.append(node)
    node.start()
    files = [testdata("RG1_UNCR.dcm"), testdata("CT_small.dcm")]

    sent = storescu(files, node.port)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    report = node.wait_drained(expected_done=2, timeout=180)
    assert report["counts"]["failed"] == 0, report
    # CR: original, enhanced, Parametric Map; CT: original only (not enhanced, so no map)
    wait_until(lambda: len(orthanc.sop_uids()) == 4, 30, what="4 instances in Orthanc")
    stored = {uid: orthanc.dataset(oid) for uid, oid in orthanc.instance_ids().items()}
    source = stored[read_uid(files[0])]
    maps_objects = [ds for ds in stored.values() if ds.SOPClassUID == PARAMETRIC_MAP_STORAGE]
    enhanced = [ds for ds in stored.values() if ds.SOPClassUID == source.SOPClassUID and ds.SOPInstanceUID != source.SOPInstanceUID]
    assert len(maps_objects) == 1 and len(enhanced) == 1
    pm, derived = maps_objects[0], enhanced[0]
    assert pm.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pm.StudyInstanceUID == source.StudyInstanceUID

    # The maps Orthanc holds are the predictor's, and with the source Orthanc holds they
    # reproduce the enhanced image Orthanc holds.
    maps = read_parametric_map(pm, source)
    x = read_radiograph(source)
    prediction = Predictor(weights, "cpu")(x, want_z=False)
    for i, name in enumerate(MAP_NAMES):
        np.testing.assert_array_equal(maps.maps[name], prediction.maps[i].numpy())
    a, b, wc, ww = (torch.from_numpy(maps.maps[n])[None, None] for n in MAP_NAMES)
    y, _ = remap(torch.from_numpy(x), a, b, wc, ww, downsample=maps.downsample, want_z=False)
    np.testing.assert_array_equal(derived.pixel_array, np.rint(np.clip(y.numpy(), 0, 1) * 65535).astype(np.uint16))

    # The same image again: a new job, the same derived UIDs, so Orthanc still holds 4 instances.
    again = storescu(files[:1], node.port)
    assert again.returncode == 0, again.stdout + again.stderr
    node.wait_drained(expected_done=3, timeout=120)
    assert sorted(orthanc.sop_uids()) == sorted(stored)
    # Delivered: the spool keeps neither the enhanced image nor the map.
    wait_until(lambda: not list((node.spool / "derived").glob("*.dcm")), 10, what="an empty derived/ in the spool")


def test_parametric_map_is_off_by_default_and_must_be_true_or_false(tmp_path):
    base = {"destinations": [{"name": "out", "type": "folder", "path": "out"}]}
    assert parse_config(base, tmp_path / "config.toml").model.parametric_map is False
    on = parse_config({**base, "model": {"parametric_map": True}}, tmp_path / "config.toml")
    assert on.model.parametric_map is True
    with pytest.raises(ConfigError, match=r"\[model\] parametric_map must be true or false"):
        parse_config({**base, "model": {"parametric_map": "yes"}}, tmp_path / "config.toml")
