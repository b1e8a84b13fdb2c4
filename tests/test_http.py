"""GET /health and /metrics of a running node, against real traffic (storescu) and a real
Prometheus text parser."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from support.node_peers import NodeProcess, free_port, storescu, wait_until


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(port: int, path: str, form: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=urllib.parse.urlencode(form).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.timeout(120)
def test_health_and_metrics_report_what_the_node_did(tmp_path, peers, constant_weights):
    http_port = free_port()
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                       http_port=http_port)
    peers.append(node)
    node.start()
    wait_until(lambda: json.loads(get(http_port, "/health")[1])["model"]["loaded"], 30, what="the model loaded")

    cr, ct = Path(get_testdata_file("RG1_UNCR.dcm")), Path(get_testdata_file("CT_small.dcm"))
    assert storescu([cr, ct], node.port).returncode == 0
    node.wait_drained(expected_done=2)

    status, body = get(http_port, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["spool"]["writable"] and health["worker"]["alive"]
    assert health["model"]["loaded"] and health["model"]["device"] == "cpu"
    assert health["queue"] == {"received": 0, "processing": 0, "done": 2, "failed": 0}
    (archive,) = health["destinations"]
    assert archive["name"] == "archive" and archive["last_delivery"].endswith("Z") and archive["last_error"] is None

    status, body = get(http_port, "/metrics")
    assert status == 200
    values = samples(body.decode())
    assert values[("dicom_node_received_total", (("sop_class_uid", "1.2.840.10008.5.1.4.1.1.1"),))] == 1
    assert values[("dicom_node_received_total", (("sop_class_uid", "1.2.840.10008.5.1.4.1.1.2"),))] == 1
    cr_class, ct_class = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
    forwarded = {labels: v for (name, labels), v in values.items() if name == "dicom_node_forwarded_total"}
    assert forwarded == {
        (("destination", "archive"), ("item", "original"), ("sop_class_uid", cr_class)): 1,
        (("destination", "archive"), ("item", "original"), ("sop_class_uid", ct_class)): 1,
        (("destination", "archive"), ("item", "derived"), ("sop_class_uid", cr_class)): 1}
    assert values[("dicom_node_enhanced_total", (("sop_class_uid", cr_class),))] == 1
    assert not any(name == "dicom_node_failed_total" for name, _ in values)  # nothing failed
    assert values[("dicom_node_queue_jobs", (("state", "done"),))] == 2
    assert values[("dicom_node_store_seconds_count", ())] == 2
    # the worker's times, from the queue: one enhancement, three items sent to the folder
    assert values[("dicom_node_enhance_seconds_count", ())] == 1
    assert 0 < values[("dicom_node_enhance_seconds_sum", ())] < 60
    assert values[("dicom_node_enhance_seconds_bucket", (("le", "+Inf"),))] == 1
    assert values[("dicom_node_send_seconds_count", (("destination", "archive"),))] == 3
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in values.items()
                     if name == "dicom_node_send_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 3  # cumulative
    assert any(name == "dicom_node_model_info" and dict(labels)["device"] == "cpu" for name, labels in values)
    assert get(http_port, "/nothing")[0] == 404
    assert get(http_port, "/thumbs/1/after.png")[1][:8] == b"\x89PNG\r\n\x1a\n"  # the CR's, for the page
    assert get(http_port, "/thumbs/2/after.png")[0] == 404  # the CT was not enhanced
    status, body = post(http_port, "/retry", {"job": "1", "token": ""})
    assert status == 401 and b"[http] admin_token is not set" in body  # no token configured: retry is off
    import socket  # a body the form cannot be: refused before anything is read
    for length in ("-1", "100000", "many"):
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as raw:
            raw.sendall(f"POST /retry HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            assert raw.recv(100).startswith(b"HTTP/1.0 400"), length
    assert get(http_port, "/health")[0] == 200  # and the endpoint is still there

    incoming = node.spool / "incoming"  # the spool can no longer take a file: not healthy
    incoming.rmdir()
    incoming.write_text("not a folder")
    status, body = get(http_port, "/health")
    assert status == 503 and json.loads(body)["spool"]["writable"] is False


@pytest.mark.timeout(60)
def test_a_busy_http_port_stops_the_start_with_one_clear_line(tmp_path, constant_weights):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        node = NodeProcess(tmp_path / "node", constant_weights,
                           [{"name": "archive", "type": "folder", "path": str(tmp_path / "out")}], http_port=port)
        result = node.cli("serve", timeout=30)
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port} ([http] host/port)" in result.stderr
    assert "Traceback" not in result.stderr
