"""The worker process: claim jobs, enhance or pass through, forward, settle each job.

Runs in its own process (multiprocessing, spawn) so that the SCP process never imports
torch. The model is loaded once at start. One loop iteration takes a batch of ready
jobs, prepares what each must deliver (routing.py: the derived instance for CR/DX that we
did not derive ourselves, made by derivation.py, and the original unless forward_original is
off), sends the batch to every destination over one association each, and settles every job
(settlement.py decides, the worker applies: one queue commit for the batch):

* every destination has every item -> done, spool files removed;
* a permanent failure              -> failed/ with the reason, at once;
* a transient failure              -> retried after min(max, initial * 2**n) with jitter,
                                      until give_up_hours after receipt, then failed/.
"""
from __future__ import annotations

import contextvars
import errno
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels.utils import get_expected_length

from dicom_node import audit
from dicom_node.config import Config, available_cores, load_config
from dicom_node.derivation import Derivation
from dicom_node.errors import UnreadablePixels, UnsupportedImage
from dicom_node.forwarder import Item, ItemKind, Outcome, make_target
from dicom_node.jobs import Job, JobQueue, iso_utc
from dicom_node.logs import configure_logging
from dicom_node.routing import Routing
from dicom_node.settlement import Done, Fail, Plan, Retry, Verdict, settle
from dicom_node.spool import Spool, write_atomic
from dicom_node.writer import enhanced_classes

log = structlog.get_logger("dicom_node.worker")

BATCH_SIZE = 16
#: A batch stops taking more enhancement work after this long, so that what is ready is
#: forwarded instead of waiting behind a slow model.
PREPARE_BUDGET_SECONDS = 2.0
#: Jobs of a batch prepared at once (at least; more to fill the model's batch on a GPU): one's
#: reading, decoding, encoding and fsync overlap the other's model (threads; numba, torch and
#: file I/O leave the GIL).
PREPARE_CONCURRENCY = 2
#: Receiving comes first: a modality waits on every acknowledgement, the queue does not.
WORKER_NICENESS = 5
#: ... and a burst is acknowledged at full speed, then enhanced: while the SCP is storing (its
#: last store less than RECEIVING_QUIET_SECONDS ago) a worker waits before each batch, at most
#: YIELD_SECONDS, so under a steady stream of stores it still works a batch after each wait. A
#: worker that only forwards waits only until a whole batch is due: its fsyncs (claim, folder,
#: settle) are then shared by BATCH_SIZE jobs instead of taking turns with each store's.
RECEIVING_QUIET_SECONDS = 0.05
YIELD_SECONDS = 1.0
#: Tries of the model on one image before its original is forwarded without enhancement.
ENHANCE_ATTEMPTS = 3


_PARSING = threading.Lock()  # warnings.catch_warnings is process-wide: one parse at a time


def read_complete(path) -> Dataset:
    """Parse the whole file (pixels stay encoded) and refuse a torn one: ValueError when its
    header is torn or lacks the SOP UIDs, UnreadablePixels when only its Pixel Data is bad.

    pydicom reads a truncated file without complaint, so the Pixel Data is checked: native
    data must have the length its attributes promise, encapsulated data must parse into
    fragments. End-of-file warnings while parsing are errors here (in the Pixel Data when it
    was reached: it is the last element of an image). They are caught under a lock
    (two jobs parsed at once would see each other's); the catch is process-wide, so what other
    threads warned meanwhile (not from pydicom) is warned again after it.
    """
    with _PARSING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = dcmread(path)
    torn = [str(w.message) for w in caught
            if "End of file" in str(w.message) or "premature" in str(w.message).lower()]
    for w in caught:  # the parse's own are dropped, as before; another thread's are not ours to drop
        if str(w.message) not in torn and "pydicom" not in w.filename:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise ValueError(torn[0] if torn else f"{keyword} is missing")
    if torn:
        if "PixelData" not in ds:
            raise ValueError(torn[0])
        raise UnreadablePixels(f"Pixel Data is torn: {torn[0]}", ds)
    if "PixelData" in ds:
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            try:
                count = sum(1 for _ in generate_fragments(ds.PixelData))
            except Exception as exc:  # a broken item tag or length
                raise UnreadablePixels(f"encapsulated Pixel Data cannot be parsed: {exc}", ds) from None
            if count == 0:
                raise UnreadablePixels("encapsulated Pixel Data has no fragments", ds)
        else:
            expected = get_expected_length(ds)
            if len(ds.PixelData) < expected:
                raise UnreadablePixels(f"Pixel Data is truncated: {len(ds.PixelData)} of "
                                       f"{expected} bytes", ds)
    return ds


def out_of_space(exc: BaseException | None) -> bool:
    """A full disk or quota, from the file system or from SQLite (which reports it in words).
    pydicom re-raises a write error as a new OSError with the original's text, so the causes
    and the message are looked at too."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, OSError) and f"[Errno {errno.ENOSPC}]" in str(exc):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def timed(call, *args):
    """(call(*args), the seconds it took)."""
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


def send_or_retry(target, items: list[Item], on_delivered=None) -> list[Outcome]:
    """One outcome per item from `target.send_batch`; anything unexpected is a retry."""
    try:
        outcomes = list(target.send_batch(items, on_delivered))
    except Exception as exc:  # a bug or a surprise from a library: retry, don't die
        log.exception("sending failed unexpectedly", destination=target.name)
        outcomes = [Outcome("retry", f"{target.name}: {exc!r}")] * len(items)
    missing = len(items) - len(outcomes)  # an item without an answer is not delivered
    return outcomes[:len(items)] + [Outcome("retry", f"{target.name}: no outcome")] * max(0, missing)


class Worker:
    def __init__(self, config: Config, enhancer=None, is_derived_by_us=None, slot: int = 0, last_store=None):
        self.config = config
        self.last_store = last_store  # shared with the SCP: time.monotonic() of its last store
        self.slot = slot  # which of the [worker] processes this is: its jobs are claimed under it
        self.spool = Spool(config.spool.dir).create()
        self.queue = JobQueue(self.spool.db_path)
        self.is_derived_by_us = is_derived_by_us or (lambda ds: False)
        self.routing = Routing(enhanced_classes(config.model.enhance) if enhancer else frozenset(),
                               parametric_map=config.model.parametric_map,
                               forward_original=config.model.forward_original)
        self.derivation = None if enhancer is None else Derivation(
            self.spool, enhancer, with_maps=config.model.parametric_map, thumbnails=config.http.enabled and config.http.thumbnails)
        self.targets = [make_target(d, config.node, only_destination=len(config.destinations) == 1)
                        for d in config.destinations]
        # jobs prepared at once: enough to fill a batch of the network's, at least two
        batch = enhancer.predictor.batch if enhancer is not None else 1
        self.concurrency = max(PREPARE_CONCURRENCY, batch)
        self.timings: list = []  # (job_id, stage, destination, seconds) of the batch: /metrics histograms

    # --- one batch -----------------------------------------------------------------------

    def run_once(self, stop=None) -> int:
        """Claim and work one batch; returns how many jobs it took."""
        self.yield_to_receiving(stop)
        jobs = self.queue.claim(BATCH_SIZE, worker=self.slot, share=self.config.worker.processes)
        self.timings = []  # derive and the sends add theirs
        plans = self.prepare_batch(jobs, stop)
        delivered = self.send([p for p in plans if p.ready])
        now = time.time()
        self.apply([(plan, settle(plan, self.config.retry, now)) for plan in plans], delivered)
        return len(jobs)

    def prepare_batch(self, jobs: list[Job], stop=None) -> list[Plan]:
        """The plans of `jobs`, in order, `concurrency` jobs at a time. A job is started
        only while the batch is within PREPARE_BUDGET_SECONDS and not stopping; the jobs not
        started go back to the queue untouched, for the next batch."""
        started = time.monotonic()
        running: list = []
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="prepare") as pool:
            for i, job in enumerate(jobs):
                if i >= self.concurrency:
                    running[i - self.concurrency].exception()  # a place is free
                late = time.monotonic() - started > PREPARE_BUDGET_SECONDS
                if late or (stop is not None and stop.is_set()):
                    self.queue.release([j.id for j in jobs[i:]])
                    break
                context = contextvars.copy_context()  # the process's bound log fields
                running.append(pool.submit(context.run, self._prepare_logged, job))
        return [future.result() for future in running]

    def yield_to_receiving(self, stop=None) -> float:
        """Before a batch: wait while the SCP is storing (RECEIVING_QUIET_SECONDS), at most
        YIELD_SECONDS, and when only forwarding, only until BATCH_SIZE jobs are due; returns the
        seconds waited."""
        if self.last_store is None:
            return 0.0
        enough = None if self.derivation is not None else BATCH_SIZE
        started = time.monotonic()
        while time.monotonic() - self.last_store.value < RECEIVING_QUIET_SECONDS:
            if time.monotonic() - started >= YIELD_SECONDS or (stop is not None and stop.is_set()):
                break
            if enough is not None and self.queue.waiting() >= enough:
                break
            time.sleep(RECEIVING_QUIET_SECONDS / 2)
        return time.monotonic() - started

    def _prepare_logged(self, job: Job) -> Plan:
        with structlog.contextvars.bound_contextvars(**job_context(job)):
            return self.prepare(job)

    def send(self, ready: list[Plan]) -> list[tuple[int, str, str, str]]:
        """Every item of `ready` to every destination that does not have it yet, the outcomes
        into each plan; returns the deliveries (job_id, destination, item, SOP Instance UID)."""
        delivered: list[tuple[int, str, str, str]] = []
        work = []
        for target in self.targets:
            pending = [(plan, item) for plan in ready
                       for item in plan.items
                       if (target.name, item.kind) not in self.queue.deliveries(plan.job.id)]
            if pending:
                work.append((target, pending))
        # every destination at once: a PACS that hangs until its timeouts holds up only itself
        with ThreadPoolExecutor(max_workers=max(1, len(work))) as pool:
            sent = [(target, pending, pool.submit(timed, send_or_retry, target, [item for _, item in pending],
                                                  self._recorder(target.name, pending)))
                    for target, pending in work]
        for target, pending, future in sent:
            outcomes, seconds = future.result()
            for (plan, item), outcome in zip(pending, outcomes):
                plan.outcomes.append((target.name, item, outcome))
                if outcome.delivered:  # /metrics: the send's time, shared by what it carried
                    self.timings.append((plan.job.id, "send", target.name, seconds / len(pending)))
                audit.record("delivered" if outcome.delivered else f"delivery {outcome.result}",
                             association=plan.job.association, calling_ae=plan.job.calling_aet,
                             sop_instance_uid=item.sop_instance_uid, item=item.kind.value, destination=target.name,
                             job_id=plan.job.id, outcome=outcome.detail or "delivered")
                if outcome.delivered:
                    delivered.append((plan.job.id, target.name, item.kind.value, item.sop_instance_uid))
        return delivered

    def _recorder(self, destination: str, pending: list[tuple[Plan, Item]]):
        """Records each confirmed delivery at once (from the sending thread), so a crash in
        the middle of a batch re-sends only what the destination had not confirmed."""
        job_of = {id(item): plan.job.id for plan, item in pending}

        def record(item: Item) -> None:
            try:
                self.queue.record_delivery(job_of[id(item)], destination, item.kind.value, item.sop_instance_uid)
            except Exception as exc:  # e.g. a full disk: the batch's settlement records it again
                log.warning("delivery not recorded yet", destination=destination, error=repr(exc))
        return record

    def prepare(self, job: Job) -> Plan:
        plan = Plan(job)
        unreadable = None  # why the pixels cannot be read; the original may still go on
        try:
            ds = read_complete(job.path)
        except UnreadablePixels as exc:
            ds, unreadable = exc.dataset, str(exc)
        except Exception as exc:
            plan.failure = f"not a complete DICOM file: {exc}"
            return plan
        ts = str(ds.file_meta.TransferSyntaxUID)
        original = Item(ItemKind.ORIGINAL, job.path, job.sop_class_uid, job.sop_instance_uid, ts)
        derived = None
        if self.routing.enhances(job.sop_class_uid) and job.as_received:
            plan.note = "forwarded as received on request (dicom-node forward), not enhanced"
        elif self.routing.enhances(job.sop_class_uid):
            if self.is_derived_by_us(ds):
                log.info("derived by this node already, forwarded as is")
            elif unreadable:
                return self.not_enhanced(plan, original, "unreadable-pixels", f"not enhanced: {unreadable}")
            else:
                try:
                    derived = self.derivation.derive(job, ds, self.timings)
                except UnsupportedImage as exc:
                    return self.not_enhanced(plan, original, "unsupported-image", f"not enhanced: {exc}")
                except Exception as exc:  # a model/runtime error: retry, but never hold the original forever
                    if out_of_space(exc):  # not the model's fault: wait for space, then enhance
                        log.warning("spool full, the enhancement waits for space", error=str(exc))
                        plan.transient = f"spool full, enhancement to be retried: {exc}"
                        return plan
                    log.exception("enhancement failed")
                    if job.attempts + 1 < ENHANCE_ATTEMPTS:
                        plan.transient = f"enhancement failed: {exc!r}"
                        return plan
                    return self.not_enhanced(plan, original, "model-error",
                                             f"not enhanced after {ENHANCE_ATTEMPTS} attempts: {exc!r}")
        if unreadable and plan.note is None:  # not to be enhanced: its pixels are not ours to judge
            plan.note = f"forwarded as received: {unreadable}"
        plan.items = self.routing.items(original, derived and derived.instance, derived and derived.maps)
        return plan

    def not_enhanced(self, plan: Plan, original: Item, reason: str, note: str) -> Plan:
        """An image that was to be enhanced and cannot be: recorded (log, audit line, the
        queue's count per `reason` for /metrics), then its original goes on as received
        ([model] on_failure = "forward-original") or it is held in failed/ ("hold")."""
        job, hold = plan.job, self.config.model.on_failure == "hold"
        log.warning("not enhanced", reason=reason, detail=note, on_failure=self.config.model.on_failure)
        audit.record("not enhanced", association=job.association, calling_ae=job.calling_aet,
                     sop_instance_uid=job.sop_instance_uid, job_id=job.id, reason=reason,
                     outcome=f"{note}; {'held in failed/' if hold else 'original forwarded as received'}")
        try:
            self.queue.record_enhancement_failure(job.id, reason, note)
        except Exception as exc:  # a count for /metrics is not worth holding the image for
            log.warning("enhancement failure not counted", error=repr(exc))
        plan.note = note
        if hold:
            plan.failure = f'{note} ([model] on_failure = "hold")'
        else:
            plan.items = [original]
        return plan

    # --- settling ------------------------------------------------------------------------

    def apply(self, verdicts: list[tuple[Plan, Verdict]], deliveries: list) -> None:
        """Failed jobs' files to failed/, then one commit for the whole batch (its deliveries
        and timings too), then the files of finished jobs go and each job's line is logged."""
        done, retries, failed = [], [], []
        held = {}
        for plan, verdict in verdicts:
            job = plan.job
            if isinstance(verdict, Fail):
                held[job.id] = self.hold(job, verdict.reason)
                failed.append((job.id, verdict.reason, held[job.id]))
            elif isinstance(verdict, Retry):
                retries.append((job.id, verdict.reason, verdict.at))
            else:
                done.append((job.id, verdict.note))
        self.queue.settle(deliveries, done, retries, failed, self.timings)
        for plan, verdict in verdicts:
            if isinstance(verdict, Done):
                job_id = plan.job.id
                self.spool.remove(plan.job.path, self.spool.derived_path(job_id), self.spool.maps_path(job_id),
                                  sync=False)
        for plan, verdict in verdicts:
            job = plan.job
            final = {"association": job.association, "calling_ae": job.calling_aet,
                     "sop_instance_uid": job.sop_instance_uid, "job_id": job.id}
            with structlog.contextvars.bound_contextvars(**job_context(job)):
                if isinstance(verdict, Fail):
                    log.error("failed, held in failed/", path=str(held[job.id]), reason=verdict.reason)
                    audit.record("held", **final, path=str(held[job.id]), outcome=verdict.reason)
                elif isinstance(verdict, Retry):
                    log.warning("will retry", attempt=verdict.attempt, in_seconds=round(verdict.delay, 2),
                                error=verdict.reason)
                else:
                    log.info("delivered", items=[i.kind.value for i in plan.items],
                             destinations=[t.name for t in self.targets])
                    # every job's audit trail ends in one of done, held (failed/) or discarded
                    audit.record("done", **final, outcome=verdict.note or "delivered")

    def hold(self, job: Job, reason: str):
        """The job's file into failed/ with its reason; its derived files go. Returns the held path."""
        text = (f"job {job.id}\nSOP Instance UID {job.sop_instance_uid}\n"
                f"SOP Class UID {job.sop_class_uid}\ncalling AE {job.calling_aet}"
                f" (association {job.association})\n"
                f"received {iso_utc(job.received_at)}\n"
                f"reason: {reason}\n")
        held = self.spool.hold_failed(job.id, job.path, job.sop_instance_uid, text)
        self.spool.remove(self.spool.derived_path(job.id), self.spool.maps_path(job.id))
        return held


def job_context(job: Job) -> dict:
    """What a job's log lines carry (bound with contextvars)."""
    return {"job_id": job.id, "association": job.association, "sop_instance_uid": job.sop_instance_uid}


def limit_threads(config: Config) -> dict:
    """[worker] threads for this process, set before torch's first op (torch reads OpenMP's
    settings when it loads). OpenMP's idle threads sleep instead of spinning (unless the
    environment says otherwise), so that between two parallel regions they leave the cores to
    the SCP and to the other workers. Returns what was set, for the log."""
    threads = config.worker.threads_per_process()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    settings = {"threads": threads, "processes": config.worker.processes, "cores": available_cores(),
                "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    if config.model.enhance:  # torch is imported only by a worker that enhances
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)  # the worker runs one model call at a time
        except RuntimeError:  # already set in this process (tests)
            pass
        settings["torch_threads"] = torch.get_num_threads()
    return settings


def _load_enhancer(config: Config):
    """The model, once, if anything is to be enhanced (imports torch: worker process only), and
    what to tell /health about it (spool/worker.json)."""
    status = {"pid": os.getpid(), "loaded": False}
    if not config.model.enhance:
        return None, None, status
    from dicom_node.enhancer import Enhancer
    from dicom_node.writer import is_derived_by_us

    started = time.perf_counter()
    enhancer = Enhancer(config.model.weights, device=config.model.device, mode=config.model.mode,
                        max_burnt_out=config.model.max_burnt_out, output_syntax=config.model.output_transfer_syntax,
                        batch=config.worker.batch)
    predictor = enhancer.predictor
    status["device"] = str(predictor.device)
    try:
        predictor.checkpoint  # noqa: B018 - load now (it is lazy), so the time and a bad file show here
    except Exception as exc:  # each job then tries again, and forwards its original after ENHANCE_ATTEMPTS
        log.error("model cannot be loaded", weights=str(config.model.weights), error=repr(exc))
        status["error"] = repr(exc)
        return enhancer, is_derived_by_us, status
    status.update(loaded=True, model=predictor.name, identity=predictor.identity)
    log.info("model loaded", weights=str(config.model.weights), model=predictor.name,
             device=str(predictor.device), configured_device=config.model.device, mode=config.model.mode,
             seconds=round(time.perf_counter() - started, 2))
    return enhancer, is_derived_by_us, status


def _write_status(spool: Spool, status: dict) -> None:
    """spool/worker.json: the model this worker loaded, for the node's /health and /metrics."""
    try:
        write_atomic(spool.root / "worker.json", json.dumps(status).encode())
    except OSError as exc:
        log.warning("worker status not written", error=repr(exc))


def adopt_unconfigured_slots(worker: Worker) -> None:
    """Jobs left in processing by worker slots beyond [worker] processes (the node ran with more
    before) go back to the queue, each once its old process (if any) has let go of the slot."""
    for slot in sorted(worker.queue.processing_slots()):
        if slot >= worker.config.worker.processes:
            worker.spool.lock_worker(lambda slot=slot: log.warning("waiting for an old worker to finish its batch",
                                                                   slot=slot), slot=slot)
            count = worker.queue.resume(worker=slot)
            worker.spool.unlock_worker(slot)
            log.info("jobs of a worker slot no longer configured are back in the queue", slot=slot, count=count)


def main(config_path: str, stop, wake, log_level: str | None = None, audit_queue=None, slot: int = 0,
         last_store=None) -> None:
    """Process entry point of worker `slot` (0 .. [worker] processes - 1): work until `stop` is
    set or the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates shutdown
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.nice(WORKER_NICENESS)
    config = load_config(config_path)
    level = log_level or config.logging.level  # serve --log-level wins
    configure_logging(config.logging.format, level)
    if level != "debug":  # a refused or timed-out association is our one "will retry" warning, not
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # pynetdicom's two error lines
    structlog.contextvars.bind_contextvars(process="worker" if config.worker.processes == 1 else f"worker-{slot}")
    audit.send_to(audit_queue)
    threads = limit_threads(config)  # before the model (torch) loads
    log.info("worker threads", **threads)
    enhancer, is_ours, status = _load_enhancer(config)
    worker = Worker(config, enhancer, is_ours, slot=slot, last_store=last_store)
    if slot == 0:
        _write_status(worker.spool, {**status, "processes": config.worker.processes, "threads": threads["threads"]})
    worker.spool.lock_worker(lambda: log.warning("waiting for the previous worker to finish its batch"), slot=slot)
    resumed = worker.queue.resume(worker=slot)
    if resumed:
        log.info("resumed jobs left in processing", count=resumed)
    if slot == 0:
        adopt_unconfigured_slots(worker)
    log.info("worker ready", destinations=[t.name for t in worker.targets],
             enhance=sorted(worker.routing.enhance_classes))
    parent = multiprocessing.parent_process()
    unsettled = False  # a batch could not be put back (a full disk): jobs stuck in processing
    while not stop.is_set():
        if parent is not None and not parent.is_alive():
            log.error("node process is gone, worker stops")
            break
        wake.clear()  # a job stored from now on wakes the wait below
        try:
            if unsettled:
                worker.queue.resume(worker=slot)
                unsettled = False
                log.info("the batch is back in the queue")
            if worker.run_once(stop):
                continue
        except Exception as exc:  # e.g. disk full while settling: keep the jobs, try again shortly
            if out_of_space(exc):
                log.error("spool full, the batch goes back to the queue", error=repr(exc))
            else:
                log.exception("batch failed, its jobs go back to the queue")
            try:
                worker.queue.resume(worker=slot)
            except Exception as again:  # a full disk can refuse even that: tried again each round
                unsettled = True
                log.error("cannot put the batch back yet", error=repr(again))
            stop.wait(5.0 if out_of_space(exc) else 1.0)
            continue
        due = worker.queue.next_due()
        wake.wait(1.0 if due is None else min(1.0, max(0.0, due - time.time())))
    worker.queue.resume(worker=slot)  # anything it still claimed goes back to received
    log.info("worker stopped", pid=os.getpid())
