"""Recovery paths: what a start finds in the spool after a crash, forward_original = false,
a delivery that reaches one destination and not the other, and the worker's restart loop."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.jobs import JobQueue
from dicom_node.node import adopt_orphans
from dicom_node.spool import Spool
from dicom_node.writer import is_derived_by_us
from support.node_peers import NodeProcess, free_port, storescp, storescu, wait_until


def sample(name: str) -> Path:
    return Path(get_testdata_file(name))


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_start_removes_the_partial_files_a_crash_left_and_nothing_else(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    partials = [spool.incoming / ".partial-1.dcm", spool.derived / ".partial-2.dcm", spool.failed / ".partial-3"]
    kept = [spool.incoming / "1.2.3.abcd.dcm", spool.derived / "7.dcm"]
    for path in partials + kept:
        path.write_bytes(b"x")

    assert spool.remove_partials() == 3

    assert not any(p.exists() for p in partials)
    assert all(p.read_bytes() == b"x" for p in kept)


def test_adopting_orphans_queues_unknown_files_deletes_done_ones_and_quarantines_unreadable_ones(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    queue = JobQueue(spool.db_path)
    ct, mr, cr = sample("CT_small.dcm"), sample("MR_small.dcm"), sample("RG3_UNCR.dcm")
    orphan = Path(shutil.copy(ct, spool.incoming / f"{uid_of(ct)}.00000001.dcm"))  # crash before the commit
    delivered = Path(shutil.copy(mr, spool.incoming / f"{uid_of(mr)}.00000002.dcm"))  # crash before the delete
    waiting = Path(shutil.copy(cr, spool.incoming / f"{uid_of(cr)}.00000003.dcm"))  # an ordinary queued job
    torn = spool.incoming / "1.2.3.00000004.dcm"
    torn.write_bytes(b"torn " * 50)
    done_id, _ = queue.add(uid_of(mr), "1.2.840.10008.5.1.4.1.1.4", delivered)
    queue.settle(done=[(done_id, None)])
    waiting_id, _ = queue.add(uid_of(cr), "1.2.840.10008.5.1.4.1.1.1", waiting)

    assert adopt_orphans(spool, queue) == 1

    jobs = {job.sop_instance_uid: job for job in queue.jobs()}
    assert jobs[uid_of(ct)].state == "received" and Path(jobs[uid_of(ct)].path) == orphan
    assert jobs[uid_of(ct)].sop_class_uid == str(pydicom.dcmread(ct).SOPClassUID)
    assert not delivered.exists()
    assert waiting.exists() and jobs[uid_of(cr)].id == waiting_id and len(jobs) == 3
    (reason,) = spool.root.glob("quarantine/*/reason.txt")
    assert "1.2.3.00000004.dcm in incoming/ had no job and cannot be read" in reason.read_text()
    assert (reason.parent / torn.name).read_bytes() == b"torn " * 50 and not torn.exists()


@pytest.mark.timeout(90)
def test_with_forward_original_off_only_the_derived_instance_of_an_enhanced_image_is_sent(
        tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                       forward_original=False)
    peers.append(node.start())
    cr, ct = sample("RG3_UNCR.dcm"), sample("CT_small.dcm")

    assert storescu([cr, ct], node.port).returncode == 0
    node.wait_drained(expected_done=2)

    arrived = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, outbox.rglob("*.dcm"))}
    assert uid_of(cr) not in arrived  # the CR's original stays home
    (derived,) = [ds for ds in arrived.values() if is_derived_by_us(ds)]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == uid_of(cr)
    assert arrived[uid_of(ct)].PixelData == pydicom.dcmread(ct).PixelData  # not enhanced: sent as it is
    assert len(arrived) == 2


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_a_batch_delivered_to_one_destination_is_not_sent_there_again_while_the_other_is_retried(
        tmp_path, peers, constant_weights):
    outbox, pacs_port = tmp_path / "outbox", free_port()  # nothing listens on the PACS port yet
    node = NodeProcess(tmp_path / "node", constant_weights, [
        {"name": "archive", "type": "folder", "path": str(outbox)},
        {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        retry=(0.3, 1.0))
    peers.append(node.start())
    cr = sample("RG3_UNCR.dcm")

    assert storescu([cr], node.port).returncode == 0
    report = wait_until(lambda: (r := node.status())["oldest_pending"] and r["oldest_pending"]["attempts"] >= 2 and r,
                        60, 0.3, "two failed attempts to reach the PACS")
    assert "pacs" in report["oldest_pending"]["last_error"]
    in_folder = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in outbox.rglob("*.dcm"))
    assert len(in_folder) == 2 and uid_of(cr) in in_folder  # the original and its derived instance

    with storescp(tmp_path / "pacs", "PACS", pacs_port):
        node.wait_drained(expected_done=1, timeout=60)
        at_pacs = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "pacs").iterdir())
    assert at_pacs == in_folder  # both items reached the PACS once it answered
    assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in outbox.rglob("*.dcm")) == in_folder
    assert len(list(outbox.rglob("*.dcm"))) == 2  # and the folder got nothing twice


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_a_killed_worker_is_restarted_and_the_node_goes_on_enhancing(tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    peers.append(node.start())
    status = node.spool / "worker.json"
    first = wait_until(lambda: status.exists() and json.loads(status.read_text())["pid"], 30, what="the worker")

    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (pid := json.loads(status.read_text())["pid"]) != first and pid, 30,
                        what="a new worker")
    assert second != first and node.proc.poll() is None
    assert any('"worker exited, restarting"' in line for line in node.log.read_text().splitlines())

    cr = sample("RG3_UNCR.dcm")
    assert storescu([cr], node.port).returncode == 0
    node.wait_drained(expected_done=1)
    arrived = [pydicom.dcmread(p) for p in outbox.rglob("*.dcm")]
    assert sorted(is_derived_by_us(ds) for ds in arrived) == [False, True]
