"""Dynamic batching: same-size images that threads send to the network at about the same time
go through it in one call (what a GPU gains from: one launch for several images).

The first caller of a size waits up to `max_wait` seconds for others; the caller that fills a
batch to `max_size` runs it at once, otherwise the first one runs what has gathered when its
wait ends. Every caller gets its own image's result, or the batch's exception.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any


class _Request:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item):
        self.item, self.done, self.result, self.error = item, threading.Event(), None, None


class DynamicBatcher:
    """`batcher(item, key)`: `run([item, ...])[i]` for this item, run together with the items of
    other threads that have the same `key` (e.g. the image's shape)."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], max_size: int, max_wait: float):
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        self.run, self.max_size, self.max_wait = run, max_size, max_wait
        self._lock = threading.Lock()
        self._gathering: dict[Hashable, list[_Request]] = {}

    def __call__(self, item, key: Hashable):
        request = _Request(item)
        with self._lock:
            group = self._gathering.setdefault(key, [])
            group.append(request)
            first = len(group) == 1
            if len(group) >= self.max_size:
                del self._gathering[key]
            else:
                group = None  # still gathering
        if group is not None:  # this caller filled the batch
            self._run(group)
        elif first and not request.done.wait(self.max_wait):
            with self._lock:  # the wait ended: run what gathered, unless a full batch took it
                group = self._gathering.pop(key) if self._gathering.get(key, [None])[0] is request else None
            if group is not None:
                self._run(group)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _run(self, group: list[_Request]) -> None:
        try:
            results = self.run([r.item for r in group])
            if len(results) != len(group):
                raise RuntimeError(f"a batch of {len(group)} gave {len(results)} results")
        except BaseException as exc:  # every caller of the batch sees it
            for r in group:
                r.error = exc
                r.done.set()
            return
        for r, result in zip(group, results):
            r.result = result
            r.done.set()
