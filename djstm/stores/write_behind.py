"""The background writer of a durable store: committed transactions to disk, in commit order.

Commits append their rows to a queue (under the commit lock, so queue order
is commit order) and return at once. One thread drains the queue and writes
everything it found in one database transaction, keeping only the last value
of a row that was written several times; so each database commit holds a
contiguous run of committed transactions, and after a crash the store shows
a prefix of them. Waiters for durability (``sync``, ``durable=True``) share
whichever database commit covers them: group commit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ..errors import STMError

__all__ = ["WriteBehind", "Row"]

# (name, type_tag, encoded value, version)
Row = tuple[str, str, str, int]


class WriteBehind:
    """A queue of committed rows and the thread that flushes it with ``write_rows``."""

    def __init__(self, write_rows: Callable[[Iterable[Row]], None], on_exit: Callable[[], None], description: str) -> None:
        self._write_rows = write_rows
        self._on_exit = on_exit
        self._description = description
        self._queue: deque[list[Row]] = deque()
        self._queue_lock = threading.Lock()
        self._enqueued = 0  # sequence number of the last batch queued
        self._flushed = 0  # sequence number of the last batch on disk
        self._flushed_changed = threading.Condition()
        self._failure: BaseException | None = None
        self._wake = threading.Event()
        self._idle = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"djstm-writer {description}", daemon=True)
        self._thread.start()

    def enqueue(self, rows: list[Row]) -> int:
        """Queue ``rows`` after everything queued so far; return the number to wait for."""
        with self._queue_lock:
            self._queue.append(rows)
            self._enqueued += 1
            sequence = self._enqueued
        if self._idle:
            self._wake.set()
        return sequence

    def wait_flushed(self, sequence: int | None = None) -> None:
        """Block until batch ``sequence`` (default: all queued so far) is on disk."""
        if sequence is None:
            sequence = self._enqueued
        self._wake.set()
        with self._flushed_changed:
            while self._flushed < sequence:
                if self._failure is not None:
                    raise STMError(
                        f"{self._description} could not write to its database ({self._failure!r}); "
                        "the writer keeps retrying. Fix the database (space, permissions) or "
                        "close the store to try a last time."
                    ) from self._failure
                if not self._thread.is_alive():
                    raise STMError(f"{self._description}: its writer has stopped; reopen the store")
                self._flushed_changed.wait(0.5)

    def stop(self) -> None:
        """Flush everything queued, then end the writer thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _take_queued(self) -> list[list[Row]]:
        with self._queue_lock:
            batches = list(self._queue)
            self._queue.clear()
        return batches

    def _flush(self, batches: list[list[Row]]) -> None:
        latest: dict[str, Row] = {}
        for rows in batches:
            for row in rows:
                latest[row[0]] = row
        backoff = 0.05
        while True:
            try:
                self._write_rows(latest.values())
            except Exception as error:  # keep the rows and try again: dropping them would break the prefix promise
                with self._flushed_changed:
                    self._failure = error
                    self._flushed_changed.notify_all()
                if self._stopping and backoff > 1:
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with self._flushed_changed:
                self._failure = None
                self._flushed += len(batches)
                self._flushed_changed.notify_all()
            return

    def _run(self) -> None:
        try:
            while True:
                batches = self._take_queued()
                if batches:
                    self._flush(batches)
                    continue
                if self._stopping:
                    return
                self._idle = True
                if self._queue or self._stopping:
                    self._idle = False
                    continue
                self._wake.wait()
                self._wake.clear()
                self._idle = False
        finally:
            self._on_exit()
