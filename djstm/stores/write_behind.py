"""The background writer of a durable store: committed transactions to disk, as a prefix.

Each commit records, under the engine's commit lock, the latest encoded value
and version of every DVar it wrote in the store's *dirty set*, and counts
itself. The writer swaps the dirty set for an empty one under that same lock,
so what it takes is exactly the state after some commit: writing it in one
database transaction makes the disk jump from one commit boundary to a later
one, and after a crash the store shows a prefix of the committed
transactions. A DVar written a thousand times between flushes costs one row,
and memory holds one entry per dirty DVar, not one per commit.

Without anyone waiting, the writer lets commits gather for up to
``GATHER_SECONDS`` before flushing (fewer, larger database commits). A thread
that waits for durability (``sync``, ``durable=True``) flushes at once,
itself if no flush is under way (no hand-off to the writer thread), and every
waiter shares whichever database commit covers it: group commit. One flush
runs at a time, so flushes reach the disk in the order they were taken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import STMError
from ..stm.transaction import commit_lock

__all__ = ["WriteBehind", "Row"]

# (name, type_tag, encoded value, version)
Row = tuple[str, str, str, int]

#: Longest a committed transaction waits in memory before the writer starts flushing it, if nobody waits for it.
GATHER_SECONDS = 0.005


class WriteBehind:
    """The dirty set of one store and the thread that flushes it with ``write_rows``."""

    def __init__(
        self,
        owner: object,
        write_rows: Callable[[list[Row]], None],
        can_write_here: Callable[[], bool],
        on_exit: Callable[[], None],
        description: str,
    ) -> None:
        self._owner = owner  # the store whose variables this writer persists
        self._write_rows = write_rows
        self._can_write_here = can_write_here  # may the calling thread flush through its own connection?
        self._flushing = threading.Lock()  # one flush at a time, from taking the dirty set to the disk commit
        self._on_exit = on_exit
        self._description = description
        self._dirty: dict[Any, str] = {}  # DVar -> latest encoded value; guarded by commit_lock
        self._committed = 0  # commits recorded so far; guarded by commit_lock
        self._flushed = 0  # commits whose state is on disk
        self._flushed_changed = threading.Condition()
        self._failure: BaseException | None = None
        self._wake = threading.Event()  # something was committed while the writer was idle
        self._urgent = threading.Event()  # someone waits for the disk: flush now
        self._idle = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"djstm-writer {description}", daemon=True)
        self._thread.start()

    # -- called under the commit lock ------------------------------------------

    def accept_commit(self, writes: dict[Any, tuple[Any, str]]) -> int:
        """Record the owner's variables in a committed write set; return the commit's number.

        The engine calls this under the commit lock (see ``Transaction.commit``).
        """
        owner = self._owner
        dirty = self._dirty
        for dvar, state in writes.items():
            if dvar._store is owner:
                dvar.row_version += 1
                dirty[dvar] = state[1]
        self._committed += 1
        if self._idle:
            self._wake.set()
        return self._committed

    def accept_creation(self, dvar: Any, text: str) -> None:
        """Record a new variable's first row; the caller holds the commit lock."""
        self._dirty[dvar] = text
        self._committed += 1
        if self._idle:
            self._wake.set()

    # -- durability -----------------------------------------------------------

    def wait_flushed(self, commit: int | None = None) -> None:
        """Block until commit number ``commit`` (default: every commit so far) is on disk."""
        if commit is None:
            commit = self._committed
        while self._flushed < commit:
            if self._can_write_here() and self._flushing.acquire(blocking=False):
                try:
                    if self._flushed < commit:
                        self._flush_once()
                except Exception as error:
                    self._urgent.set()  # the writer thread takes over and keeps retrying
                    raise self._failed(error) from error
                finally:
                    self._flushing.release()
                continue
            self._urgent.set()
            self._wake.set()
            with self._flushed_changed:
                if self._flushed >= commit:
                    return
                if self._failure is not None:
                    raise self._failed(self._failure) from self._failure
                if not self._thread.is_alive():
                    raise STMError(f"{self._description}: its writer has stopped; reopen the store")
                self._flushed_changed.wait(0.05)

    def _failed(self, error: BaseException) -> STMError:
        return STMError(
            f"{self._description} could not write to its database ({error!r}); the commit stands in memory "
            "and the writer keeps retrying. Fix the database (space, permissions), or close the store to "
            "try a last time."
        )

    def stop(self) -> None:
        """Flush everything committed, then end the writer thread."""
        self._stopping = True
        self._urgent.set()
        self._wake.set()
        self._thread.join()

    # -- the writer thread ----------------------------------------------------

    def _flush_once(self) -> None:
        """Write the dirty set as of the latest commit boundary; the caller holds ``_flushing``."""
        with commit_lock:  # a commit boundary: no commit is half-recorded, and versions match the values
            dirty, self._dirty = self._dirty, {}
            rows = [(dvar.key, dvar.type_tag, text, dvar.row_version) for dvar, text in dirty.items()]
            committed = self._committed
        try:
            if rows:
                self._write_rows(rows)
        except BaseException:
            with commit_lock:  # put back what did not reach the disk, under anything newer
                dirty.update(self._dirty)
                self._dirty = dirty
            raise
        with self._flushed_changed:
            self._failure = None
            self._flushed = committed
            self._flushed_changed.notify_all()

    def _flush_until_done(self) -> None:
        backoff = 0.05
        while True:
            try:
                with self._flushing:
                    self._flush_once()
                return
            except Exception as error:  # the rows stay dirty; dropping them would break the prefix promise
                with self._flushed_changed:
                    self._failure = error
                    self._flushed_changed.notify_all()
                if self._stopping and backoff > 1:
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _run(self) -> None:
        try:
            while True:
                if self._committed > self._flushed:
                    if self._urgent.wait(GATHER_SECONDS):
                        self._urgent.clear()
                    self._flush_until_done()
                    continue
                if self._stopping:
                    return
                self._idle = True
                if self._committed > self._flushed or self._stopping:
                    self._idle = False
                    continue
                self._wake.wait()
                self._wake.clear()
                self._idle = False
        finally:
            self._on_exit()
