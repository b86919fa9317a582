"""The background writer of a durable store: committed transactions to disk, as a prefix.

Each commit records, under the engine's commit lock, the latest encoded value
and version of every DVar it wrote in the store's *dirty set*, and counts
itself. The writer swaps the dirty set for an empty one under that same lock,
so what it takes is exactly the state after some commit: writing it in one
database transaction makes the disk jump from one commit boundary to a later
one, and after a crash the store shows a prefix of the committed
transactions. A DVar written a thousand times between flushes costs one row,
and memory holds one entry per dirty DVar, not one per commit.

Without anyone waiting, the writer flushes commits that have waited one
``GATHER_SECONDS`` interval (fewer, larger database commits), and sleeps
while nothing is committed. A thread
that waits for durability (``sync``, ``durable=True``) flushes at once,
itself if no flush is under way (no hand-off to the writer thread), and every
waiter shares whichever database commit covers it: group commit. One flush
runs at a time, so flushes reach the disk in the order they were taken.
A thread inside its own ``transaction.atomic()`` on the store's database
cannot flush (it would only write a savepoint) and leaves it to the writer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import STMError
from ..stm.transaction import commit_lock

__all__ = ["WriteBehind", "Row"]

# (name, type_tag, encoded value, version)
Row = tuple[str, str, str, int]

#: The writer's polling interval: an unwaited commit reaches the disk within about two of these.
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
        self._flush_in_progress = False  # one flush at a time, from taking the dirty set to the disk commit
        self._on_exit = on_exit
        self._description = description
        self._dirty: dict[Any, str] = {}  # DVar -> latest encoded value; guarded by commit_lock
        self._committed = 0  # commits recorded so far; guarded by commit_lock
        # Guards _flushed, _failure and _flush_in_progress; notified at the end of every flush.
        self._flushed_changed = threading.Condition()
        self._flushed = 0  # commits whose state is on disk
        self._failure: BaseException | None = None
        self._wake = threading.Event()  # something was committed while the writer slept
        self._urgent = threading.Event()  # someone waits for the disk: flush now
        self._idle = False  # the writer sleeps until the next commit
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"djstm-writer {description}", daemon=True)
        self._thread.start()

    # -- called under the commit lock ------------------------------------------

    def accept_commit(self, writes: dict[Any, tuple[Any, str]]) -> int | None:
        """Record the owner's variables in a committed write set; return the commit's number (None if none).

        The engine calls this under the commit lock (see ``Transaction.commit``).
        """
        owner = self._owner
        dirty = self._dirty
        wrote = False
        for dvar, state in writes.items():
            if dvar._store is owner:
                dvar.row_version += 1
                dirty[dvar] = state[1]
                wrote = True
        if not wrote:  # its writes were all rolled back (or_else, a caught nested exception)
            return None
        return self._count_commit()

    def accept_creation(self, dvar: Any, text: str) -> None:
        """Record a new variable's first row; the caller holds the commit lock."""
        self._dirty[dvar] = text
        self._count_commit()

    def _count_commit(self) -> int:
        self._committed += 1
        if self._idle:  # the writer sleeps until a commit arrives: this is one
            self._wake.set()
        return self._committed

    # -- durability -----------------------------------------------------------

    def wait_flushed(self, commit: int | None = None) -> None:
        """Block until commit number ``commit`` (default: every commit so far) is on disk."""
        if commit is None:
            commit = self._committed
        if self._flushed >= commit:
            return
        if self._stopping:  # a closed store never writes again: its lock is gone
            raise STMError(
                f"{self._description} is closed and {self._committed - self._flushed} commit(s) never reached "
                "its database; they are lost. Reopen the store to go on."
            ) from self._failure
        may_flush = self._can_write_here()
        if not may_flush:
            self._urgent.set()  # inside the caller's database transaction: only the writer thread can flush
        with self._flushed_changed:
            while self._flushed < commit:
                if may_flush and not self._flush_in_progress:
                    try:
                        self._flush_holding_condition()
                    except Exception as error:
                        self._urgent.set()  # the writer thread takes over and keeps retrying
                        raise self._failed(error) from error
                    continue
                if self._failure is not None and not may_flush:  # (one that may flush tries again itself)
                    raise self._failed(self._failure) from self._failure
                if not self._thread.is_alive():
                    raise STMError(f"{self._description}: its writer has stopped; reopen the store")
                # A flush is under way; it may cover our commit. Every waiter wakes when it ends.
                self._flushed_changed.wait(0.5)

    def _failed(self, error: BaseException) -> STMError:
        return STMError(
            f"{self._description} could not write to its database ({error!r}); the commit stands in memory "
            "and the writer keeps retrying. Fix the database (space, permissions, triggers), or close the "
            "store to try a last time."
        )

    def stop(self) -> None:
        """Flush everything committed, then end the writer thread.

        Raises ``STMError`` naming the store if the last flush failed: those
        commits never reached the disk.
        """
        self._stopping = True
        self._urgent.set()
        self._wake.set()
        self._thread.join()
        with commit_lock:
            self._dirty = {}  # what could not be written stays unwritten: the store's lock is released next
        if self._flushed < self._committed:
            raise STMError(
                f"{self._description} was closed with {self._committed - self._flushed} commit(s) it could not "
                f"write to its database ({self._failure!r}); they are lost. Fix the database before using it again."
            ) from self._failure

    # -- the writer thread ----------------------------------------------------

    def _flush_holding_condition(self) -> None:
        """Flush the dirty set as of the latest commit boundary.

        Called with ``_flushed_changed`` held and ``_flush_in_progress`` false;
        the condition is released while writing, so that waiters covered by an
        earlier flush can leave and new commits can queue behind this one.
        """
        self._flush_in_progress = True
        self._flushed_changed.release()
        try:
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
        except BaseException as error:
            self._flushed_changed.acquire()
            self._failure = error
            raise
        else:
            self._flushed_changed.acquire()
            self._failure = None
            self._flushed = committed
        finally:
            self._flush_in_progress = False
            self._flushed_changed.notify_all()

    def _flush_until_done(self) -> None:
        """The writer thread's flush: retried with backoff until it succeeds (or the store stops meanwhile)."""
        backoff = 0.05
        with self._flushed_changed:
            target = self._committed
            while self._flushed < target:
                if self._flush_in_progress:
                    self._flushed_changed.wait(0.5)
                    continue
                try:
                    self._flush_holding_condition()
                except Exception:  # the rows stay dirty; dropping them would break the prefix promise
                    if self._stopping and backoff > 1:
                        return  # give up: stop() tells the caller what was lost
                    self._flushed_changed.wait(backoff)
                    backoff = min(backoff * 2, 2.0)

    def _run(self) -> None:
        try:
            seen = 0  # commits recorded at the previous look
            while True:
                if self._urgent.wait(GATHER_SECONDS):  # a waiter that cannot flush itself, or stop()
                    self._urgent.clear()
                    if self._committed > self._flushed:
                        self._flush_until_done()
                    if self._stopping:  # flushed, or given up (stop() reports what was lost)
                        return
                elif self._flushed < seen:
                    # Commits that waited a whole interval and nobody flushed: write them behind now.
                    self._flush_until_done()
                elif self._committed == seen:
                    self._sleep_until_a_commit(seen)
                seen = self._committed
        finally:
            self._on_exit()

    def _sleep_until_a_commit(self, seen: int) -> None:
        self._idle = True
        if self._committed == seen and not self._stopping:  # a commit sees _idle and wakes us
            self._wake.wait()
        self._wake.clear()
        self._idle = False
