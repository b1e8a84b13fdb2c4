"""HTTP for monitoring, inside the node process ([http]): GET /health and GET /metrics.

/health is JSON, 200 when the node can take images (the spool is writable and the worker runs),
503 otherwise: the spool, the queue by state, the oldest pending age, the model the worker
loaded (and on which device), each destination's last delivery and last error.

/metrics is the Prometheus text exposition (prometheus-client). Its counters and gauges are read
from the queue database at each scrape: the database is what the node and its worker share, so
the worker's figures (enhanced, forwarded, retries) need no multiprocess mode and survive a
restart. The store histogram is the node process's own (the C-STORE handler's time).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from dicom_node.config import Config
from dicom_node.jobs import STATES, JobQueue, iso_utc
from dicom_node.spool import Spool, write_atomic

REGISTRY = CollectorRegistry()
STORE_SECONDS = Histogram("dicom_node_store_seconds", "C-STORE handling in the node: spool write, fsyncs, "
                          "queue commit, until the answer", registry=REGISTRY,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


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


def health(config: Config, spool: Spool, worker_alive: Callable[[], bool]) -> tuple[int, dict]:
    queue = _queue(spool)
    try:
        counts = queue.counts() if queue else dict.fromkeys(STATES, 0)
        oldest = queue.oldest_pending() if queue else None
        destinations = [{
            "name": dest.name, "type": dest.type,
            "last_delivery": iso_utc(queue.last_delivery_at(dest.name)) if queue else None,
            "last_error": queue.last_retry_error(dest.name) if queue else None,
        } for dest in config.destinations]
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
            enhanced, retries = (queue.enhanced_count(), queue.retry_count()) if queue else (0, 0)
            counts = queue.counts() if queue else dict.fromkeys(STATES, 0)
            oldest = queue.oldest_pending() if queue else None
        finally:
            if queue:
                queue.close()
        received = CounterMetricFamily("dicom_node_received", "Instances stored and acknowledged",
                                       labels=["sop_class_uid"])
        for sop_class, n in by_class.items():
            received.add_metric([sop_class], n)
        yield received
        forwarded = CounterMetricFamily("dicom_node_forwarded", "Items delivered (original, derived, "
                                        "parametric-map)", labels=["destination", "item"])
        for (dest, item), n in delivered.items():
            forwarded.add_metric([dest, item], n)
        yield forwarded
        yield CounterMetricFamily("dicom_node_enhanced", "Instances whose enhanced instance was delivered",
                                  value=enhanced)
        yield CounterMetricFamily("dicom_node_failed", "Jobs held in failed/", value=counts["failed"])
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


def serve_http(config: Config, spool: Spool, worker_alive: Callable[[], bool]) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; the caller shuts it down."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(spool))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path.split("?")[0] == "/health":
                status, report = health(config, spool, worker_alive)
                body, kind = json.dumps(report, indent=2).encode(), "application/json"
            elif self.path.split("?")[0] == "/metrics":
                status, kind = 200, CONTENT_TYPE_LATEST
                body = generate_latest(registry) + generate_latest(REGISTRY)
            else:
                status, body, kind = 404, b"not found: /health or /metrics\n", "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer((config.http.host, config.http.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
