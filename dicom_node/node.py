"""The running node: spool + queue + SCP in this process, the worker in a spawned one.

Shutdown (SIGTERM or SIGINT): stop accepting associations, let the ones in progress
finish (each C-STORE is durable before it is answered), then ask the worker to stop
after its current batch; whatever it had not finished stays in the queue and is
resumed on the next start. This module must not import torch (see worker.py).
"""
from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import structlog
from pydicom import dcmread

from dicom_node.config import Config
from dicom_node.errors import ConfigError, NodeError
from dicom_node.jobs import JobQueue
from dicom_node.scp import start_scp
from dicom_node.spool import Spool

log = structlog.get_logger("dicom_node.node")

# A stop takes at most DRAIN_SECONDS + WORKER_STOP_SECONDS + 5 s (45 s; a service manager's
# usual limit is 90 s). Cutting either short loses nothing: an association aborted mid-store
# was not acknowledged, and a worker's unfinished batch is resumed at the next start.
DRAIN_SECONDS = 15      # how long in-progress associations may take after a stop request
WORKER_STOP_SECONDS = 25  # how long the worker may take to finish its batch
WORKER_HEALTHY_SECONDS = 60  # a worker that ran this long before exiting restarts without back-off
NODE_SYNCHRONOUS = "NORMAL"  # the node process only records received files (see open_queue)


def adopt_orphans(spool: Spool, queue: JobQueue) -> int:
    """Files fully written to incoming/ whose job is not in the queue are queued rather than
    lost: a crash between the rename and the commit (the sender was not answered), or a power
    cut that took commits the node made without fsync (answered: the file is the journal, see
    `open_queue`). Files of jobs already done (a crash between the commit and the delete) are
    deleted."""
    known = queue.known_paths()
    adopted = 0
    for path in spool.received_files():
        state = known.get(str(path))
        if state == "done":
            spool.remove(path)
            continue
        if state is not None:
            continue
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
            queue.add(str(meta.MediaStorageSOPInstanceUID), str(meta.MediaStorageSOPClassUID), path)
            adopted += 1
        except Exception as exc:  # not even its meta reads: kept aside with the reason, never deleted
            folder = spool.quarantine([path], f"{path.name} in incoming/ had no job and cannot be read: {exc!r}")
            log.error("unreadable file in incoming/ quarantined", path=str(path), quarantine=str(folder),
                      error=repr(exc))
    return adopted


def open_queue(spool: Spool) -> JobQueue:
    """The spool's queue. A database SQLite cannot read (a torn disk, a foreign file) is moved to
    quarantine/ with the reason, with the derived files its job ids named, and a new queue is
    made; `adopt_orphans` then queues every received file again, so nothing acknowledged is
    lost (an image already delivered may be sent again, with the same UIDs).

    The node's queue commits with synchronous=NORMAL: each job it records has its file fsynced
    in incoming/ before it answers, so the one fsync per image that matters is the file's (and
    its folder's); a job lost with the machine is rebuilt by `adopt_orphans`."""
    try:
        queue = JobQueue(spool.db_path, synchronous=NODE_SYNCHRONOUS)
        problem = queue.integrity_problem()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            # locked, an I/O error, no permission: not corrupt, so never moved aside
            raise NodeError(f"cannot open the job queue {spool.db_path}: {exc}") from None
        queue, problem = None, repr(exc)
    if problem is None:
        return queue
    if queue is not None:
        queue.close()
    db = spool.db_path
    stale = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), *sorted(spool.derived.iterdir())]
    folder = spool.quarantine(stale, f"the job queue {db.name} could not be read: {problem}\n"
                                     "a new queue was made; the files in incoming/ were queued again")
    log.error("job queue unreadable, quarantined; a new one is made", quarantine=str(folder), problem=problem)
    return JobQueue(spool.db_path, synchronous=NODE_SYNCHRONOUS)


def check_ready(config: Config) -> None:
    """Fail at start, naming the key, for what would otherwise fail in the worker (which the
    node would restart again and again while received images wait in the spool)."""
    for dest in config.destinations:
        if getattr(dest, "tls", None) is not None:
            from dicom_node.tls import client_context

            client_context(dest.tls, dest.name)  # a certificate or key that is not valid PEM
    if not config.model.enhance:
        return
    if not config.model.weights.is_file():
        raise ConfigError(f"{config.path.name}: [model] weights: no file at {config.model.weights}")
    device = config.model.device
    if device.startswith("cuda"):
        index = int(device[5:]) if device.startswith("cuda:") else 0
        count = cuda_device_count()
        if index >= count:
            have = f"only {count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(f"{config.path.name}: [model] device: {device!r} asked for, but this machine has "
                              f"{have}; use \"auto\" or \"cpu\"")


def cuda_device_count() -> int:
    """CUDA devices torch sees, asked of a child interpreter: this process must not import torch."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                               capture_output=True, text=True, timeout=120)
        return int(probe.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, OSError, IndexError, ValueError):  # no answer: count none
        return 0


def restart_count(previous: int, ran_seconds: float) -> int:
    """Consecutive quick exits of the worker: a run of WORKER_HEALTHY_SECONDS starts the count
    again, so one bad episode (a full disk) does not slow every later restart."""
    return 1 if ran_seconds >= WORKER_HEALTHY_SECONDS else previous + 1


def restart_delay(restarts: int) -> float:
    """Seconds before restarting the worker after its `restarts`-th consecutive exit: 2, 4, 8 … 30."""
    return min(30.0, 2.0 ** restarts)


class ProcessFlag:
    """multiprocessing.Event's set / clear / is_set / wait, kept on a semaphore, so that set()
    never blocks. An Event's set() waits for every process asleep in its wait() to wake up; a
    worker killed there (kill -9, the OOM killer) never does, and the SCP's next set() would
    hang its association, and every later one, forever. A semaphore's release waits for no one."""

    def __init__(self, context):
        self._semaphore = context.Semaphore(0)

    def set(self) -> None:
        if not self.is_set():
            self._semaphore.release()

    def clear(self) -> None:
        while self._semaphore.acquire(False):
            pass

    def is_set(self) -> bool:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        if self._semaphore.acquire(True, timeout):
            self._semaphore.release()  # it stays set until cleared
            return True
        return False


class Node:
    def __init__(self, config: Config):
        self.config = config
        self.stopping = threading.Event()
        self._mp = multiprocessing.get_context("spawn")
        self.wake = ProcessFlag(self._mp)  # the worker sleeps on both: it may be killed there
        # time.monotonic() (one clock for all processes on Linux) of the SCP's last store: the
        # workers hold back while it receives (worker.yield_to_receiving)
        self.last_store = self._mp.Value("d", 0.0, lock=False)
        self.stop_worker = ProcessFlag(self._mp)
        self.audit_queue = self._mp.Queue() if config.logging.audit else None
        # one per [worker] processes; they share the queue (each claim is one transaction)
        self.workers: list[multiprocessing.Process | None] = [None] * config.worker.processes

    def _start_worker(self, slot: int = 0) -> None:
        from dicom_node import worker

        process = self._mp.Process(
            target=worker.main, name="dicom-node-worker" if slot == 0 else f"dicom-node-worker-{slot}",
            args=(str(self.config.path), self.stop_worker, self.wake, self.config.logging.level, self.audit_queue, slot,
                  self.last_store))
        process.start()
        self.workers[slot] = process
        log.info("worker started", pid=process.pid, slot=slot)

    def _stored(self) -> None:
        """The SCP stored an instance: the workers have work, and hold back while it receives."""
        self.last_store.value = time.monotonic()
        self.wake.set()

    def workers_alive(self) -> bool:
        return all(w is not None and w.is_alive() for w in self.workers)

    def request_stop(self, signum=None, frame=None) -> None:
        if not self.stopping.is_set():
            log.info("stop requested", signal=signal.Signals(signum).name if signum else None)
        self.stopping.set()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status (0 on a clean stop)."""
        cfg = self.config
        log.debug("configuration", path=str(cfg.path), node=repr(cfg.node), model=repr(cfg.model),
                  destinations=[repr(d) for d in cfg.destinations])
        check_ready(cfg)
        spool = Spool(cfg.spool.dir).create().lock()  # before touching anything in it
        audit = None
        if cfg.logging.audit:
            from dicom_node.audit import AuditWriter

            audit = AuditWriter(cfg.logging.audit, int(cfg.logging.audit_max_mb * 1e6), cfg.logging.audit_backups,
                                self.audit_queue)
        spool.remove_partials()
        queue = open_queue(spool)
        adopted = adopt_orphans(spool, queue)
        if adopted:
            log.warning("queued files found in incoming/ without a job", count=adopted)
        if not cfg.node.allowed_calling_aets:
            log.warning("any calling AE title is accepted ([node] allowed_calling_aets is empty)")
        else:
            log.info("calling AE titles allowed", aets=list(cfg.node.allowed_calling_aets))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)

        try:
            ae, server = start_scp(cfg.node, spool, queue, on_stored=self._stored)
        except OSError as exc:
            raise NodeError(f"cannot listen on {cfg.node.host}:{cfg.node.port} ([node] host/port):"
                            f" {exc.strerror or exc}") from None
        http = None
        if cfg.http.enabled:  # before the worker starts: a busy port then leaves nothing to stop but the SCP
            from dicom_node.monitor import serve_http

            try:
                http = serve_http(cfg, spool, self.workers_alive, on_requeued=self.wake.set)
            except OSError as exc:
                server.shutdown()
                raise NodeError(f"cannot listen on {cfg.http.host}:{cfg.http.port} ([http] host/port):"
                                f" {exc.strerror or exc}") from None
            log.info("http: the status page, /health and /metrics", host=cfg.http.host, port=http.server_address[1])
        for slot in range(len(self.workers)):
            self._start_worker(slot)
        log.info("listening", ae_title=cfg.node.ae_title, host=cfg.node.host, tls=cfg.node.tls is not None,
                 port=server.server_address[1], spool=str(spool.root),
                 destinations=[d.name for d in cfg.destinations])
        # per slot: consecutive quick exits, when it was started, when it may start again
        restarts = [0] * len(self.workers)
        started = [time.monotonic()] * len(self.workers)
        due: list[float | None] = [None] * len(self.workers)
        while not self.stopping.wait(0.5):
            for slot, process in enumerate(self.workers):
                if due[slot] is None and not process.is_alive():
                    restarts[slot] = restart_count(restarts[slot], time.monotonic() - started[slot])
                    delay = restart_delay(restarts[slot])
                    log.error("worker exited, restarting", exitcode=process.exitcode, slot=slot, in_seconds=delay)
                    due[slot] = time.monotonic() + delay
                if due[slot] is not None and time.monotonic() >= due[slot] and not self.stopping.is_set():
                    self._start_worker(slot)
                    started[slot], due[slot] = time.monotonic(), None

        if http is not None:
            http.shutdown()
        server.shutdown()  # no new associations
        deadline = time.monotonic() + DRAIN_SECONDS
        busy = [a for a in server.active_associations if a.is_established]
        if busy:
            log.info("letting associations in progress finish", count=len(busy))
        while any(a.is_alive() and a.is_established for a in busy) and time.monotonic() < deadline:
            time.sleep(0.1)
        ae.shutdown()  # aborts whatever is left (connections that never associated)
        self.stop_worker.set()
        self.wake.set()
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process in self.workers:  # all were asked at once: they stop together
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.workers:
            if process.is_alive():
                log.warning("worker did not stop in time; its jobs resume on the next start", pid=process.pid)
                process.terminate()
                process.join(5)
                if process.is_alive():  # SIGTERM only asks it to stop after its batch
                    process.kill()
                    process.join(5)
        if audit is not None:
            audit.close()
        log.info("stopped")
        return 0
