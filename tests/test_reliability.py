"""Short versions of the reliability scenarios (the full ones: benchmarks/soak.py). Marker
`reliability`; they run in the default suite. Real node, real files, nothing mocked."""
from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.writer import is_derived_by_us
from support.fuzz_inputs import KINDS, accounted_uids, send_raw, write_mutated_inputs
from support.node_peers import NodeProcess, copies_with_new_uids, storescu

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files we read back
def test_fuzzed_inputs_leave_the_node_alive_and_every_acknowledged_one_accounted_for(
        tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                       retry=(0.2, 0.5))
    peers.append(node)
    node.start()
    inputs = write_mutated_inputs(tmp_path / "fuzz", 36, seed=random.Random(7).randrange(1 << 30))

    acked = {uid: kind for kind, uid, path in inputs if send_raw(node.port, path) == 0x0000}

    assert node.proc.poll() is None
    assert len(acked) >= len(inputs) // 2  # most inputs are stored first and judged later
    assert set(acked.values()) == set(KINDS)
    node.wait_drained(timeout=180)
    missing = set(acked) - accounted_uids(outbox, node.spool / "failed")
    assert not missing, {uid: acked[uid] for uid in missing}
    # and it still does its job
    (cr,) = copies_with_new_uids(Path(get_testdata_file("RG1_UNCR.dcm")), tmp_path / "valid", 1)
    assert storescu([cr], node.port).returncode == 0
    node.wait_drained(timeout=120)
    derived = [ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in outbox.rglob("*.dcm"))
               if is_derived_by_us(ds)]
    assert str(pydicom.dcmread(cr, stop_before_pixels=True).SOPInstanceUID) in {
        str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in derived}
    assert node.proc.poll() is None
