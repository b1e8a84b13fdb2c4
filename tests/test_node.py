"""The node end to end, against real peers: DCMTK storescu in, Orthanc or a folder out.

Every test starts its own node (`dicom-node serve` in a subprocess), its own Orthanc where
one is needed, on free loopback ports, and stops them itself.
"""
from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from dicom_node.reader import read_radiograph
from dicom_node.writer import is_derived_by_us
from support.node_peers import (
    NodeProcess, Orthanc, copies_with_new_uids, free_port, storescp, storescu, wait_until,
)

CR_FILES = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm"]
OTHER_FILES = ["CT_small.dcm", "MR_small.dcm"]


def sample(name: str) -> Path:
    return Path(get_testdata_file(name))


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)




def start(peers, peer):
    peers.append(peer)
    return peer.start()


def source_uid(ds) -> str | None:
    seq = ds.get("SourceImageSequence")
    return str(seq[0].ReferencedSOPInstanceUID) if seq else None


@pytest.mark.timeout(180)
def test_storescu_to_orthanc_forwards_originals_and_enhances_cr_only(tmp_path, peers, constant_weights):
    orthanc = start(peers, Orthanc(tmp_path / "orthanc"))
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights, [orthanc.destination]))
    files = [sample(n) for n in CR_FILES + OTHER_FILES]

    sent = storescu(files, node.port)

    assert sent.returncode == 0, sent.stdout + sent.stderr
    report = node.wait_drained(expected_done=len(files), timeout=120)
    assert report["counts"]["failed"] == 0, report
    # 5 originals + one derived instance per CR
    wait_until(lambda: len(orthanc.sop_uids()) == 8, 30, what="8 instances in Orthanc")
    stored = orthanc.instance_ids()
    originals = {uid_of(p): p for p in files}
    assert set(originals) <= set(stored)
    derived = {uid: orthanc.dataset(oid) for uid, oid in stored.items() if uid not in originals}
    assert len(derived) == 3
    by_source = {source_uid(ds): ds for ds in derived.values()}
    assert set(by_source) == {uid_of(sample(n)) for n in CR_FILES}, "CT/MR must not be enhanced"
    for ds in derived.values():
        assert is_derived_by_us(ds)
        assert "DERIVED" in ds.ImageType
        assert ds.VOILUTFunction == "SIGMOID"
        assert float(ds.WindowCenter) == pytest.approx(65535 * 0.5, abs=1)
    # CT and MR arrive untouched; the JPEG 2000 original keeps its transfer syntax
    for name in OTHER_FILES:
        original = pydicom.dcmread(sample(name))
        arrived = orthanc.dataset(stored[str(original.SOPInstanceUID)])
        assert arrived.PixelData == original.PixelData
        assert arrived.PatientID == original.PatientID
    j2k_uid = uid_of(sample("RG1_J2KR.dcm"))
    assert orthanc.transfer_syntax(stored[j2k_uid]) == "1.2.840.10008.1.2.4.90"
    assert not any(node.spool.glob("incoming/*.dcm")), "spool files removed once delivered"
    assert node.stop() == 0
    # JSON log lines (stderr is not a TTY), each about one image carrying its context
    lines = [json.loads(line) for line in node.log.read_text().splitlines()]
    per_image = [e for e in lines if e["event"] in ("received", "enhanced", "delivered")]
    assert len(per_image) == 5 + 3 + 5
    for entry in per_image:
        assert entry["association"].startswith("MODALITY@127.0.0.1:")
        assert entry["sop_instance_uid"] in originals and isinstance(entry["job_id"], int)
        assert entry["timestamp"].endswith("Z")


@pytest.mark.timeout(120)
def test_unknown_calling_ae_is_rejected_and_nothing_is_spooled(tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(outbox)}],
                                    allowed=("MODALITY",)))
    ct = sample("CT_small.dcm")

    rejected = storescu([ct], node.port, calling="INTRUDER")

    assert rejected.returncode != 0
    assert "Association Rejected" in rejected.stdout + rejected.stderr
    assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
    assert node.status()["counts"] == {"received": 0, "processing": 0, "done": 0, "failed": 0}
    assert list(node.spool.glob("incoming/*")) == []

    accepted = storescu([ct], node.port, calling="MODALITY")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    node.wait_drained(expected_done=1)
    assert [p.name for p in outbox.rglob("*.dcm")] == [f"{uid_of(ct)}.dcm"]


@pytest.mark.reliability
@pytest.mark.timeout(180)
def test_orthanc_down_jobs_wait_and_retry_then_everything_arrives(tmp_path, peers, constant_weights):
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started yet
    peers.append(orthanc)
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights, [orthanc.destination],
                                    retry=(0.3, 1.0)))
    files = [sample("RG3_UNCR.dcm"), *(sample(n) for n in OTHER_FILES)]

    sent = storescu(files, node.port)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def retried():
        report = node.status()
        oldest = report["oldest_pending"]
        return oldest and oldest["attempts"] >= 2 and report
    report = wait_until(retried, 60, 0.3, "jobs to be retried")
    assert "could not connect" in report["oldest_pending"]["last_error"]
    assert report["counts"]["failed"] == 0
    assert report["retrying"] and all(r["attempts"] >= 1 and "could not connect" in r["last_error"]
                                      for r in report["retrying"])
    assert report["counts"]["received"] + report["counts"]["processing"] == 3
    text = node.cli("status").stdout
    assert "oldest pending: job" in text and "could not connect" in text

    orthanc.start()
    node.wait_drained(expected_done=3, timeout=60)
    expected = {uid_of(p) for p in files}
    wait_until(lambda: len(orthanc.sop_uids()) == 4, 30, what="3 originals + 1 derived")
    assert expected <= set(orthanc.sop_uids())
    assert node.status()["counts"]["failed"] == 0
    # a routine retry is one warning of ours, not error lines from pynetdicom
    lines = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "will retry" and e["level"] == "warning" for e in lines)
    assert not [e for e in lines if e.get("logger", "").startswith("pynetdicom") and e["level"] == "error"]


@pytest.mark.reliability
@pytest.mark.timeout(240)
def test_kill_9_mid_stream_every_acknowledged_image_arrives_exactly_once(tmp_path, peers, constant_weights):
    orthanc = start(peers, Orthanc(tmp_path / "orthanc"))
    node = NodeProcess(tmp_path / "node", constant_weights, [orthanc.destination])
    start(peers, node)
    files = copies_with_new_uids(sample("CT_small.dcm"), tmp_path / "stream", 50)
    acknowledged: list[Path] = []
    done = threading.Event()

    def modality():  # one association per image, like a busy modality sending as it acquires
        for path in files:
            if done.is_set():
                break
            result = storescu([path], node.port, extra=(), timeout=30)
            if result.returncode == 0 and "Received Store Response (Success)" in result.stderr:
                acknowledged.append(path)
    sender = threading.Thread(target=modality)
    sender.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, 60, 0.01, "20 acknowledged images")
        node.kill9()
    finally:
        done.set()
        sender.join(60)
    assert 20 <= len(acknowledged) < 50

    node.start()  # same config, same spool
    unacknowledged = [p for p in files if p not in acknowledged]
    resent = storescu(unacknowledged, node.port)  # the modality sends the rest again
    assert resent.returncode == 0, resent.stdout + resent.stderr
    node.wait_drained(timeout=120)

    expected = {uid_of(p) for p in files}
    wait_until(lambda: expected <= set(orthanc.sop_uids()), 30, what="all 50 in Orthanc")
    counts = Counter(uid for uid in orthanc.sop_uids() if uid in expected)
    assert all(counts[uid_of(p)] == 1 for p in acknowledged)
    assert len(counts) == 50 and set(counts.values()) == {1}
    assert node.status()["counts"]["failed"] == 0


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_acknowledged_images_whose_jobs_a_power_cut_took_are_queued_again_at_start(tmp_path, peers, constant_weights):
    import sqlite3

    from dicom_node.config import NodeSettings
    from dicom_node.node import open_queue
    from dicom_node.scp import start_scp
    from dicom_node.spool import Spool

    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    files = copies_with_new_uids(sample("CT_small.dcm"), tmp_path / "sent", 3)
    # received and answered by the node's own SCP and queue, with no worker to take the jobs yet
    spool = Spool(node.spool).create()
    queue = open_queue(spool)
    settings = NodeSettings(port=free_port())
    ae, server = start_scp(settings, spool, queue)
    try:
        sent = storescu(files, settings.port)
    finally:
        server.shutdown()
        ae.shutdown()
        queue.close()
    assert sent.stderr.count("Received Store Response (Success)") == 3, sent.stderr
    # the node commits its jobs without fsync: a power cut can take them (here: every one)
    with sqlite3.connect(spool.db_path) as db:
        db.execute("DELETE FROM jobs")

    start(peers, node)
    node.wait_drained(expected_done=3)

    arrived = sorted(outbox.rglob("*.dcm"))
    assert sorted(uid_of(p) for p in arrived) == sorted(uid_of(p) for p in files)
    by_uid = {uid_of(p): pydicom.dcmread(p) for p in files}
    assert all(pydicom.dcmread(p).PixelData == by_uid[uid_of(p)].PixelData for p in arrived)
    assert node.status()["counts"] == {"received": 0, "processing": 0, "done": 3, "failed": 0}


@pytest.mark.timeout(120)
def test_a_file_torn_inside_its_pixel_data_is_forwarded_as_received_and_the_node_keeps_serving(
        tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(outbox)}]))
    good_before, truncated_source, good_after = copies_with_new_uids(
        sample("CT_small.dcm"), tmp_path / "files", 3)
    data = truncated_source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 20000])  # cut inside Pixel Data

    # pynetdicom sends the file's bytes as they are (no re-encoding), mid-association
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    statuses = []
    try:
        _config.STORE_SEND_CHUNKED_DATASET = True
        for path in (good_before, truncated):
            statuses.append(assoc.send_c_store(path).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert statuses[0] == 0x0000

    after = storescu([good_after], node.port)  # the next association is served
    assert after.returncode == 0, after.stdout + after.stderr

    report = node.wait_drained(expected_done=3)
    arrived = sorted(p.name for p in outbox.rglob("*.dcm"))
    accepted = [good_before, good_after] + ([truncated_source] if statuses[1] == 0x0000 else [])
    assert arrived == sorted(f"{uid_of(p)}.dcm" for p in accepted)
    assert report["counts"]["failed"] == 0  # never held back: its header is whole, the PACS decides
    if statuses[1] == 0x0000:  # accepted on the wire, so forwarded as received, with the reason kept
        (torn,) = outbox.rglob(f"{uid_of(truncated_source)}.dcm")
        assert torn.stat().st_size < len(data)
        from dicom_node.jobs import JobQueue
        (job,) = [j for j in JobQueue(node.spool / "queue.sqlite3", readonly=True).jobs("done")
                  if j.sop_instance_uid == uid_of(truncated_source)]
        assert job.last_error.startswith("forwarded as received: Pixel Data is")


@pytest.mark.timeout(180)
def test_folder_destination_end_to_end_with_status_echo_and_no_second_enhancement(
        tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    storescp_port = free_port()
    with storescp(tmp_path, "PEER", storescp_port):
        node = start(peers, NodeProcess(tmp_path / "node", constant_weights, [
            {"name": "archive", "type": "folder", "path": str(outbox)},
            {"name": "peer", "type": "dicom", "ae_title": "PEER", "host": "127.0.0.1",
             "port": storescp_port},
        ]))
        unreachable = NodeProcess(tmp_path / "other", constant_weights, [
            {"name": "nobody", "type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1",
             "port": free_port()}])
        rg3, ct = sample("RG3_UNCR.dcm"), sample("CT_small.dcm")

        assert storescu([rg3, ct], node.port).returncode == 0
        node.wait_drained(expected_done=2)

        original = pydicom.dcmread(rg3)
        series = outbox / original.PatientID / original.StudyInstanceUID
        files = sorted(series.rglob("*.dcm"))
        assert len(files) == 2  # the original RG3 and its derived instance, in two series
        ours = [pydicom.dcmread(f) for f in files]
        derived = next(ds for ds in ours if is_derived_by_us(ds))
        assert (series / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm").exists()
        assert (series / derived.SeriesInstanceUID / f"{derived.SOPInstanceUID}.dcm").exists()
        # a = 1, b = 0: the derived pixels are round(65535 * x) of the original
        expected = np.round(65535 * read_radiograph(original)).astype(np.int64)
        assert np.abs(derived.pixel_array.astype(np.int64) - expected).max() <= 1
        ct_ds = pydicom.dcmread(ct)
        ct_out = pydicom.dcmread(next(outbox.rglob(f"{ct_ds.SOPInstanceUID}.dcm")))
        assert ct_out.PixelData == ct_ds.PixelData

        # status and echo while the node runs
        text = node.cli("status").stdout
        assert "done        2" in text and "oldest pending: none" in text
        ok = node.cli("echo", "peer")
        assert ok.returncode == 0 and "C-ECHO success" in ok.stdout
        assert "writable" in node.cli("echo", "archive").stdout
        down = unreachable.cli("echo", "nobody")
        assert down.returncode == 2
        assert "could not connect" in down.stderr and "NOBODY@127.0.0.1" in down.stderr
        unknown = node.cli("echo", "nope")
        assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr
        itself = node.cli("echo")  # no destination: the node itself
        assert itself.returncode == 0 and f"ENHANCE@127.0.0.1:{node.port}" in itself.stdout, itself.stderr
        assert "C-ECHO success" in itself.stdout
        stopped = unreachable.cli("echo")
        assert stopped.returncode == 2 and "could not connect" in stopped.stderr

        # our own output sent back in is forwarded, never enhanced again (no loops)
        before = set(outbox.rglob("*.dcm"))
        derived_file = series / derived.SeriesInstanceUID / f"{derived.SOPInstanceUID}.dcm"
        again = tmp_path / "again.dcm"
        derived_file.rename(again)
        assert storescu([again], node.port).returncode == 0
        node.wait_drained(expected_done=3)
        assert set(outbox.rglob("*.dcm")) == before  # back in place, and nothing new derived
        assert pydicom.dcmread(derived_file).PixelData == derived.PixelData
        assert node.stop() == 0


@pytest.mark.timeout(120)
def test_spool_write_error_answers_out_of_resources(tmp_path, peers, constant_weights):
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))
    incoming = node.spool / "incoming"
    incoming.rmdir()
    incoming.write_text("not a folder")  # every write into incoming/ now fails with an OSError

    result = storescu([sample("CT_small.dcm")], node.port)

    assert "Received Store Response (Refused: OutOfResources)" in result.stderr  # 0xA700
    assert node.status()["counts"]["received"] == 0


def test_the_scp_side_never_imports_torch():
    code = ("import sys, dicom_node.node, dicom_node.scp, dicom_node.node_commands, "
            "dicom_node.forwarder, dicom_node.jobs, dicom_node.worker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model')))")
    result = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


class PickyPeer:
    """A pynetdicom Storage SCP that accepts only uncompressed transfer syntaxes and answers
    with scripted statuses per SOP class: a PACS with its own opinions."""

    def __init__(self, statuses: dict[str, list[int]]):
        from pynetdicom import evt
        from pynetdicom.sop_class import (
            ComputedRadiographyImageStorage, MRImageStorage, Verification)

        self.statuses = statuses  # SOP Class UID -> statuses to answer, last one repeats
        self.received: list[tuple[str, str, int]] = []  # (SOP Instance UID, transfer syntax, status)
        self.datasets: dict[str, pydicom.Dataset] = {}
        self.port = free_port()
        self.ae = AE(ae_title="PICKY")
        for sop_class in (CTImageStorage, MRImageStorage, ComputedRadiographyImageStorage):
            self.ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.ae.add_supported_context(Verification)
        self.ae.start_server(("127.0.0.1", self.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        script = self.statuses.get(str(ds.SOPClassUID), [0x0000])
        seen = sum(1 for uid, _, _ in self.received if uid == ds.SOPInstanceUID)
        status = script[min(seen, len(script) - 1)]
        self.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax), status))
        if status == 0x0000:
            self.datasets[str(ds.SOPInstanceUID)] = ds
        return status

    def stop(self) -> None:
        self.ae.shutdown()


@pytest.mark.timeout(120)
def test_failures_are_classified_and_compressed_files_are_transcoded_for_a_picky_peer(
        tmp_path, peers, constant_weights):
    ct, mr, j2k = sample("CT_small.dcm"), sample("MR_small.dcm"), sample("RG1_J2KR.dcm")
    picky = PickyPeer({
        "1.2.840.10008.5.1.4.1.1.2": [0xA900],                  # CT: does not match SOP class
        "1.2.840.10008.5.1.4.1.1.4": [0xA700, 0xA702, 0x0000],  # MR: out of resources twice
    })
    peers.append(picky)
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights, [
        {"name": "picky", "type": "dicom", "ae_title": "PICKY", "host": "127.0.0.1", "port": picky.port}],
        enhance=(), retry=(0.2, 0.5)))

    assert storescu([ct, mr, j2k], node.port).returncode == 0
    report = node.wait_drained(expected_done=3, timeout=60)

    # 0xA900: failed at once, no retry, held with its reason
    assert report["counts"] == {"received": 0, "processing": 0, "done": 2, "failed": 1}
    assert [s for uid, _, s in picky.received if uid == uid_of(ct)] == [0xA900]
    (failed,) = report["failed"]
    reason = Path(failed["path"]).with_name(Path(failed["path"]).name + ".reason.txt").read_text()
    assert "0xA900" in reason and "does not match SOP class" in reason
    # 0xA7xx: retried until accepted
    assert [s for uid, _, s in picky.received if uid == uid_of(mr)] == [0xA700, 0xA702, 0x0000]
    # JPEG 2000 not accepted by the peer: decompressed, same pixels
    (ts,) = {t for uid, t, _ in picky.received if uid == uid_of(j2k)}
    assert ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    original = pydicom.dcmread(j2k)
    assert np.array_equal(picky.datasets[uid_of(j2k)].pixel_array, original.pixel_array)


@pytest.mark.timeout(90)
def test_a_destination_down_past_give_up_hours_ends_in_failed_and_retry_sends_it_once_it_is_back(
        tmp_path, peers, constant_weights):
    pacs_port = free_port()
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [
        {"name": "gone", "type": "dicom", "ae_title": "GONE", "host": "127.0.0.1", "port": pacs_port},
        {"name": "archive", "type": "folder", "path": str(outbox)}],
        enhance=(), retry=(0.2, 0.5))
    node.config.write_text(node.config.read_text().replace("give_up_hours = 1", "give_up_hours = 0.0005"))
    start(peers, node)

    assert storescu([sample("CT_small.dcm")], node.port).returncode == 0
    report = node.wait_drained(expected_done=1, timeout=60)

    (failed,) = report["failed"]
    assert failed["reason"].startswith("gave up after") and "could not connect" in failed["reason"]
    assert failed["delivered_to"] == ["archive (original)"]  # the folder has it, the PACS never had it
    assert "already delivered to: archive (original)" in node.cli("status").stdout
    held = Path(failed["path"])
    assert pydicom.dcmread(held).SOPInstanceUID == uid_of(sample("CT_small.dcm"))

    # the PACS is back: `retry` puts it in the queue again while the node runs, and it arrives
    received = tmp_path / "pacs"
    with storescp(received, "GONE", pacs_port):
        wrong = node.cli("retry", "999")
        assert wrong.returncode == 1 and "not failed, or unknown: 999" in wrong.stderr
        again = node.cli("retry", "--all")
        assert again.returncode == 0 and "1 job(s) queued again" in again.stdout, again.stderr
        report = node.wait_drained(expected_done=1, timeout=60)
        assert report["failed"] == [] and report["counts"]["done"] == 1
        assert [pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()] == [uid_of(sample("CT_small.dcm"))]
        assert not held.exists() and not held.with_name(held.name + ".reason.txt").exists()
        assert len(list(outbox.rglob("*.dcm"))) == 1  # the retry went only where it was missing


@pytest.mark.timeout(60)
def test_a_second_node_on_a_busy_port_fails_with_one_clear_line(tmp_path, peers, constant_weights):
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))

    other = NodeProcess(tmp_path / "other", constant_weights,  # its own spool, the same port
                        [{"name": "archive", "type": "folder", "path": str(tmp_path / "out2")}], port=node.port)
    second = other.cli("serve", timeout=30)

    assert second.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{node.port} ([node] host/port)" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.timeout(60)
def test_a_wrong_called_ae_title_is_rejected_with_the_standard_reason(tmp_path, peers, constant_weights):
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))
    ct = sample("CT_small.dcm")

    rejected = storescu([ct], node.port, called="WRONGCALLED")

    assert rejected.returncode != 0
    assert "Called AE Title Not Recognized" in rejected.stdout + rejected.stderr
    assert list(node.spool.glob("incoming/*")) == []
    accepted = storescu([ct], node.port, called="ENHANCE")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


@pytest.mark.timeout(60)
def test_a_second_node_on_the_same_spool_exits_with_one_clear_line(tmp_path, peers, constant_weights):
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))
    second = NodeProcess(tmp_path / "second", constant_weights,
                         [{"name": "archive", "type": "folder", "path": str(tmp_path / "out2")}])
    second.config.write_text(second.config.read_text().replace('dir = "spool"', f"dir = {json.dumps(str(node.spool))}"))

    result = second.cli("serve", timeout=30)

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: spool {node.spool} is in use by another dicom-node (pid ")
    assert storescu([sample("CT_small.dcm")], node.port).returncode == 0  # the first one is unharmed


@pytest.mark.reliability
@pytest.mark.timeout(60)
def test_a_connection_that_never_associates_is_dropped_within_seconds(tmp_path, peers, constant_weights):
    import socket
    import time

    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))
    probe = socket.create_connection(("127.0.0.1", node.port))
    probe.settimeout(20)
    t0 = time.monotonic()
    try:
        data = probe.recv(1024)  # the node closes it (ARTIM expiry) after [node] acse_timeout, 5 s by default
    except ConnectionResetError:
        data = b""
    finally:
        probe.close()
    waited = time.monotonic() - t0

    assert data == b"" and waited < 10, (data, waited)
    assert storescu([sample("CT_small.dcm")], node.port).returncode == 0


@pytest.mark.timeout(60)
def test_a_cr_the_model_cannot_enhance_is_forwarded_with_the_reason_recorded(
        tmp_path, peers, constant_weights):
    from dicom_node.jobs import JobQueue
    from support.helpers import phantom_dataset

    colour = phantom_dataset(rows=64, cols=64, modality="CR")
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    colour.BitsAllocated, colour.BitsStored, colour.HighBit = 8, 8, 7
    colour.PixelData = bytes(range(256)) * (64 * 64 * 3 // 256)
    colour.save_as(tmp_path / "colour.dcm", enforce_file_format=True)
    outbox = tmp_path / "outbox"
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(outbox)}]))

    assert storescu([tmp_path / "colour.dcm"], node.port).returncode == 0
    node.wait_drained(expected_done=1)

    (arrived,) = outbox.rglob("*.dcm")
    assert pydicom.dcmread(arrived).PixelData == colour.PixelData  # the original, untouched
    (job,) = JobQueue(node.spool / "queue.sqlite3", readonly=True).jobs("done")
    assert job.last_error.startswith("not enhanced: Photometric Interpretation RGB")
    assert any('"not enhanced"' in line and str(colour.SOPInstanceUID) in line
               for line in node.log.read_text().splitlines())


def test_a_model_that_keeps_failing_does_not_hold_the_original_back(tmp_path, peers):
    """A corrupt checkpoint fails every enhancement: after a few tries the original goes on."""
    from dicom_node.jobs import JobQueue
    from dicom_node.worker import ENHANCE_ATTEMPTS

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    outbox = tmp_path / "outbox"
    node = start(peers, NodeProcess(tmp_path / "node", corrupt,
                                    [{"name": "archive", "type": "folder", "path": str(outbox)}],
                                    retry=(0.1, 0.2)))

    assert storescu([sample("RG3_UNCR.dcm")], node.port).returncode == 0
    node.wait_drained(expected_done=1)

    (arrived,) = outbox.rglob("*.dcm")
    assert uid_of(arrived) == uid_of(sample("RG3_UNCR.dcm"))  # the original, not a derived one
    (job,) = JobQueue(node.spool / "queue.sqlite3", readonly=True).jobs("done")
    assert job.attempts == ENHANCE_ATTEMPTS
    assert f"not enhanced after {ENHANCE_ATTEMPTS} attempts" in job.last_error
    assert "corrupt.pt" in job.last_error


def test_the_worker_restart_back_off_resets_after_a_healthy_run():
    from dicom_node.node import WORKER_HEALTHY_SECONDS, restart_count, restart_delay

    restarts = 0
    for _ in range(6):  # a bad episode: quick exits back off to the 30 s cap
        restarts = restart_count(restarts, ran_seconds=1.0)
    assert restart_delay(restarts) == 30.0
    restarts = restart_count(restarts, ran_seconds=WORKER_HEALTHY_SECONDS + 1)  # then it ran fine for a while
    assert restarts == 1 and restart_delay(restarts) == 2.0


@pytest.fixture
def small_disk(tmp_path):
    """A real, small file system (tmpfs) for the spool: full disks are made, not mocked."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.reliability
@pytest.mark.timeout(180)
def test_a_full_spool_delays_the_enhancement_and_both_instances_follow_once_space_returns(
        tmp_path, peers, constant_weights, small_disk):
    import os
    import shutil

    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                       retry=(0.3, 1.0))
    spool = small_disk / "spool"
    node.config.write_text(node.config.read_text().replace('dir = "spool"', f"dir = {json.dumps(str(spool))}"))
    start(peers, node)
    cr = sample("RG3_UNCR.dcm")
    # room for the received file and the queue's pages, not for the derived instance as well
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - cr.stat().st_size - 2 * 1024 * 1024))
        os.fsync(f.fileno())

    sent = storescu([cr], node.port)
    assert sent.returncode == 0 and "Received Store Response (Success)" in sent.stderr, sent.stderr

    def waiting_for_space():
        report = node.status()
        oldest = report["oldest_pending"]
        return oldest and oldest["attempts"] >= 2 and report
    report = wait_until(waiting_for_space, 60, 0.3, "the enhancement to be retried")
    assert "spool full" in report["oldest_pending"]["last_error"], report
    assert report["counts"]["failed"] == 0 and list(outbox.rglob("*.dcm")) == []  # not the original alone
    assert node.proc.poll() is None

    # now completely full: a store that cannot be made durable is refused, never acknowledged
    full = small_disk / "full"
    with open(full, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    ct = sample("CT_small.dcm")
    refused = storescu([ct], node.port)
    assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stderr  # 0xA700
    assert node.proc.poll() is None

    filler.unlink()
    full.unlink()
    again = storescu([ct], node.port)  # the modality sends it again once the node accepts
    assert "Received Store Response (Success)" in again.stderr, again.stderr
    node.wait_drained(expected_done=2, timeout=60)
    sent_out = [pydicom.dcmread(p, stop_before_pixels=True) for p in outbox.rglob("*.dcm")]
    assert sorted(is_derived_by_us(ds) for ds in sent_out) == [False, False, True]
    assert {str(ds.SOPInstanceUID) for ds in sent_out if not is_derived_by_us(ds)} == {uid_of(cr), uid_of(ct)}
    assert node.status()["counts"]["failed"] == 0 and node.proc.poll() is None


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_a_hanging_pacs_holds_up_only_itself_and_gets_everything_once_a_real_one_answers(
        tmp_path, peers, constant_weights):
    import socket
    import time

    hanging = socket.socket()  # accepts TCP (the kernel's backlog) and never answers a PDU
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)
    pacs_port = hanging.getsockname()[1]
    outbox, received = tmp_path / "outbox", tmp_path / "pacs"
    received.mkdir()
    node = start(peers, NodeProcess(tmp_path / "node", constant_weights, [  # the hanging one first
        {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        {"name": "archive", "type": "folder", "path": str(outbox)}], retry=(0.3, 1.0)))
    ct = sample("CT_small.dcm")

    t0 = time.monotonic()
    assert storescu([ct], node.port).returncode == 0
    wait_until(lambda: list(outbox.rglob("*.dcm")), 10, what="the folder copy")
    assert time.monotonic() - t0 < 3.5  # not behind the PACS's 5 s ACSE timeout
    report = wait_until(lambda: (r := node.status())["oldest_pending"] and r["oldest_pending"]["attempts"] >= 1 and r,
                        30, 0.3, "the PACS delivery to be retried")
    assert "pacs" in report["oldest_pending"]["last_error"]

    hanging.close()
    with storescp(received, "PACS", pacs_port):
        node.wait_drained(expected_done=1, timeout=60)
        assert [pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()] == [uid_of(ct)]
        assert len(list(outbox.rglob("*.dcm"))) == 1  # the folder got it once, not again on the retries


@pytest.mark.reliability
@pytest.mark.timeout(90)
def test_a_corrupt_queue_and_an_unreadable_spool_file_are_quarantined_and_the_node_starts(
        tmp_path, peers, constant_weights):
    import shutil

    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    ct = sample("CT_small.dcm")
    for folder in ("incoming", "derived"):
        (node.spool / folder).mkdir(parents=True)
    shutil.copy(ct, node.spool / "incoming" / f"{uid_of(ct)}.0a1b2c3d.dcm")  # acknowledged before the crash
    junk = node.spool / "incoming" / "1.2.3.4.deadbeef.dcm"
    junk.write_bytes(b"torn by the crash " * 20)
    (node.spool / "queue.sqlite3").write_bytes(b"not an SQLite database " * 200)
    (node.spool / "derived" / "1.dcm").write_bytes(b"a derived file of the lost queue's job 1")

    start(peers, node)
    node.wait_drained(expected_done=1)

    assert [pydicom.dcmread(p).SOPInstanceUID for p in outbox.rglob("*.dcm")] == [uid_of(ct)]
    reasons = {p.parent: p.read_text() for p in (node.spool / "quarantine").glob("*/reason.txt")}
    (db_folder,) = [f for f, text in reasons.items() if "job queue queue.sqlite3 could not be read" in text]
    assert (db_folder / "queue.sqlite3").read_bytes().startswith(b"not an SQLite database")
    assert (db_folder / "1.dcm").is_file()  # not sent as the derived instance of a new job 1
    (junk_folder,) = [f for f, text in reasons.items() if "1.2.3.4.deadbeef.dcm" in text]
    assert "cannot be read" in reasons[junk_folder] and (junk_folder / junk.name).is_file()
    assert node.proc.poll() is None and node.status()["counts"]["failed"] == 0


@pytest.mark.reliability
@pytest.mark.timeout(90)
def test_associations_past_the_limit_are_rejected_and_the_node_accepts_again_once_they_close(
        tmp_path, peers, constant_weights):
    import time

    from pynetdicom.sop_class import Verification

    node = start(peers, NodeProcess(tmp_path / "node", constant_weights,
                                    [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}]))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10

    time.sleep(6)  # the start-up port probe (a bare TCP connect) holds a slot until acse_timeout, 5 s
    held = [ae.associate("127.0.0.1", node.port, ae_title="ENHANCE") for _ in range(10 + 5)]  # max_associations 10

    established = [a for a in held if a.is_established]
    rejected = [a for a in held if a.is_rejected]
    assert len(established) == 10 and len(rejected) == 5, (len(established), len(rejected))
    assert all(a.acceptor.primitive.result_source == 3 and a.acceptor.primitive.diagnostic == 2 for a in rejected)
    for assoc in established:
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    again = wait_until(lambda: (a := ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")).is_established and a,
                       15, 0.5, "a new association to be accepted")
    assert again.send_c_echo().Status == 0x0000
    again.release()
    assert node.proc.poll() is None


@pytest.mark.timeout(60)
def test_serve_takes_host_port_and_log_level_from_the_command_line(tmp_path, constant_weights):
    import os
    import signal
    import sys

    from support.node_peers import REPO, port_open

    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(tmp_path / "o")}])
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--config",
                                 str(node.config), "--port", str(port), "--host", "127.0.0.1", "--log-level", "debug"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            wait_until(lambda: port_open(port) or proc.poll() is not None, 30, what="the node on --port")
            assert proc.poll() is None and port != node.port
            wait_until(lambda: '"level": "debug"' in log.read_text(), 30, what="a debug line")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0


@pytest.mark.timeout(90)
def test_the_node_writes_the_derived_instance_in_the_configured_lossless_syntax(tmp_path, peers, constant_weights):
    from pydicom.uid import JPEG2000Lossless

    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    node.config.write_text(node.config.read_text().replace(
        'mode = "voi"', 'mode = "voi"\noutput_transfer_syntax = "jpeg2000-lossless"'))
    start(peers, node)
    cr = sample("RG1_UNCR.dcm")

    assert storescu([cr], node.port).returncode == 0
    node.wait_drained(expected_done=1)

    (derived,) = [ds for ds in map(pydicom.dcmread, outbox.rglob("*.dcm")) if is_derived_by_us(ds)]
    assert derived.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert derived.pixel_array.shape == (derived.Rows, derived.Columns) and derived.pixel_array.dtype == np.uint16


@pytest.mark.timeout(90)
def test_the_audit_log_has_a_line_per_instance_received_derived_and_delivered(tmp_path, peers, constant_weights):
    outbox, audit_path = tmp_path / "outbox", tmp_path / "audit" / "audit.jsonl"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    node.config.write_text(node.config.read_text().replace(
        'level = "info"', f'level = "info"\naudit = {json.dumps(str(audit_path))}'))
    start(peers, node)
    cr, ct = sample("RG1_UNCR.dcm"), sample("CT_small.dcm")

    assert storescu([cr, ct], node.port, calling="CR01").returncode == 0
    node.wait_drained(expected_done=2)
    assert node.stop() == 0  # the node writes what the worker queued before it stops

    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    by_action = Counter(e["action"] for e in lines)
    assert by_action == {"received": 2, "derived": 1, "delivered": 3, "done": 2}, by_action
    received = [e for e in lines if e["action"] == "received"]
    assert {e["sop_instance_uid"] for e in received} == {uid_of(cr), uid_of(ct)}
    assert all(e["calling_ae"] == "CR01" and e["address"] == "127.0.0.1" and e["outcome"] == "stored" for e in received)
    (derived,) = [e for e in lines if e["action"] == "derived"]
    assert derived["source_sop_instance_uid"] == uid_of(cr) and derived["association"].startswith("CR01@127.0.0.1:")
    delivered = [e for e in lines if e["action"] == "delivered"]
    assert {(e["sop_instance_uid"], e["destination"]) for e in delivered} == {
        (uid_of(cr), "archive"), (uid_of(ct), "archive"), (derived["sop_instance_uid"], "archive")}
    assert all(e["time"].endswith("Z") for e in lines)


def test_the_audit_file_is_rotated_by_size(tmp_path):
    import multiprocessing

    from dicom_node import audit

    path = tmp_path / "audit.jsonl"
    writer = audit.AuditWriter(path, max_bytes=2000, backups=2, queue=multiprocessing.get_context("spawn").Queue())
    try:
        for i in range(100):
            audit.record("received", sop_instance_uid=f"1.2.3.{i}", outcome="stored")
    finally:
        writer.close()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    last = [json.loads(line) for line in path.read_text().splitlines()][-1]
    assert last["sop_instance_uid"] == "1.2.3.99"
