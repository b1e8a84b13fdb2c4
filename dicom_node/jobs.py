"""The job queue: one SQLite database in the spool (WAL).

Commits are fsynced (synchronous=FULL), except where the caller says a lost commit can be
rebuilt: the node process records each received instance with synchronous=NORMAL, because
its file is already durable in incoming/ and the start-up reconciliation (node.adopt_orphans)
queues any received file whose job a power cut took. A crash of the process alone (kill -9)
loses no commit in either mode; only the machine's own crash can.

A job is one received instance. States::

    received --claim--> processing --> done
        ^                   |      \\--> failed   (file held in failed/ with its reason)
        \\---- retry -------/            (attempts, next_attempt_at, last_error)

Deliveries are recorded per (job, destination, item) where item is an ItemKind value
("original", "derived" or "parametric-map"), so a retry only goes to the destinations that do not have the item yet and
a spool file is removed only when every destination has it.

Connections are per thread: the SCP's association threads each write their own job.
"""
from __future__ import annotations

import bisect
import itertools
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STATES = ("received", "processing", "done", "failed")
SYNCHRONOUS = ("FULL", "NORMAL")  # SQLite's PRAGMA synchronous values we use (see the module note)


def iso_utc(ts: float | None) -> str | None:
    """A queue timestamp (epoch seconds) as ISO 8601 UTC, for reports."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL DEFAULT '',
    association TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT,
    claimed_by INTEGER,  -- the worker slot whose process holds it while processing (NULL: slot 0)
    as_received INTEGER NOT NULL DEFAULT 0  -- `dicom-node forward`: send what was received, never enhance
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_uid ON jobs (sop_instance_uid, state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    item TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, item)
);
CREATE TABLE IF NOT EXISTS enhancement_failures (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
    reason TEXT NOT NULL,   -- a label for /metrics: unreadable-pixels, unsupported-image, model-error
    detail TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS timing_buckets (
    stage TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT '',
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (stage, destination, bucket)
);
CREATE TABLE IF NOT EXISTS timing_sums (
    stage TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (stage, destination)
);
"""

# upper bounds (seconds) of the timing histograms' buckets; one more bucket holds what is above.
# The queue keeps the counts per bucket, not each time: a scrape reads a few rows, however old
# the node is.
TIMING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NEWEST_COPY = ("NOT EXISTS (SELECT 1 FROM jobs AS later WHERE later.sop_instance_uid = jobs.sop_instance_uid"
                " AND later.id > jobs.id)")


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    calling_aet: str
    association: str
    path: Path
    state: str
    attempts: int
    received_at: float
    next_attempt_at: float
    last_error: str | None
    as_received: bool = False  # `dicom-node forward`: what was received goes on, without enhancement

    @property
    def display_state(self) -> str:
        """The state as people read it (status, the page): a job waiting for another attempt
        is `retrying`, not `received`."""
        return "retrying" if self.state == "received" and self.attempts > 0 else self.state

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], sop_instance_uid=row["sop_instance_uid"],
                   sop_class_uid=row["sop_class_uid"], calling_aet=row["calling_aet"],
                   association=row["association"],
                   path=Path(row["path"]), state=row["state"], attempts=row["attempts"],
                   received_at=row["received_at"], next_attempt_at=row["next_attempt_at"],
                   last_error=row["last_error"],
                   as_received=bool(row["as_received"]) if "as_received" in row.keys() else False)


class JobQueue:
    """The queue database; safe to use from several threads and processes."""

    def __init__(self, path: str | Path, readonly: bool = False, synchronous: str = "FULL"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self.synchronous = synchronous
        self._local = threading.local()
        if not readonly:
            with self._conn() as conn:
                conn.executescript(_SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
                # a queue made by an older node: add what it lacks (the worker slot, as_received)
                for column, kind in (("claimed_by", "INTEGER"), ("as_received", "INTEGER NOT NULL DEFAULT 0")):
                    if column not in columns:
                        try:
                            conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                        except sqlite3.OperationalError as exc:  # another worker process added it meanwhile
                            if "duplicate column" not in str(exc):
                                raise

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            else:
                conn = sqlite3.connect(self.path, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def integrity_problem(self) -> str | None:
        """None when SQLite's quick check passes, else what it found."""
        rows = [r[0] for r in self._conn().execute("PRAGMA quick_check").fetchall()]
        return None if rows == ["ok"] else "; ".join(rows[:5])

    def sync(self) -> None:
        """fsync the write-ahead log, so that every commit made so far survives a power cut
        (with synchronous=NORMAL a commit alone survives only a crash of the process)."""
        try:
            fd = os.open(self.path.with_name(self.path.name + "-wal"), os.O_RDONLY)
        except FileNotFoundError:  # no log: every commit is in the database file, synced by its checkpoint
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- the SCP side ------------------------------------------------------------------

    def add(self, sop_instance_uid: str, sop_class_uid: str, path: Path,
            calling_aet: str = "", association: str = "") -> tuple[int, list[Path]]:
        """Record a received instance; committed when this returns (durable with synchronous=FULL;
        with NORMAL after `sync`, or rebuilt from its file at start).

        An older copy of the same SOP Instance that is still waiting (not yet claimed) is
        superseded by this one, so one instance is never delivered with two contents.
        Returns the new job id and the files of superseded jobs, for the caller to remove.
        """
        now = time.time()
        conn = self._conn()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            old = conn.execute(
                "SELECT id, path FROM jobs WHERE sop_instance_uid = ? AND state = 'received'",
                (sop_instance_uid,)).fetchall()
            job_id = conn.execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, calling_aet, association, path,"
                " state, received_at, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'received', ?, ?, ?)",
                (sop_instance_uid, sop_class_uid, calling_aet, association, str(path), now, now, now),
            ).lastrowid
            for row in old:
                conn.execute(
                    "UPDATE jobs SET state = 'done', updated_at = ?, last_error = ? WHERE id = ?",
                    (now, f"superseded by a later copy of the same instance (job {job_id})",
                     row["id"]))
        return job_id, [Path(row["path"]) for row in old]

    def known_paths(self) -> dict[str, str]:
        """Spool path -> state of the job that owns it, for every job."""
        return {row[0]: row[1] for row in self._conn().execute("SELECT path, state FROM jobs")}

    # --- the worker side ---------------------------------------------------------------

    def resume(self, worker: int | None = None) -> int:
        """Jobs left in processing by a stopped or crashed worker become ready again: those of
        worker slot `worker` (slot 0 also owns jobs claimed before slots existed), or all."""
        where, args = "state = 'processing'", [time.time()]
        if worker is not None:
            where += " AND COALESCE(claimed_by, 0) = ?"
            args.append(worker)
        with self._conn() as conn:
            return conn.execute(f"UPDATE jobs SET state = 'received', updated_at = ? WHERE {where}", args).rowcount

    def processing_slots(self) -> set[int]:
        """The worker slots that hold jobs in processing."""
        return {row[0] for row in self._conn().execute(
            "SELECT DISTINCT COALESCE(claimed_by, 0) FROM jobs WHERE state = 'processing'")}

    def claim(self, limit: int, now: float | None = None, worker: int = 0, share: int = 1) -> list[Job]:
        """Move up to `limit` ready jobs (oldest first) to processing for worker slot `worker`,
        and return them. One transaction (BEGIN IMMEDIATE: one writer at a time), so two workers
        never take the same job. With `share` workers, a worker takes at most its share of what
        is ready (rounded up), so that a short queue is spread over all of them. A newer copy of
        an instance another worker is still working on waits for it: else the older copy could
        reach a destination last."""
        now = time.time() if now is None else now
        ready = ("FROM jobs WHERE state = 'received' AND next_attempt_at <= ? AND NOT EXISTS"
                 " (SELECT 1 FROM jobs AS busy WHERE busy.sop_instance_uid = jobs.sop_instance_uid"
                 " AND busy.state = 'processing')")
        conn = self._conn()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if share > 1:
                count = conn.execute(f"SELECT COUNT(*) {ready}", (now,)).fetchone()[0]
                limit = min(limit, -(-count // share))
            rows = conn.execute(f"SELECT * {ready} ORDER BY next_attempt_at, id LIMIT ?", (now, limit)).fetchall()
            conn.executemany("UPDATE jobs SET state = 'processing', claimed_by = ?, updated_at = ? WHERE id = ?",
                             [(worker, now, row["id"]) for row in rows])
        return [Job.from_row(row) for row in rows]

    def waiting(self, now: float | None = None) -> int:
        """How many jobs are due (received, next attempt not in the future): what a claim could
        take, give or take the newer copies that wait for an older one."""
        now = time.time() if now is None else now
        return self._conn().execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'received' AND next_attempt_at <= ?", (now,)).fetchone()[0]

    def next_due(self) -> float | None:
        """When the earliest waiting job becomes ready (None when nothing waits)."""
        row = self._conn().execute(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'received'").fetchone()
        return row[0]

    def release(self, job_ids: list[int]) -> None:
        """Give claimed jobs back untouched (shutdown before they were worked on)."""
        with self._conn() as conn:
            conn.executemany(
                "UPDATE jobs SET state = 'received', updated_at = ? WHERE id = ? AND state = 'processing'",
                [(time.time(), i) for i in job_ids])

    def deliveries(self, job_id: int) -> set[tuple[str, str]]:
        """The (destination, item) pairs already delivered for a job."""
        return {(row[0], row[1]) for row in self._conn().execute(
            "SELECT destination, item FROM deliveries WHERE job_id = ?", (job_id,))}

    def record_delivery(self, job_id: int, destination: str, item: str, sop_instance_uid: str) -> None:
        """One delivery, committed as soon as the destination confirmed it: a crash later in the
        batch then re-sends only what was not confirmed (settle records it again, harmlessly)."""
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?)",
                         (job_id, destination, item, sop_instance_uid, time.time()))

    def settle(self, deliveries=(), done=(), retries=(), failed=(), timings=()) -> None:
        """A whole batch in one transaction (one fsync instead of several per job).

        deliveries: (job_id, destination, item, sop_instance_uid); done: (job_id, note);
        retries: (job_id, error, next_attempt_at); failed: (job_id, error, held_path);
        timings: (job_id, stage, destination, seconds), stage "enhance" or "send".
        """
        now = time.time()
        with self._conn() as conn:
            conn.executemany("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?)",
                             [(*d, now) for d in deliveries])
            conn.executemany(
                "INSERT INTO timing_buckets VALUES (?, ?, ?, 1)"
                " ON CONFLICT (stage, destination, bucket) DO UPDATE SET count = count + 1",
                [(stage, dest, bisect.bisect_left(TIMING_BUCKETS, seconds)) for _, stage, dest, seconds in timings])
            conn.executemany(
                "INSERT INTO timing_sums VALUES (?, ?, 1, ?) ON CONFLICT (stage, destination)"
                " DO UPDATE SET count = count + 1, seconds = seconds + excluded.seconds",
                [(stage, dest, seconds) for _, stage, dest, seconds in timings])
            conn.executemany(
                "UPDATE jobs SET state = 'done', attempts = attempts + 1,"
                " last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ?",
                [(note, now, job_id) for job_id, note in done])
            conn.executemany(
                "UPDATE jobs SET state = 'received', attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ?, updated_at = ? WHERE id = ?",
                [(error, at, now, job_id) for job_id, error, at in retries])
            conn.executemany(
                "UPDATE jobs SET state = 'failed', attempts = attempts + 1, last_error = ?,"
                " path = ?, updated_at = ? WHERE id = ?",
                [(error, str(held), now, job_id) for job_id, error, held in failed])

    def superseded(self, job_ids: list[int]) -> set[int]:
        """Those of these jobs whose instance came again later (a newer job): not retried."""
        marks = ",".join("?" * len(job_ids))
        return {row[0] for row in self._conn().execute(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND NOT {_NEWEST_COPY}", list(job_ids))}

    def requeue_failed(self, job_ids: list[int] | None = None, as_received: bool = False) -> list[Job]:
        """Failed jobs (these, or all with None) back to received, due now, attempts and the
        give-up clock started again; their held file stays where it is (job.path) until done.
        `as_received`: sent as received, without enhancement (`dicom-node forward`).
        Returns the jobs as they were before."""
        asked = "forward as received" if as_received else "retry"
        now = time.time()
        conn = self._conn()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            # a failed job whose instance came again later (a newer job) is superseded: not retried
            if job_ids is None:
                rows = conn.execute(f"SELECT * FROM jobs WHERE state = 'failed' AND {_NEWEST_COPY}").fetchall()
            else:
                marks = ",".join("?" * len(job_ids))
                rows = conn.execute(f"SELECT * FROM jobs WHERE state = 'failed' AND {_NEWEST_COPY} AND id IN ({marks})",
                                    list(job_ids)).fetchall()
            conn.executemany(
                "UPDATE jobs SET state = 'received', attempts = 0, received_at = ?, next_attempt_at = ?,"
                " updated_at = ?, last_error = ?, as_received = ? WHERE id = ?",
                [(now, now, now, f"{asked} requested; it had failed: {row['last_error']}", int(as_received), row["id"])
                 for row in rows])
        return [Job.from_row(row) for row in rows]

    def mark_discarded(self, job_id: int, archived: Path, note: str) -> bool:
        """A failed job is done, its file kept at `archived` (`dicom-node discard`); False if it
        was not failed (any more)."""
        with self._conn() as conn:
            return conn.execute(
                "UPDATE jobs SET state = 'done', path = ?, last_error = ?, updated_at = ?"
                " WHERE id = ? AND state = 'failed'", (str(archived), note, time.time(), job_id)).rowcount == 1

    def record_enhancement_failure(self, job_id: int, reason: str, detail: str) -> None:
        """Why a job's image was not enhanced (one row per job: its latest reason), for /metrics
        and `status`."""
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO enhancement_failures VALUES (?, ?, ?, ?)",
                         (job_id, reason, detail, time.time()))

    def enhancement_failures(self) -> dict[str, int]:
        """Images not enhanced, per reason label."""
        return dict(self._conn().execute("SELECT reason, COUNT(*) FROM enhancement_failures GROUP BY reason"))

    def not_enhanced(self, limit: int = 20) -> list[tuple[Job, str, str]]:
        """The latest images that were not enhanced: (job, reason, detail), newest first."""
        return [(Job.from_row(row), row["reason"], row["detail"]) for row in self._conn().execute(
            "SELECT jobs.*, f.reason, f.detail FROM enhancement_failures AS f JOIN jobs ON jobs.id = f.job_id"
            " ORDER BY f.failed_at DESC LIMIT ?", (limit,))]

    # --- reporting ---------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def oldest_pending(self) -> Job | None:
        row = self._conn().execute(
            "SELECT * FROM jobs WHERE state IN ('received', 'processing')"
            " ORDER BY received_at, id LIMIT 1").fetchone()
        return None if row is None else Job.from_row(row)

    def retrying(self, limit: int = 50) -> list[Job]:
        """Jobs waiting for another attempt (received, tried before), soonest first."""
        return [Job.from_row(row) for row in self._conn().execute(
            "SELECT * FROM jobs WHERE state = 'received' AND attempts > 0 ORDER BY next_attempt_at, id LIMIT ?",
            (limit,))]

    def received_by_class(self) -> dict[str, int]:
        """Instances received (acknowledged), per SOP Class UID."""
        return dict(self._conn().execute("SELECT sop_class_uid, COUNT(*) FROM jobs GROUP BY sop_class_uid"))

    def delivered_to(self, job_id: int) -> list[str]:
        """Where a job's items already are, as "destination (item)", sorted: for reports."""
        return sorted(f"{dest} ({item})" for dest, item in self.deliveries(job_id))

    def delivery_counts(self) -> dict[tuple[str, str, str], int]:
        """Items delivered, per (destination, item, the received instance's SOP Class UID)."""
        return {(dest, item, sop_class): n for dest, item, sop_class, n in self._conn().execute(
            "SELECT d.destination, d.item, j.sop_class_uid, COUNT(*) FROM deliveries AS d"
            " JOIN jobs AS j ON j.id = d.job_id GROUP BY d.destination, d.item, j.sop_class_uid")}

    def enhanced_by_class(self) -> dict[str, int]:
        """Jobs whose derived instance reached at least one destination, per SOP Class UID."""
        return dict(self._conn().execute(
            "SELECT sop_class_uid, COUNT(*) FROM jobs WHERE id IN"
            " (SELECT job_id FROM deliveries WHERE item = 'derived') GROUP BY sop_class_uid"))

    def failed_by_class(self) -> dict[str, int]:
        """Jobs held in failed/, per SOP Class UID."""
        return dict(self._conn().execute(
            "SELECT sop_class_uid, COUNT(*) FROM jobs WHERE state = 'failed' GROUP BY sop_class_uid"))

    def retry_count(self) -> int:
        """Attempts after the first, over every job (a waiting job's attempts were all retried)."""
        return self._conn().execute(
            "SELECT COALESCE(SUM(CASE WHEN state IN ('done', 'failed') THEN MAX(attempts - 1, 0)"
            " ELSE attempts END), 0) FROM jobs").fetchone()[0]

    def timing_histogram(self, stage: str) -> dict[str, tuple[list[int], int, float]]:
        """Seconds spent in `stage`, per destination ('' for enhance): (cumulative count at or
        below each of TIMING_BUCKETS, count, sum), as a Prometheus histogram wants them."""
        per_bucket: dict[str, list[int]] = {}
        for dest, bucket, count in self._conn().execute(
                "SELECT destination, bucket, count FROM timing_buckets WHERE stage = ?", (stage,)):
            per_bucket.setdefault(dest, [0] * (len(TIMING_BUCKETS) + 1))[bucket] += count
        histogram = {}
        for dest, count, seconds in self._conn().execute(
                "SELECT destination, count, seconds FROM timing_sums WHERE stage = ?", (stage,)):
            cumulative = list(itertools.accumulate(per_bucket.get(dest, [0] * (len(TIMING_BUCKETS) + 1))))
            histogram[dest] = (cumulative[:-1], count, seconds)
        return histogram

    def last_delivery_at(self, destination: str) -> float | None:
        return self._conn().execute("SELECT MAX(delivered_at) FROM deliveries WHERE destination = ?",
                                    (destination,)).fetchone()[0]

    def last_retry_error(self, destination: str) -> str | None:
        """The latest error of a job waiting to retry that names `destination`."""
        row = self._conn().execute(
            "SELECT last_error FROM jobs WHERE state = 'received' AND attempts > 0 AND last_error LIKE ?"
            " ORDER BY updated_at DESC LIMIT 1", (f"%{destination}%",)).fetchone()
        return None if row is None else row[0]

    def jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs first, in `state` or in any state (None)."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        return [Job.from_row(row) for row in self._conn().execute(
            f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*args, limit))]

    def delivered_uids(self, destination: str) -> list[str]:
        return [row[0] for row in self._conn().execute(
            "SELECT sop_instance_uid FROM deliveries WHERE destination = ?", (destination,))]
