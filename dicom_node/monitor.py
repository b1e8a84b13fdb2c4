"""HTTP for monitoring, inside the node process ([http]): GET /health, GET /metrics, the
status page at GET / with its thumbnails, and POST /retry (the page's button, token-checked).

/health is JSON, 200 when the node can take images (the spool is writable and the worker runs),
503 otherwise: the spool, the queue by state, the oldest pending age, the model the worker
loaded (and on which device), each destination's last delivery and last error.

/metrics is the Prometheus text exposition (prometheus-client). Its counters and gauges are read
from the queue database at each scrape: the database is what the node and its worker share, so
the worker's figures (enhanced, forwarded, retries) need no multiprocess mode and survive a
restart; so are the enhancement and send histograms (the worker records each time in the
queue's timing buckets with its batch). The store histogram is the node process's own (the
C-STORE handler's time until the answer: the ack latency).
"""
from __future__ import annotations

import hmac
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from dicom_node.config import Config
from dicom_node.jobs import STATES, TIMING_BUCKETS, JobQueue, iso_utc
from dicom_node.retry import retry_failed
from dicom_node.spool import Spool, write_atomic
from dicom_node.status_page import RecentInstance, StatusView, render_status_page
from dicom_node.thumbnails import KEEP_JOBS, thumbnail_path

log = structlog.get_logger("dicom_node.http")
REGISTRY = CollectorRegistry()
STORE_SECONDS = Histogram("dicom_node_store_seconds", "C-STORE handling in the node: spool write, fsyncs, "
                          "queue commit, until the answer", registry=REGISTRY,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
TIMED = {  # queue timings stage -> (metric name, help)
    "enhance": ("dicom_node_enhance_seconds", "Worker: one derived instance made (decode, model, remap, encode, write)"),
    "send": ("dicom_node_send_seconds", "Worker: one item sent until the destination confirmed it"),
}


def worker_status_path(spool: Spool) -> Path:
    """What the worker writes after loading its model (model name, identity, device)."""
    return spool.root / "worker.json"


def _queue(spool: Spool) -> JobQueue | None:
    """The queue, read-only, for one request (None before the node made it)."""
    return JobQueue(spool.db_path, readonly=True) if spool.db_path.exists() else None


def _worker_status(spool: Spool) -> dict:
    try:
        return json.loads(worker_status_path(spool).read_text())
    except (OSError, ValueError):
        return {}


def _spool_writable(spool: Spool) -> bool:
    try:
        probe = write_atomic(spool.incoming / ".health-probe", b"ok", sync_dir=False)
        probe.unlink()
        return True
    except OSError:
        return False


def destination_health(config: Config, queue: JobQueue | None) -> list[dict]:
    """Each destination's last delivery and the latest error of a job waiting to retry it."""
    return [{
        "name": dest.name, "type": dest.type,
        "last_delivery": iso_utc(queue.last_delivery_at(dest.name)) if queue else None,
        "last_error": queue.last_retry_error(dest.name) if queue else None,
    } for dest in config.destinations]


def health(config: Config, spool: Spool, worker_alive: Callable[[], bool]) -> tuple[int, dict]:
    queue = _queue(spool)
    try:
        counts = queue.counts() if queue else dict.fromkeys(STATES, 0)
        oldest = queue.oldest_pending() if queue else None
        destinations = destination_health(config, queue)
    finally:
        if queue:
            queue.close()
    model = _worker_status(spool)
    report = {
        "spool": {"path": str(spool.root), "writable": _spool_writable(spool)},
        "worker": {"alive": worker_alive()},
        "model": {"loaded": bool(model.get("loaded")), "name": model.get("model"), "device": model.get("device"),
                  "error": model.get("error")} if config.model.enhance else None,
        "queue": counts,
        "oldest_pending_seconds": None if oldest is None else round(time.time() - oldest.received_at, 1),
        "destinations": destinations,
    }
    ok = report["spool"]["writable"] and report["worker"]["alive"]
    report["status"] = "ok" if ok else "unavailable"
    return (200 if ok else 503), report


class QueueCollector:
    """Counters and gauges from the queue database, at scrape time."""

    def __init__(self, spool: Spool):
        self.spool = spool

    def collect(self):
        queue = _queue(self.spool)
        try:
            by_class = queue.received_by_class() if queue else {}
            delivered = queue.delivery_counts() if queue else {}
            enhanced = queue.enhanced_by_class() if queue else {}
            failed = queue.failed_by_class() if queue else {}
            not_enhanced = queue.enhancement_failures() if queue else {}
            retries = queue.retry_count() if queue else 0
            counts = queue.counts() if queue else dict.fromkeys(STATES, 0)
            oldest = queue.oldest_pending() if queue else None
            timings = {stage: queue.timing_histogram(stage) if queue else {} for stage in TIMED}
        finally:
            if queue:
                queue.close()
        for stage, (name, text) in TIMED.items():
            family = HistogramMetricFamily(name, text, labels=["destination"] if stage == "send" else None)
            for destination, (cumulative, count, total) in timings[stage].items():
                buckets = [(repr(float(b)), n) for b, n in zip(TIMING_BUCKETS, cumulative)] + [("+Inf", count)]
                family.add_metric([destination] if stage == "send" else [], buckets, total)
            yield family
        received = CounterMetricFamily("dicom_node_received", "Instances stored and acknowledged",
                                       labels=["sop_class_uid"])
        for sop_class, n in by_class.items():
            received.add_metric([sop_class], n)
        yield received
        forwarded = CounterMetricFamily("dicom_node_forwarded", "Items delivered (original, derived, "
                                        "parametric-map), by the received instance's SOP class",
                                        labels=["destination", "item", "sop_class_uid"])
        for (dest, item, sop_class), n in delivered.items():
            forwarded.add_metric([dest, item, sop_class], n)
        yield forwarded
        for name, text, by_class in (("dicom_node_enhanced", "Instances whose enhanced instance was delivered", enhanced),
                                     ("dicom_node_failed", "Jobs held in failed/", failed)):
            family = CounterMetricFamily(name, text, labels=["sop_class_uid"])
            for sop_class, n in by_class.items():
                family.add_metric([sop_class], n)
            yield family
        family = CounterMetricFamily("dicom_node_enhancement_failures", "Images that were to be enhanced and "
                                     "could not be (forwarded as received, or held)", labels=["reason"])
        for reason, n in not_enhanced.items():
            family.add_metric([reason], n)
        yield family
        yield CounterMetricFamily("dicom_node_retries", "Attempts after the first", value=retries)
        depth = GaugeMetricFamily("dicom_node_queue_jobs", "Jobs by state", labels=["state"])
        for state in STATES:
            depth.add_metric([state], counts[state])
        yield depth
        yield GaugeMetricFamily("dicom_node_oldest_pending_seconds", "Age of the oldest job not done",
                                value=0.0 if oldest is None else time.time() - oldest.received_at)
        size = sum(p.stat().st_size for p in self.spool.failed.glob("*") if p.is_file()) if self.spool.failed.exists() else 0
        yield GaugeMetricFamily("dicom_node_failed_bytes", "Size of spool/failed/", value=size)
        model = _worker_status(self.spool)
        if model.get("loaded"):
            info = InfoMetricFamily("dicom_node_model", "The model the worker loaded")
            info.add_metric([], {"name": str(model.get("model")), "identity": str(model.get("identity")),
                                 "device": str(model.get("device"))})
            yield info


MAX_FORM_BYTES = 4096
REQUEST_TIMEOUT_SECONDS = 10
_THUMBNAIL = re.compile(r"^/thumbs/(\d+)/(before|after)\.png$")


def status_view(config: Config, spool: Spool, notice: str | None = None) -> StatusView:
    """What the status page shows, read from the queue and the spool now."""
    queue = _queue(spool)
    try:
        counts = queue.counts() if queue else dict.fromkeys(STATES, 0)
        recent = queue.jobs(None, KEEP_JOBS) if queue else []
        failed = queue.jobs("failed", KEEP_JOBS) if queue else []
        delivered_to = {j.id: queue.delivered_to(j.id) for j in failed}
        destinations = destination_health(config, queue)
    finally:
        if queue:
            queue.close()
    return StatusView(
        ae_title=config.node.ae_title, counts=counts, destinations=destinations,
        recent=[RecentInstance(j, thumbnail_path(spool, j.id, "after").exists()) for j in recent],
        failed=failed, delivered_to=delivered_to, notice=notice, retry_enabled=config.http.admin_token is not None)


def token_accepted(config: Config, offered: str) -> bool:
    """The admin token matches (compared in constant time); never without one configured."""
    expected = config.http.admin_token
    return expected is not None and hmac.compare_digest(offered.encode(), expected.encode())


def serve_http(config: Config, spool: Spool, worker_alive: Callable[[], bool],
               on_requeued: Callable[[], None] = lambda: None) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; the caller shuts it down. `on_requeued` is called
    after the page's retry put a job back (the node wakes its worker)."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(spool))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/health":
                status, report = health(config, spool, worker_alive)
                self.answer(status, json.dumps(report, indent=2).encode(), "application/json")
            elif url.path == "/metrics":
                self.answer(200, generate_latest(registry) + generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif url.path == "/":
                notice = urllib.parse.parse_qs(url.query).get("notice", [None])[0]
                page = render_status_page(status_view(config, spool, notice))
                self.answer(200, page.encode(), "text/html; charset=utf-8")
            elif match := _THUMBNAIL.match(url.path):
                try:
                    png = thumbnail_path(spool, int(match.group(1)), match.group(2)).read_bytes()
                except OSError:
                    self.answer(404, b"no such thumbnail (only the newest jobs keep theirs)\n", "text/plain")
                else:
                    self.answer(200, png, "image/png")
            else:
                self.answer(404, b"not found: /, /health or /metrics\n", "text/plain")

        def do_POST(self):  # noqa: N802 - the stdlib's name
            if urllib.parse.urlsplit(self.path).path != "/retry":
                self.answer(404, b"not found: POST /retry\n", "text/plain")
                return
            try:  # a form of a job id and a token: a few hundred bytes at most
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_FORM_BYTES:
                self.answer(400, f"Content-Length must be 0 to {MAX_FORM_BYTES}\n".encode(), "text/plain")
                return
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            if not token_accepted(config, form.get("token", [""])[0]):
                log.warning("retry refused: no or wrong admin token", client=self.client_address[0])
                why = ("the admin token is wrong" if config.http.admin_token is not None
                       else "retry from this page is off: [http] admin_token is not set")
                self.answer(401, f"<!doctype html><title>401</title><p id=\"error\">401 Unauthorized: {why}."
                                 "</p><p><a href=\"/\">back</a></p>".encode(), "text/html; charset=utf-8")
                return
            try:
                job_id = int(form.get("job", [""])[0])
            except ValueError:
                self.answer(400, b"job must be a job id\n", "text/plain")
                return
            queue = JobQueue(spool.db_path)
            try:
                result = retry_failed(spool, queue, [job_id])
            finally:
                queue.close()
            if result.requeued:
                on_requeued()
                notice = f"job {job_id} queued again"
            elif result.superseded:
                notice = f"job {job_id} not retried: the instance was received again since"
            else:
                notice = f"job {job_id} is not failed (or unknown)"
            log.info("retry from the status page", job_id=job_id, client=self.client_address[0], outcome=notice)
            self.send_response(303)
            self.send_header("Location", "/?" + urllib.parse.urlencode({"notice": notice}))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    Handler.timeout = REQUEST_TIMEOUT_SECONDS  # a client that stops mid-request frees its thread

    server = ThreadingHTTPServer((config.http.host, config.http.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
