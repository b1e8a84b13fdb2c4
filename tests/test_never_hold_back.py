"""Issue 22, item 1: an image the node cannot enhance is never held back. Its original goes on
as received (`[model] on_failure = "forward-original"`, the default), the failure is recorded
(audit line, status, /metrics, log); with `on_failure = "hold"` it is held in failed/, and
`dicom-node forward` / `discard` end it. Real node, real storescu, a real folder destination."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from support.helpers import phantom_dataset
from support.node_peers import NodeProcess, storescu, wait_until


def truncated_cr(folder: Path) -> Path:
    """A CR whose Pixel Data holds half the bytes its Rows x Columns x Bits Allocated declare:
    a well-formed file (every element's length is right), so any PACS would store it."""
    ds = phantom_dataset(rows=64, cols=64, modality="CR", seed=22)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = folder / "truncated-cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def node_with(tmp_path: Path, weights: Path, on_failure: str | None = None) -> tuple[NodeProcess, Path, Path]:
    outbox, audit_path = tmp_path / "outbox", tmp_path / "audit.jsonl"
    node = NodeProcess(tmp_path / "node", weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    text = node.config.read_text().replace('level = "info"', f'level = "info"\naudit = {json.dumps(str(audit_path))}')
    if on_failure:
        text = text.replace('mode = "voi"', f'mode = "voi"\non_failure = {json.dumps(on_failure)}')
    node.config.write_text(text)
    return node, outbox, audit_path


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(120)
def test_a_cr_with_truncated_pixels_is_forwarded_as_received_and_the_failure_recorded(
        tmp_path, peers, constant_weights):
    node, outbox, audit_path = node_with(tmp_path, constant_weights)
    peers.append(node.start())
    sent = truncated_cr(tmp_path)
    uid = str(pydicom.dcmread(sent).SOPInstanceUID)

    assert storescu([sent], node.port, calling="CR01").returncode == 0
    report = node.wait_drained(expected_done=1)

    (arrived,) = outbox.rglob("*.dcm")  # the original, nothing derived
    assert arrived.name == f"{uid}.dcm"
    assert pydicom.dcmread(arrived).PixelData == pydicom.dcmread(sent).PixelData
    assert report["counts"]["failed"] == 0 and report["counts"]["done"] == 1
    (entry,) = report["not_enhanced"]
    assert entry["reason"] == "unreadable-pixels" and "Pixel Data is truncated: 4096 of 8192 bytes" in entry["detail"]
    assert "unreadable-pixels" in node.cli("status").stdout
    assert node.stop() == 0

    lines = [e for e in audit_lines(audit_path) if e.get("sop_instance_uid") == uid]
    assert [e["action"] for e in lines] == ["received", "not enhanced", "delivered", "done"]
    assert lines[1]["reason"] == "unreadable-pixels" and "original forwarded as received" in lines[1]["outcome"]
    assert lines[2]["destination"] == "archive" and lines[2]["item"] == "original"
    assert "truncated" in lines[-1]["outcome"]
    logged = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "not enhanced" and e["reason"] == "unreadable-pixels" and e.get("sop_instance_uid") == uid
               for e in logged)


@pytest.mark.timeout(150)
def test_on_failure_hold_keeps_it_in_failed_until_forward_sends_it_as_received_or_discard_archives_it(
        tmp_path, peers, constant_weights):
    node, outbox, audit_path = node_with(tmp_path, constant_weights, on_failure="hold")
    peers.append(node.start())
    first = truncated_cr(tmp_path)
    second_ds = phantom_dataset(rows=64, cols=64, modality="CR", seed=23)
    second_ds.PixelData = second_ds.PixelData[:100]
    second = tmp_path / "second.dcm"
    second_ds.save_as(second, enforce_file_format=True)
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in (first, second)]

    assert storescu([first, second], node.port, calling="CR01").returncode == 0
    report = node.wait_drained(expected_done=2)
    assert report["counts"]["failed"] == 2 and not list(outbox.rglob("*.dcm"))
    jobs = {f["sop_instance_uid"]: f["job_id"] for f in report["failed"]}
    assert all('on_failure = "hold"' in f["reason"] for f in report["failed"])

    forwarded = node.cli("forward", str(jobs[uids[0]]))
    assert forwarded.returncode == 0 and "to be forwarded as received" in forwarded.stdout, forwarded.stderr
    wait_until(lambda: list(outbox.rglob(f"{uids[0]}.dcm")), 30, what="the forwarded original in the folder")
    (arrived,) = outbox.rglob("*.dcm")
    assert pydicom.dcmread(arrived).PixelData == pydicom.dcmread(first).PixelData

    discarded = node.cli("discard", str(jobs[uids[1]]), "--reason", "sent again by the modality")
    assert discarded.returncode == 0, discarded.stderr
    kept = node.spool / "discarded" / f"{jobs[uids[1]]}-{uids[1]}.dcm"
    assert kept.exists() and not list((node.spool / "failed").glob(f"{jobs[uids[1]]}-*"))
    reason = kept.with_name(kept.name + ".reason.txt").read_text()
    assert "sent again by the modality" in reason and "truncated" in reason
    unknown = node.cli("discard", "999", "--reason", "x")
    assert unknown.returncode == 1 and "not failed, or unknown: 999" in unknown.stderr

    report = node.wait_drained(expected_done=2)
    assert report["counts"] == {"received": 0, "processing": 0, "done": 2, "failed": 0}
    assert node.stop() == 0
    trail = {uid: [e["action"] for e in audit_lines(audit_path) if e.get("sop_instance_uid") == uid] for uid in uids}
    assert trail[uids[0]] == ["received", "not enhanced", "held", "forward requested", "delivered", "done"]
    assert trail[uids[1]] == ["received", "not enhanced", "held", "discarded"]
    assert Counter(e["action"] for e in audit_lines(audit_path))["done"] == 1
