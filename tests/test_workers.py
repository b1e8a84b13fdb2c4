"""[worker] processes and threads: several worker processes share the SQLite queue, each job is
worked exactly once; the thread setting and its default."""
from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_node.config import WorkerSettings, load_config
from dicom_node.errors import ConfigError
from dicom_node.jobs import JobQueue
from dicom_node.spool import Spool
from support.helpers import phantom_dataset, worker_processes, write_worker_config
from support.node_peers import NodeProcess, copies_with_new_uids, storescu, wait_until

SPAWN = multiprocessing.get_context("spawn")


def _claimer(db: str, out: str, slot: int, share: int, start) -> None:
    """Claims until the queue is empty, writing each claimed job id on its own line."""
    queue = JobQueue(db)
    start.wait(60)  # all the processes ready: they claim at the same time
    with open(out, "w") as f:
        empty = 0
        while empty < 20:
            jobs = queue.claim(3, worker=slot, share=share)
            empty = 0 if jobs else empty + 1
            f.writelines(f"{job.id}\n" for job in jobs)
            f.flush()
            time.sleep(0.005)  # the work a worker does between claims (SQLite's lock is not fair: a
            # process that claims again at once can keep the others waiting in their busy back-off)


def test_claims_from_several_processes_never_take_a_job_twice(tmp_path):
    queue = JobQueue(tmp_path / "queue.sqlite3")
    ids = {queue.add(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.7", tmp_path / f"{i}.dcm")[0] for i in range(600)}
    outs = [tmp_path / f"claimed-{slot}.txt" for slot in range(4)]
    start = SPAWN.Barrier(len(outs))
    procs = [SPAWN.Process(target=_claimer, args=(str(queue.path), str(out), slot, 4, start))
             for slot, out in enumerate(outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    claimed = [[int(line) for line in out.read_text().split()] for out in outs]
    every = [job_id for per_process in claimed for job_id in per_process]
    assert sorted(every) == sorted(ids), "each job claimed exactly once"
    assert all(per_process for per_process in claimed), [len(c) for c in claimed]
    assert queue.counts()["processing"] == 600
    assert queue.processing_slots() == {0, 1, 2, 3}
    assert queue.resume(worker=2) == len(claimed[2])  # a slot puts back only its own jobs
    assert queue.counts()["processing"] == 600 - len(claimed[2])


def test_a_newer_copy_of_an_instance_another_worker_is_working_on_waits_for_it(tmp_path):
    queue = JobQueue(tmp_path / "queue.sqlite3")
    first, _ = queue.add("1.2.3.9", "1.2.840.10008.5.1.4.1.1.1", tmp_path / "first.dcm")
    other, _ = queue.add("1.2.3.10", "1.2.840.10008.5.1.4.1.1.1", tmp_path / "other.dcm")
    assert [j.id for j in queue.claim(1, worker=0, share=2)] == [first]  # slot 0 works on copy 1
    second, _ = queue.add("1.2.3.9", "1.2.840.10008.5.1.4.1.1.1", tmp_path / "second.dcm")
    assert second != first  # copy 1 is in processing: copy 2 is queued, not superseding it
    assert [j.id for j in queue.claim(5, worker=1)] == [other]  # copy 2 waits for copy 1
    queue.settle(done=[(first, None)])
    assert [j.id for j in queue.claim(5, worker=1)] == [second]  # now it goes, after copy 1


def test_a_queue_made_before_worker_slots_gets_the_column_and_slot_0_owns_its_claims(tmp_path):
    import sqlite3

    db = tmp_path / "queue.sqlite3"
    conn = sqlite3.connect(db)  # the schema as it was, with one job in processing
    conn.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, sop_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, calling_aet TEXT NOT NULL DEFAULT '', association TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL, updated_at REAL NOT NULL, last_error TEXT);
        INSERT INTO jobs (sop_instance_uid, sop_class_uid, path, state, received_at, next_attempt_at, updated_at)
            VALUES ('1.2.3', '1.2.840.10008.5.1.4.1.1.7', 'x.dcm', 'processing', 0, 0, 0);
    """)
    conn.commit()
    conn.close()
    queue = JobQueue(db)
    assert queue.processing_slots() == {0}
    assert queue.resume(worker=1) == 0
    assert queue.resume(worker=0) == 1


def _config(tmp_path: Path, weights: Path, processes: int, threads: int = 1) -> Path:
    return write_worker_config(tmp_path, weights, processes, threads, enhance=("CR",))


@pytest.mark.timeout(300)
def test_two_worker_processes_on_one_queue_work_every_job_exactly_once(tmp_path, constant_weights):
    """Real worker processes (worker.main, as the node spawns them), real files in the spool,
    the real queue; the audit log counts what each job was made into and delivered as."""
    from dicom_node import audit

    config = load_config(_config(tmp_path, constant_weights, processes=2))
    spool = Spool(config.spool.dir).create()
    queue = JobQueue(spool.db_path)
    audit_queue = SPAWN.Queue()
    writer = audit.AuditWriter(tmp_path / "audit.jsonl", 10**8, 1, audit_queue)
    try:
        with worker_processes(config.path, 2, audit_queue, ready_timeout=120) as (procs, wake):
            n = 60
            uids = []
            for i in range(n):  # small real CRs, enhanced by the constant model
                ds = phantom_dataset(160, 128, seed=i)
                path = spool.store_received(lambda f, ds=ds: ds.save_as(f, enforce_file_format=True),
                                            ds.SOPInstanceUID)
                queue.add(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
                uids.append(str(ds.SOPInstanceUID))
            wake.set()
            wait_until(lambda: queue.counts()["done"] == n, 240, interval=0.2, what="every job done")
    finally:
        writer.close()
    assert [p.exitcode for p in procs] == [0, 0]
    assert queue.counts() == {"received": 0, "processing": 0, "done": n, "failed": 0}
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    derived = Counter(e["source_sop_instance_uid"] for e in lines if e["action"] == "derived")
    assert derived == Counter({uid: 1 for uid in uids}), "each job enhanced exactly once"
    delivered = Counter((e["sop_instance_uid"], e["item"]) for e in lines if e["action"] == "delivered")
    assert sorted(delivered.values()) == [1] * (2 * n), "each original and each derived instance delivered once"
    assert {uid for uid, item in delivered if item == "original"} == set(uids)
    assert len(list((tmp_path / "outbox").rglob("*.dcm"))) == 2 * n
    by_slot = Counter(row[0] for row in queue._conn().execute("SELECT claimed_by FROM jobs"))
    assert set(by_slot) == {0, 1}, f"both workers took jobs: {dict(by_slot)}"


@pytest.mark.timeout(180)
def test_the_node_runs_its_configured_worker_processes_and_logs_their_threads(tmp_path, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    node.config.write_text(node.config.read_text() + "[worker]\nprocesses = 2\n")
    peers.append(node)
    node.start()
    files = copies_with_new_uids(Path(get_testdata_file("CT_small.dcm")), tmp_path / "in", 6)
    assert storescu(files, node.port).returncode == 0
    node.wait_drained(expected_done=6)
    assert node.stop() == 0
    lines = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    threads = {e["process"]: e for e in lines if e["event"] == "worker threads"}
    assert set(threads) == {"worker-0", "worker-1"}
    cores = threads["worker-0"]["cores"]
    assert all(e["threads"] == max(1, cores // 2) and e["processes"] == 2 for e in threads.values())
    assert all(e.get("torch_threads") == max(1, cores // 2) for e in threads.values())
    assert len(list(outbox.rglob("*.dcm"))) == 6


def test_worker_settings_default_threads_share_the_cores_among_the_processes(tmp_path):
    assert WorkerSettings().threads_per_process(cores=8) == 8
    assert WorkerSettings(processes=2).threads_per_process(cores=8) == 4
    assert WorkerSettings(processes=3).threads_per_process(cores=2) == 1
    assert WorkerSettings(processes=2, threads=3).threads_per_process(cores=2) == 3
    config = tmp_path / "config.toml"
    base = '[[destinations]]\nname = "a"\ntype = "folder"\npath = "out"\n'
    config.write_text(base)
    assert load_config(config).worker == WorkerSettings(processes=1, threads=0)
    for body, key in [("[worker]\nprocesses = 0\n", "[worker] processes"), ("[worker]\nthreads = -1\n", "[worker] threads"),
                      ('[worker]\nthreads = "4"\n', "[worker] threads"), ("[worker]\nworkers = 2\n", "[worker] workers")]:
        config.write_text(base + body)
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(config)


@pytest.mark.timeout(300)
def test_a_batch_prepared_two_jobs_at_a_time_keeps_each_jobs_outcome_its_own(tmp_path, constant_weights, monkeypatch):
    """Jobs of one batch are read, enhanced and written PREPARE_CONCURRENCY at a time: torn files
    between good ones are each found by their own parse (not by a neighbour's warnings) and go on
    as received, every good one is derived from its own pixels, and the plans come back in the
    batch's order."""
    import pydicom

    from dicom_node import worker as worker_module

    monkeypatch.setattr(worker_module, "PREPARE_BUDGET_SECONDS", 120)  # the whole batch, on a busy CPU too

    assert worker_module.PREPARE_CONCURRENCY > 1
    config = load_config(_config(tmp_path, constant_weights, processes=1))
    enhancer, is_ours, _ = worker_module._load_enhancer(config)
    worker = worker_module.Worker(config, enhancer, is_ours)
    expected = {}
    for i in range(8):
        ds = phantom_dataset(192 + 8 * i, 160, seed=i)  # sizes differ: a mix-up shows in the rows
        ds.save_as(tmp_path / "tmp.dcm", enforce_file_format=True)
        data = (tmp_path / "tmp.dcm").read_bytes()
        torn = i % 2 == 1
        if torn:
            data = data[: len(data) - 3000]  # cut inside Pixel Data
        path = worker.spool.store_received(data, ds.SOPInstanceUID)
        job_id, _ = worker.queue.add(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
        expected[job_id] = (str(ds.SOPInstanceUID), ds.Rows, torn)
    jobs = worker.queue.claim(16)
    plans = worker.prepare_batch(jobs)
    assert [p.job.id for p in plans] == [j.id for j in jobs] == sorted(expected)
    for plan in plans:
        uid, rows, torn = expected[plan.job.id]
        if torn:
            assert plan.failure is None and "Pixel Data is truncated" in plan.note, plan.note
            assert [item.kind.value for item in plan.items] == ["original"]
            continue
        assert plan.failure is None and plan.ready
        derived = pydicom.dcmread(worker.spool.derived_path(plan.job.id))
        assert derived.Rows == rows
        assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == uid


@pytest.mark.timeout(120)
def test_a_worker_holds_back_while_the_scp_receives_and_never_longer_than_its_cap(tmp_path, constant_weights):
    """Receiving comes first: before each batch an enhancing worker waits while stores keep coming
    (the node's shared last-store time), at most YIELD_SECONDS; under a steady stream it then
    works a whole batch, not one job (a wait per job had let one job through every 2 s)."""
    import threading

    from dicom_node import worker as worker_module
    from dicom_node.node import Node

    config = load_config(_config(tmp_path, constant_weights, processes=1))
    node = Node(config)
    enhancer, is_ours, _ = worker_module._load_enhancer(config)
    worker = worker_module.Worker(config, enhancer, is_ours, last_store=node.last_store)
    quiet, cap = worker_module.RECEIVING_QUIET_SECONDS, worker_module.YIELD_SECONDS
    assert worker.yield_to_receiving() < quiet  # nothing received yet: no wait
    assert worker_module.Worker(config, last_store=node.last_store).derivation is None

    receiving, done = threading.Event(), threading.Event()

    def store_for(seconds: float) -> None:  # as the SCP does after each store
        receiving.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not done.is_set():
            node._stored()
            time.sleep(quiet / 5)
    burst = threading.Thread(target=store_for, args=(0.4 * cap,))
    burst.start()
    receiving.wait()
    waited = worker.yield_to_receiving()
    burst.join()
    assert 0.3 * cap <= waited < cap, waited  # until the burst was over
    assert node.wake.is_set()

    for i in range(20):  # a backlog, and stores that never pause
        ds = phantom_dataset(96, 80, seed=i)
        path = worker.spool.store_received(lambda f, ds=ds: ds.save_as(f, enforce_file_format=True), ds.SOPInstanceUID)
        worker.queue.add(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
    stream = threading.Thread(target=store_for, args=(3 * cap + 5,))
    stream.start()
    try:
        started = time.monotonic()
        taken = worker.run_once()
        elapsed = time.monotonic() - started
    finally:
        done.set()
        stream.join()
    assert elapsed >= cap, elapsed  # it waited its cap, though the stores went on
    assert taken == worker_module.BATCH_SIZE and worker.queue.counts()["done"] == taken  # then a whole batch


@pytest.mark.timeout(120)
def test_a_forwarding_worker_holds_back_while_the_scp_receives_until_a_whole_batch_is_due(tmp_path, constant_weights):
    """A worker that only forwards waits while stores keep coming, as an enhancing one does, but
    only until BATCH_SIZE jobs are due: then it works them as one batch (one claim, one folder
    fsync, one settle) instead of one or two at a time between the SCP's stores."""
    import threading

    from dicom_node import worker as worker_module
    from dicom_node.node import Node

    config = load_config(_config(tmp_path, constant_weights, processes=1))
    node = Node(config)
    worker = worker_module.Worker(config, last_store=node.last_store)  # no enhancer: forwards only
    quiet, cap, batch = worker_module.RECEIVING_QUIET_SECONDS, worker_module.YIELD_SECONDS, worker_module.BATCH_SIZE
    done = threading.Event()

    def store_every(seconds: float) -> None:  # as the SCP does after each store
        while not done.is_set():
            node._stored()
            time.sleep(seconds)

    def add(i: int) -> None:
        worker.queue.add(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.1", tmp_path / f"{i}.dcm")
    stream = threading.Thread(target=store_every, args=(quiet / 5,))
    stream.start()
    try:
        for i in range(batch - 1):
            add(i)
        time.sleep(quiet)
        assert worker.yield_to_receiving() >= cap  # one job short of a batch: its whole cap
        last = threading.Timer(0.3 * cap, add, args=(batch,))
        last.start()
        waited = worker.yield_to_receiving()
        last.join()
        assert 0.3 * cap <= waited < 0.8 * cap, waited  # until the batch was complete
        assert worker.yield_to_receiving() < quiet  # a batch is due: no wait
    finally:
        done.set()
        stream.join()
    assert worker.queue.waiting() == batch


def test_a_warning_another_thread_gives_while_a_file_is_parsed_is_not_lost(tmp_path):
    """read_complete catches warnings process-wide (pydicom's end-of-file ones mean a torn file):
    one that another thread gives meanwhile is given again, not swallowed."""
    import threading
    import warnings

    from dicom_node import worker as worker_module

    ds = phantom_dataset(64, 48, seed=2)
    ds.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    original_dcmread, given = worker_module.dcmread, threading.Event()

    def dcmread_while_another_thread_warns(path):
        def other_job() -> None:
            warnings.warn("the fused remap kernel is not available", RuntimeWarning)
            given.set()
        thread = threading.Thread(target=other_job)
        thread.start()
        thread.join()
        return original_dcmread(path)
    worker_module.dcmread = dcmread_while_another_thread_warns
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            read = worker_module.read_complete(tmp_path / "cr.dcm")
    finally:
        worker_module.dcmread = original_dcmread
    assert given.is_set() and read.SOPInstanceUID == ds.SOPInstanceUID
    assert [str(w.message) for w in seen] == ["the fused remap kernel is not available"]
