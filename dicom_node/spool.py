"""The durable spool: received files, derived files, failed/ and the queue database.

Every file lands by the same four steps: write a temporary file in the target folder,
fsync it, rename it over the final name (atomic on POSIX), fsync the folder so the
rename itself survives a power cut. A reader therefore sees either nothing or the
whole file, never a torn one.

Layout under [spool] dir::

    incoming/<SOP Instance UID>.<token>.dcm   as received, before and during processing
    derived/<job id>.dcm                      enhanced instance waiting to be forwarded
    derived/<job id>.maps.dcm                 its Parametric Map ([model] parametric_map)
    failed/<job id>-<SOP Instance UID>.dcm    held with <same name>.reason.txt beside it
    discarded/<job id>-<SOP Instance UID>.dcm a held file an admin discarded (dicom-node discard), reason beside it
    quarantine/<time>/                        what could not be read at start, with reason.txt
    queue.sqlite3                             the job queue (see jobs.py)
    node.lock                                 held (flock) by the one node serving this spool
    worker.lock, worker-<i>.lock              held (flock) by worker process slot 0, i ([worker] processes)
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dicom_node.errors import NodeError

_TMP_PREFIX = ".partial-"

#: The most bytes one write() call hands the kernel. On ext4 with large folios (Linux 6.18 on the
#: CI VM) a single write() of 2 MiB or more into a new file took 4.7-5.2 ms per 2 MiB, 1 MiB
#: pieces 0.4 ms (DCMTK writes in small pieces too); a received CR image is 2-10 MB.
WRITE_PIECE = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PieceWriter:
    """A binary file whose `write` hands the kernel at most WRITE_PIECE bytes a call; every
    other attribute (seek, tell, flush, fileno ...) is the wrapped file's."""

    def __init__(self, file: BinaryIO):
        self._file = file

    def write(self, data) -> int:
        with memoryview(data) as view, view.cast("B") as octets:
            for start in range(0, len(octets), WRITE_PIECE):
                self._file.write(octets[start:start + WRITE_PIECE])
            return len(octets)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _write(file: BinaryIO, content: bytes | Callable[[BinaryIO], None]) -> None:
    """`content` (bytes, or a function writing to a binary file) into `file`, in pieces."""
    pieces = PieceWriter(file)
    content(pieces) if callable(content) else pieces.write(content)


def write_file(target: str | Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, or a function writing to a binary file) to `target` in pieces of
    at most WRITE_PIECE bytes; in place, not atomic (that is write_atomic)."""
    with open(target, "wb") as f:
        _write(f, content)


def _partial(folder: Path, name: str) -> Path:
    """A temporary name in `folder` (removed at start if a crash leaves it: Spool.remove_partials)."""
    return folder / f"{_TMP_PREFIX}{secrets.token_hex(6)}-{name}"


class AtomicFile:
    """A file on its way to its final name in `folder`: a temporary file there until `keep`
    makes it durable under that name (flush, fsync, rename; the folder's fsync is the caller's);
    `discard` removes it. The rename never crosses a file system."""

    def __init__(self, folder: Path, name: str = ""):
        self._tmp = _partial(folder, name)
        self._raw = open(self._tmp, "xb")
        self.file = PieceWriter(self._raw)

    def keep(self, target: Path) -> Path:
        try:
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self._tmp, target)
        except BaseException:
            self.discard()
            raise
        return target

    def discard(self) -> None:
        """Close and remove the temporary file (nothing once kept)."""
        try:
            self._raw.close()
        except OSError:  # its flush, on a full disk: the bytes are thrown away anyway
            pass
        finally:
            self._tmp.unlink(missing_ok=True)


def write_atomic(target: Path, content: bytes | Callable[[BinaryIO], None],
                 sync_dir: bool = True) -> Path:
    """Write `content` (bytes, or a function writing to a binary file) to `target` durably
    (AtomicFile). On any error the temporary file is removed and the error propagates. With
    `sync_dir=False` the caller must fsync the folder itself before relying on the file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic = AtomicFile(target.parent, target.name)
    try:
        _write(atomic.file, content)
    except BaseException:
        atomic.discard()
        raise
    atomic.keep(target)
    if sync_dir:
        fsync_dir(target.parent)
    return target


def place_copy(source: Path, target: Path, link: bool = True) -> Path:
    """`target` gets `source`'s content atomically (a reader sees nothing or the whole file); the
    caller fsyncs the target's folder. With `link`, as a hard link where one can be made (both on
    one file system): no copy, and the content is durable already. Only for files never written
    again once they landed (the spool's received and derived files: a job only unlinks them), so
    the two names stay the same bytes; the link keeps the spool file's owner and mode. Otherwise,
    or where no link can be made (another file system, one without hard links), a copy made with
    write_atomic(sync_dir=False)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(target.parent, target.name)
    if link:
        try:
            os.link(source, tmp)
        except OSError:  # EXDEV, EPERM, ENOTSUP, EMLINK ...: copy instead (a full disk fails there too)
            link = False
    if not link:
        with open(source, "rb") as src:
            return write_atomic(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 20), sync_dir=False)
    try:
        os.replace(tmp, target)  # over an older copy of the same instance
    finally:
        # also after a success: a rename onto a link to the same file does nothing (POSIX),
        # which leaves tmp (a delivery of the same spool file again)
        tmp.unlink(missing_ok=True)
    return target


def safe_name(value: object, fallback: str = "UNKNOWN") -> str:
    """A value (Patient ID, UID) as one safe path component."""
    text = _UNSAFE.sub("_", str(value or "").strip()).strip("._")
    return text[:64] or fallback


class Spool:
    """The folders of one node's spool; creates them on first use."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.derived = self.root / "derived"
        self.failed = self.root / "failed"
        self.discarded = self.root / "discarded"
        self.db_path = self.root / "queue.sqlite3"
        self._locks: dict[str, object] = {}  # lock file name -> its open file (the flock lives with it)

    def create(self) -> Spool:
        for folder in (self.incoming, self.derived, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def _flock(self, name: str, wait: bool) -> bool:
        """An exclusive flock on root/name, held while this process keeps the file open (the
        kernel releases it when the process dies, so a kill -9 leaves no stale lock); the file
        says which pid holds it. False when not waiting and another process holds it."""
        f = open(self.root / name, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._locks[name] = f
        return True

    def lock(self) -> Spool:
        """Take the spool for this node process (node.lock). Two nodes on one spool would adopt,
        send and delete each other's files."""
        if not self._flock("node.lock", wait=False):
            holder = (self.root / "node.lock").read_text().strip() or "another process"
            raise NodeError(f"spool {self.root} is in use by another dicom-node ({holder}); "
                            "one node per [spool] dir")
        return self

    def store_received(self, data: bytes | Callable[[BinaryIO], None], sop_instance_uid: str,
                       sync_dir: bool = True) -> Path:
        """Write one received instance (tmp, fsync, rename); a unique name per receipt.

        The SCP passes sync_dir=False and calls `sync_incoming` after committing the job:
        the same guarantees before it answers, one journal commit fewer on ext4.
        """
        return write_atomic(self.received_path(sop_instance_uid), data, sync_dir=sync_dir)

    def received_path(self, sop_instance_uid: str) -> Path:
        """Where a received instance is kept: a new name for every receipt."""
        return self.incoming / f"{safe_name(sop_instance_uid)}.{secrets.token_hex(4)}.dcm"

    def open_received(self) -> AtomicFile:
        """A temporary file in incoming/ for an instance whose bytes are still arriving; kept at
        `received_path`."""
        return AtomicFile(self.incoming, "received.dcm")

    def sync_incoming(self) -> None:
        fsync_dir(self.incoming)

    def derived_path(self, job_id: int) -> Path:
        return self.derived / f"{job_id}.dcm"

    def maps_path(self, job_id: int) -> Path:
        """The job's Parametric Map, beside its derived instance."""
        return self.derived / f"{job_id}.maps.dcm"

    def hold_failed(self, job_id: int, source: Path, sop_instance_uid: str, reason: str) -> Path:
        """Move `source` into failed/ with a reason file beside it; returns the held path."""
        self.failed.mkdir(parents=True, exist_ok=True)
        held = self.failed / f"{job_id}-{safe_name(sop_instance_uid)}.dcm"
        reason_path = held.with_name(held.name + ".reason.txt")
        text = reason.rstrip() + "\n"
        if reason_path.exists():  # held before, but the queue did not record it (e.g. a disk error): keep both
            previous = reason_path.read_text(errors="replace")
            text = previous if text in previous else f"{previous}\n{text}"
        write_atomic(reason_path, text.encode())
        if source.exists():
            os.replace(source, held)
            fsync_dir(self.failed)
            fsync_dir(source.parent)
        return held

    def discard_held(self, held: Path, note: str) -> Path:
        """Move a held file and its reason file from failed/ into discarded/, `note` added to the
        reason: nothing acknowledged is ever deleted silently. Returns the new path."""
        self.discarded.mkdir(parents=True, exist_ok=True)
        kept = self.discarded / held.name
        reason_path = held.with_name(held.name + ".reason.txt")
        previous = reason_path.read_text(errors="replace") if reason_path.exists() else ""
        write_atomic(kept.with_name(kept.name + ".reason.txt"), f"{previous.rstrip()}\n{note.rstrip()}\n".lstrip().encode())
        if held.exists():
            os.replace(held, kept)
        fsync_dir(self.discarded)
        if reason_path.exists():
            reason_path.unlink()
        fsync_dir(held.parent)
        return kept

    @staticmethod
    def worker_lock_name(slot: int) -> str:
        """Worker slot 0's lock is worker.lock (as with one worker), slot i's worker-<i>.lock."""
        return "worker.lock" if slot == 0 else f"worker-{slot}.lock"

    def lock_worker(self, on_wait=lambda: None, slot: int = 0) -> Spool:
        """Worker slot `slot`'s own exclusive lock, waited for: after a kill -9 of the node its
        old worker in that slot may still finish a batch; the new one must not resume that
        slot's jobs meanwhile. Held until the process ends. (Two nodes on one spool are kept
        apart by node.lock.)"""
        name = self.worker_lock_name(slot)
        if not self._flock(name, wait=False):
            on_wait()
            self._flock(name, wait=True)
        return self

    def unlock_worker(self, slot: int) -> None:
        """Let go of a slot's lock taken with lock_worker (e.g. a slot no longer configured,
        whose jobs were put back)."""
        f = self._locks.pop(self.worker_lock_name(slot), None)
        if f is not None:
            f.close()

    def quarantine(self, paths: list[Path], reason: str) -> Path:
        """Move `paths` (those that exist) into a new quarantine/<time>/ folder with a
        reason.txt; nothing is deleted. Returns the folder."""
        folder = self.root / "quarantine" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder = folder.with_name(f"{folder.name}-{secrets.token_hex(3)}")
        folder.mkdir(parents=True)
        write_atomic(folder / "reason.txt", (reason.rstrip() + "\n").encode())
        for path in paths:
            if path.exists():
                os.replace(path, folder / path.name)
                fsync_dir(path.parent)
        fsync_dir(folder)
        return folder

    def remove(self, *paths: Path, sync: bool = True) -> None:
        """Delete spool files whose work is complete (missing ones are fine).

        sync=False when the queue already says the work is done: a file that comes back
        after a crash is recognised as done at the next start and deleted then.
        """
        folders = set()
        for path in paths:
            try:
                path.unlink()
                folders.add(path.parent)
            except FileNotFoundError:
                pass
        for folder in folders if sync else ():
            fsync_dir(folder)

    def remove_partials(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        count = 0
        for folder in (self.incoming, self.derived, self.failed):
            for tmp in folder.glob(f"{_TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
                count += 1
        return count

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.incoming.glob("*.dcm") if not p.name.startswith(_TMP_PREFIX))
