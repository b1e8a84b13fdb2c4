"""The audit log: one JSON line per instance received, derived and delivered ([logging] audit).

Each line holds the time, the action, the calling AE and its address (the association), the SOP
Instance UID, the destination where there is one, and the outcome. The node process owns the
file (a size-rotated `RotatingFileHandler`); the worker process sends its lines to it through a
multiprocessing queue (`QueueHandler` -> `QueueListener`), so one process alone writes and
rotates the file. Without [logging] audit nothing is written. The admin commands that change a
job while the node runs (`discard`, `forward`) add their line with `append`: one O_APPEND write.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from pathlib import Path

_AUDIT = logging.getLogger("dicom_node.audit")
_AUDIT.propagate = False  # never mixed into the operational log
_AUDIT.setLevel(logging.INFO)
_AUDIT.addHandler(logging.NullHandler())


def record(action: str, **fields) -> None:
    """One audit line (dropped when no audit file is configured)."""
    if _AUDIT.handlers and not isinstance(_AUDIT.handlers[0], logging.NullHandler):
        _AUDIT.info(_line(action, fields))


def _line(action: str, fields: dict) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    return json.dumps({"time": stamp, "action": action, **fields}, sort_keys=False)


def append(audit_file: Path | None, action: str, /, **fields) -> None:
    """One audit line from another process than the node's (an admin command): a single append,
    which the node's writer and its rotation never tear (None: no audit file configured)."""
    if audit_file is None:
        return
    audit_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(audit_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (_line(action, fields) + "\n").encode())
    finally:
        os.close(fd)


class AuditWriter:
    """In the node process: the rotated file, and a listener for the worker's lines."""

    def __init__(self, path: Path, max_bytes: int, backups: int, queue):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                            encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        _AUDIT.handlers[:] = [self.handler]
        self.listener = logging.handlers.QueueListener(queue, self.handler)
        self.listener.start()

    def close(self) -> None:
        self.listener.stop()  # writes what the worker queued before it stopped
        self.handler.close()
        _AUDIT.handlers[:] = [logging.NullHandler()]


def send_to(queue) -> None:
    """In the worker process: audit lines go to the node's writer."""
    if queue is not None:
        queue.cancel_join_thread()  # a worker must be able to exit even if the node stopped reading
        _AUDIT.handlers[:] = [logging.handlers.QueueHandler(queue)]
