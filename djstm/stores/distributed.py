"""The distributed store: DVars kept in PostgreSQL, shared by any number of processes.

Each process caches the DVars it uses. A cached state is
``(value, text, row version, epoch)``: the epoch numbers the database query
that last saw that row version, and rows seen by one query come from one
snapshot. A transaction reads only cached states of one epoch; meeting
another epoch (or a state marked stale by a notification) it re-reads
everything it has read in one query, so user code never sees a mix of two
snapshots (opacity), and commits are checked against the database, so a
stale cache can delay a transaction but never let it commit on old values.

Committing, per transaction (``lock=`` or the store's default):

* optimistic: one statement locks every row read or written in name order,
  checks the versions read and writes the new values (``backends.postgres``);
  a read-only transaction checks its versions in one query.
* pessimistic: each row is locked (``FOR UPDATE``) when the transaction first
  touches it, in name order; needing a lower name than one already held
  releases everything and re-runs with all known rows locked up front.
* auto: optimistic, then pessimistic once an atomically call has conflicted
  ``AUTO_PESSIMISTIC_AFTER`` times, so a hot row cannot starve it; and
  pessimistic from the start when the first row it touches recently made
  an optimistic commit fail (``CONTENDED_SECONDS``).

Inside the caller's ``transaction.atomic()`` on the same database, a
transaction reads rows directly (uncommitted writes of the surrounding
transaction included), never through the cache, and its commit becomes part
of the surrounding transaction: the cache, wake-ups and ``after_commit``
follow only once that commits.

After a commit the store publishes the changed names and versions on the
Channels layer; every other process marks those cache entries stale and wakes
transactions blocked on them. A poller re-checks, every ``poll_interval``
seconds, the rows that blocked transactions wait on, so a lost notification
delays a wake-up but never loses it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from django.db import connections

from ..backends import postgres
from ..codecs import Codec
from ..errors import DVarDecodeError, NoTransaction, STMError, StoreUnavailable
from ..names import Name
from ..signals import dvar_changed
from ..stm._context import current, in_event_loop
from ..stm.transaction import commit_lock, refresh
from ._session import (
    AUTO_PESSIMISTIC_AFTER,
    CONTENDED_SECONDS,
    NOT_READ,
    STALE,
    Session,
)
from .base import MISSING, StoreBase, refuse_in_event_loop
from .dvar import DVar

__all__ = ["AUTO_PESSIMISTIC_AFTER", "DistributedStore", "RemoteDVar"]

logger = logging.getLogger("djstm.distributed")

_REMEMBERED_EPOCHS = 64

# Each process marks its own notifications, so it can skip them (its cache already has the change).
_PROCESS_TOKEN = uuid.uuid4().hex
# Incremented in a child process after fork: stores opened before the fork start their threads anew.
_fork_generation = [0]


def _after_fork_in_child() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = uuid.uuid4().hex  # else the forked workers would ignore each other's notifications
    _fork_generation[0] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class RemoteDVar(DVar[Any]):
    """A DVar of a distributed store.

    ``peek()`` returns the latest committed value this process knows of: what it last read or
    committed, re-read from the database when a notification said another process changed it.
    """

    __slots__ = ()

    def __init__(self, store: DistributedStore, name: Name, key: str, codec: Codec, row: Any, epoch: int) -> None:
        value, text, version = row
        super().__init__(store, name, key, codec, value, text, version)
        self._state = (0, (value, text, version, epoch))

    def read(self) -> Any:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("read"))
        value = self._store.session(tx).read(self)[0]
        return self.codec.copy(value) if self._mutable else value

    def write(self, value: Any) -> None:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("write"))
        value, text = self._encode(value)
        self._store.session(tx).before_write(self)
        tx.write(self, (value, text, NOT_READ, STALE))


    def peek(self) -> Any:
        state = self._state[1]
        if state[3] == STALE and not in_event_loop() and not self._store.closed:
            self._store._fetch_latest(self)  # another process committed a newer version
            state = self._state[1]
        value = state[0]
        return self.codec.copy(value) if self._mutable else value


class DistributedStore(StoreBase):
    """A named set of DVars in a PostgreSQL database, open in any number of processes at once."""

    mode = "distributed"

    def __init__(
        self,
        *,
        alias: str,
        name: str,
        where: str,
        database: str,
        lock: str,
        poll_interval: float,
        lock_timeout: float,
        database_retries: int,
        feed: Callable[[], Any],
        group: str,
        release: Callable[[DistributedStore], None],
        on_close: Callable[[DistributedStore], None],
        closing: threading.RLock,
    ) -> None:
        super().__init__(name, where, release)
        self.alias = alias
        self.database = database  # identity of the database, for notification groups
        self.lock = lock
        self.poll_interval = poll_interval
        self.lock_timeout = lock_timeout
        self.database_retries = database_retries
        self._on_close = on_close
        self._closing = closing
        self._epochs = itertools.count(1)
        # The DVars each recent query fetched together, by epoch (the most recent _REMEMBERED_EPOCHS).
        self._fetched: dict[int, list[RemoteDVar]] = {}
        # Rows an optimistic commit recently found changed under it, until when they count as contended.
        self._contended: dict[str, float] = {}
        self._feed_of_this_process = feed  # the change feed, for the process calling it
        self._group = group
        self._attach()

    def _attach(self) -> None:
        """Subscribe to notifications and start polling, in this process (again, after a fork)."""
        self._generation = _fork_generation[0]
        self._feed = self._feed_of_this_process()
        if self._feed is not None:
            self._feed.subscribe(self._group, self._on_notification)
        self._stop_polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, name=f"djstm-poll-{self.name}", daemon=True)
        self._poller.start()

    # -- DVars ---------------------------------------------------------------------

    def _load_or_create(self, name: Name, key: str, default: Any, type: Any) -> DVar[Any]:
        refuse_in_event_loop(f"store.dvar({name!r}) (a DVar not loaded yet)")
        try:
            return self._fetch_or_create(name, key, default, type)
        except postgres.TransientDatabaseError as error:
            raise StoreUnavailable(
                f"store {self.name!r} in {self.where}: opening DVar {name!r} failed with {error.reason}; "
                "check the database, then try again"
            ) from error

    def _fetch_or_create(self, name: Name, key: str, default: Any, type: Any) -> RemoteDVar:
        if default is MISSING:
            (row,) = postgres.fetch_rows(self.alias, self.name, [key], [NOT_READ])
            if row.version is None:
                raise self._not_found(name)
            codec = self._codec_of_row(name, type, default, row.type_tag)
        else:
            codec = self._codec_for(name, type, default)  # refuses a default that does not fit
            row = postgres.create_row(self.alias, self.name, key, codec.tag, codec.dumps(default))
            if row.type_tag != codec.tag:
                raise self._type_mismatch(name, row.type_tag, codec.tag)
        value = self._decode(name, codec, row.value)
        with commit_lock:
            epoch = self._next_epoch()
        return RemoteDVar(self, name, key, codec, (value, row.value, row.version), epoch)

    def session(self, tx: Any) -> Session:
        """The session of transaction ``tx`` with this store (created on first use)."""
        session = tx.remote
        if session is None:
            if self._generation != _fork_generation[0]:
                with self._opening:
                    if self._generation != _fork_generation[0]:
                        self._attach()  # opened before this process was forked: its threads stayed in the parent
            self._check_open()
            refuse_in_event_loop(f"a transaction on distributed store {self.name!r}")
            session = tx.remote = Session(self, tx)
            return session
        if session.store is not self:
            raise STMError(
                f"a transaction may use one distributed store, and this one already uses store "
                f"{session.store.name!r} in {session.store.where}; split it into one transaction per store"
            )
        return session

    def _fetch_latest(self, dvar: RemoteDVar) -> None:
        """Bring ``dvar``'s cached state up to date (outside any transaction); on failure keep what is cached."""
        try:
            rows = postgres.fetch_rows(self.alias, self.name, [dvar.key], [dvar._state[1][2]])
        except postgres.TransientDatabaseError as error:
            logger.warning("store %r: re-reading DVar %r failed: %s", self.name, dvar.name, error)
            return
        self._install_rows(rows, [dvar])

    def _deleted(self, dvar: RemoteDVar) -> StoreUnavailable:
        with self._opening:
            if self._dvars.get(dvar.key) is dvar:
                del self._dvars[dvar.key]  # so that store.dvar(name, default) creates it anew
        return StoreUnavailable(
            f"DVar {dvar.name!r} of store {self.name!r} ({self.where}) was deleted from the database; "
            "open it again with store.dvar(name, default) to create it anew"
        )

    # -- the cache -------------------------------------------------------------------

    def _next_epoch(self) -> int:
        return next(self._epochs)  # called under the commit lock, so epochs follow install order

    def _install_rows(
        self, rows: list[postgres.FetchedRow], dvars: list[RemoteDVar], required: Any = None
    ) -> tuple[int, set]:
        """Install rows fetched in one snapshot; return their epoch and the DVars whose value changed.

        A row older than the cached state means the cache already moved past this snapshot: it
        counts as changed, so a transaction that read it re-runs. A row that is gone or does not
        decode raises for the DVars in ``required`` (default: all); for the others it only counts
        as changed, so one bad row cannot break reads of the rows fetched with it.
        """
        by_key = {dvar.key: dvar for dvar in dvars}
        required = dvars if required is None else required
        decoded = {}
        broken: set[RemoteDVar] = set()
        for row in rows:
            dvar = by_key[row.name]
            try:
                if row.version is None:
                    raise self._deleted(dvar)
                if row.value is not None:
                    decoded[dvar] = self._decode(dvar.name, dvar.codec, row.value)
            except (StoreUnavailable, DVarDecodeError):
                if dvar in required:
                    raise
                broken.add(dvar)
        changed: set[RemoteDVar] = set(broken)
        epoch = 0

        def apply(new_version: int) -> list[RemoteDVar]:
            nonlocal epoch
            epoch = self._next_epoch()
            self._remember_fetched(epoch, dvars)
            installed = []
            for row in rows:
                dvar = by_key[row.name]
                local_version, state = dvar._state
                if dvar in broken:
                    # Gone or undecodable: the next read of it fetches again, and raises where it is read.
                    if state[3] != STALE:
                        dvar._state = (new_version, (*state[:3], STALE))
                        installed.append(dvar)
                elif row.version == state[2]:
                    dvar._state = (local_version, (*state[:3], epoch))
                elif dvar in decoded:
                    # Usually newer; older only if the row was deleted and created anew, or if a
                    # slower query's snapshot lands after a newer one (a commit check then corrects it).
                    dvar._state = (new_version, (decoded[dvar], row.value, row.version, epoch))
                    dvar.row_version = row.version
                    changed.add(dvar)
                    installed.append(dvar)
                else:
                    changed.add(dvar)
            return installed

        refresh(apply)
        return epoch, changed

    def _note_contended(self, keys: Any) -> None:
        until = time.monotonic() + CONTENDED_SECONDS
        contended = self._contended
        for key in keys:
            contended[key] = until
        if len(contended) > 1000:  # forget rows that calmed down
            now = time.monotonic()
            for key in [key for key, until in contended.items() if until < now]:
                contended.pop(key, None)

    def _is_contended(self, key: str) -> bool:
        until = self._contended.get(key)
        return until is not None and until > time.monotonic()

    def _remember_fetched(self, epoch: int, dvars: list[RemoteDVar]) -> None:
        fetched = self._fetched
        fetched[epoch] = dvars
        if len(fetched) > _REMEMBERED_EPOCHS:
            del fetched[next(iter(fetched))]

    def _fetched_with(self, epoch: int) -> list[RemoteDVar]:
        """The DVars whose cached state the query of ``epoch`` fetched and that still have that epoch."""
        return [dvar for dvar in self._fetched.get(epoch, ()) if dvar._state[1][3] == epoch]

    def _mark_stale(self, changes: list[tuple[str, int]]) -> None:
        """Rows changed elsewhere: mark their cached states stale and wake transactions blocked on them."""

        def apply(new_version: int) -> list[RemoteDVar]:
            changed = []
            for key, version in changes:
                dvar = self._dvars.get(key)
                if dvar is None:
                    continue
                state = dvar._state[1]
                if version != state[2]:  # lower too: the row was deleted and created anew
                    dvar._state = (new_version, (*state[:3], STALE))
                    changed.append(dvar)
            return changed

        refresh(apply)

    # -- notifications ------------------------------------------------------------------

    def publish(self, written: dict[str, int]) -> None:
        """Tell other processes which rows this process just committed (names and versions, no values)."""
        if self._feed is not None:
            message = {"store": self.name, "origin": _PROCESS_TOKEN, "changes": [[k, v] for k, v in written.items()]}
            self._feed.publish(self._group, message)

    def announce(self, written: dict[str, int]) -> None:
        """Send ``djstm.signals.dvar_changed`` for a commit of this process (after it, outside the locks)."""
        if written and dvar_changed.has_listeners(self):
            changes = list(written.items())
            dvar_changed.send(sender=self, store=self.name, database=self.alias, changes=changes)

    def _on_notification(self, message: dict) -> None:
        if message.get("origin") == _PROCESS_TOKEN or message.get("store") != self.name:
            return
        self._mark_stale([(key, version) for key, version in message.get("changes", ())])

    def _after_joined_commit(
        self, values: dict[RemoteDVar, tuple], written: dict[str, int], callbacks: list | None
    ) -> None:
        """The surrounding Django transaction committed: now the cache, the wake-ups, the callbacks."""

        def apply(new_version: int) -> list[RemoteDVar]:
            epoch = self._next_epoch()
            changed = []
            for dvar, (value, text, _, _) in values.items():
                version = written[dvar.key]
                if version > dvar._state[1][2]:
                    dvar._state = (new_version, (value, text, version, epoch))
                    dvar.row_version = version
                    changed.append(dvar)
            return changed

        refresh(apply)
        if written:
            self.publish(written)
            self.announce(written)
        for callback in callbacks or ():
            callback()

    def _poll(self) -> None:
        """Re-check rows that blocked transactions wait on, in case a notification was lost."""
        try:
            while not self._stop_polling.wait(self.poll_interval):
                waited = [dvar for dvar in list(self._dvars.values()) if dvar._waiters]
                if not waited:
                    continue
                try:
                    rows = postgres.fetch_rows(
                        self.alias, self.name, [d.key for d in waited], [d._state[1][2] for d in waited]
                    )
                except Exception as error:  # the database may be restarting; the next round tries again
                    logger.warning("store %r: polling %s failed: %s", self.name, self.where, error)
                    continue
                self._mark_stale([(row.name, row.version) for row in rows if row.version is not None])
        finally:
            connections[self.alias].close()  # this thread's connection

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close now: later transactions on this store's DVars raise ``StoreClosed``."""
        with self._closing:
            if self.closed:
                return
            with commit_lock:
                self.closed = True
                waiters = [waiter for dvar in self._dvars.values() for waiter in dvar._waiters]
            for waiter in waiters:
                waiter.wake()
            self._stop_polling.set()
            if self._feed is not None:
                self._feed.unsubscribe(self._group, self._on_notification)
            if self._poller is not threading.current_thread():
                self._poller.join(5)
            self._on_close(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._dvars)} DVars cached"
        return f"<DistributedStore {self.name!r} in {self.where}, pid {os.getpid()}, {state}>"

