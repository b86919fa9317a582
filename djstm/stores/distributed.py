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

from django.db import connections, transaction

from ..backends import postgres
from ..codecs import Codec
from ..errors import DVarDecodeError, NoTransaction, STMError, StoreClosed, StoreUnavailable
from ..names import Name
from ..stm._context import current, in_event_loop
from ..stm.transaction import _Conflict, commit_lock, refresh
from .base import MISSING, StoreBase, refuse_in_event_loop
from .dvar import DVar

__all__ = ["AUTO_PESSIMISTIC_AFTER", "DistributedStore", "RemoteDVar"]

logger = logging.getLogger("djstm.distributed")

#: An ``atomically(lock="auto")`` call that conflicted this many times re-runs pessimistically.
AUTO_PESSIMISTIC_AFTER = 3
#: For this long after an optimistic commit lost a row to another commit, "auto" transactions whose first
#: row is that one start pessimistic.
CONTENDED_SECONDS = 1.0

STALE = -1  # the epoch of a cached state that a notification said is out of date
_NOT_READ = -1  # the "known version" of a row written without being read: not checked at commit
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
        tx.write(self, (value, text, _NOT_READ, STALE))


    def peek(self) -> Any:
        state = self._state[1]
        if state[3] == STALE and not in_event_loop() and not self._store.closed:
            self._store._fetch_latest(self)  # another process committed a newer version
            state = self._state[1]
        value = state[0]
        return self.codec.copy(value) if self._mutable else value


def _seen_row_version(tx: Any, dvar: RemoteDVar) -> int:
    """The row version ``tx`` read of ``dvar``; ``_Conflict`` if the cache moved on since (the read is stale)."""
    state = dvar._state
    if state[0] != tx.reads[dvar]:
        raise _Conflict
    return state[1][2]


class _Session:
    """What one transaction attempt does with one distributed store."""

    __slots__ = (
        "store",
        "tx",
        "mode",
        "epoch",
        "fresh",
        "locked",
        "highest",
        "open",
        "private",
        "written",
        "verified",
        "auto",
        "relock",
    )

    def __init__(self, store: DistributedStore, tx: Any) -> None:
        self.store = store
        self.tx = tx
        self.epoch: int | None = None  # the snapshot this transaction reads from the cache
        # True once that snapshot was fetched during this transaction: it then serves as the commit check
        # of a read-only transaction (it is later than the transaction's start).
        self.fresh = False
        self.locked: set[str] = set()
        self.highest: str | None = None  # the highest name locked: locking a lower one could deadlock
        self.open = False  # a database transaction of ours is open (pessimistic)
        self.auto = False
        self.private: dict[RemoteDVar, tuple] | None = None  # rows read inside the caller's transaction
        self.written: dict[str, int] = {}  # new row versions, once committed
        self.verified: list[RemoteDVar] = []  # rows the commit found unchanged
        # Rows first locked inside a savepoint of the caller's code (transaction.atomic() in fn), with the
        # version then: rolling the savepoint back releases the lock, so the commit takes it again and checks.
        self.relock: dict[str, int] = {}
        if postgres.in_callers_transaction(store.alias):
            self.mode = "joined"
            self.private = {}
            return
        backoff = tx.carried().pop((store, "backoff"), 0)
        if backoff:
            time.sleep(backoff)
        lock = tx.lock or store.lock
        carried = tx.carried().pop((store, "lock"), None)
        stale = tx.carried().pop((store, "stale"), None)
        pessimistic = lock == "pessimistic" or (lock == "auto" and tx.conflicts >= AUTO_PESSIMISTIC_AFTER)
        self.mode = "pessimistic" if pessimistic or carried else "optimistic"
        # Still free to start pessimistic, if the first row it touches is one others keep changing.
        self.auto = lock == "auto" and self.mode == "optimistic"
        try:
            if carried:
                self._lock(sorted(carried))
            elif stale:
                self._refresh(stale, read=())
        except BaseException:
            self.end()  # the engine does not know this session yet, so it would not end it
            raise

    # -- reading and writing ------------------------------------------------------

    def _first_touch(self, dvar: RemoteDVar) -> None:
        self.auto = False
        if self.store._is_contended(dvar.key):
            self.mode = "pessimistic"  # it would most likely lose an optimistic commit: wait for the lock instead

    def read(self, dvar: RemoteDVar) -> tuple:
        tx = self.tx
        if dvar in tx.writes:
            return tx.read(dvar)
        if self.auto:
            self._first_touch(dvar)
        mode = self.mode
        if mode == "optimistic":
            if dvar in tx.reads:
                return tx.read(dvar)
            state = tx.read(dvar)
            epoch = state[3]
            if epoch != STALE and (self.epoch is None or epoch == self.epoch):
                self.epoch = epoch
                return state
            del tx.reads[dvar]  # not read after all: first bring it and everything read to one snapshot
            # Rows fetched with it are likely read with it again: bring them along, saving a query each.
            siblings = self.store._fetched_with(epoch)
            self._refresh([dvar, *siblings], read=[d for d in tx.reads if d._store is self.store], required=[dvar])
            state = tx.read(dvar)
            if state[3] != self.epoch:  # refreshed again by another thread meanwhile: start over
                raise _Conflict
            return state
        if mode == "pessimistic":
            if dvar.key not in self.locked:
                self._lock([dvar.key])
            return tx.read(dvar)
        state = self.private.get(dvar)
        if state is None:
            state = self.private[dvar] = self._fetch_private(dvar)
        tx.reads.setdefault(dvar, dvar._state[0])
        return state

    def before_write(self, dvar: RemoteDVar) -> None:
        if self.auto:
            self._first_touch(dvar)
        if self.mode == "pessimistic" and dvar.key not in self.locked:
            self._lock([dvar.key])
        elif self.mode == "joined" and dvar not in self.private:
            self.private[dvar] = self._fetch_private(dvar)  # its version is what the commit checks

    def _fetch_private(self, dvar: RemoteDVar) -> tuple:
        (row,) = self._database(postgres.fetch_rows, [dvar.key], [_NOT_READ])
        if row.version is None:
            raise self.store._deleted(dvar)
        value = self.store._decode(dvar.name, dvar.codec, row.value)
        return (value, row.value, row.version, STALE)

    def _lock(self, keys: list[str]) -> None:
        """Lock rows ``keys`` (sorted) in the database transaction, opening it if needed."""
        if self.highest is not None and keys[0] < self.highest:
            # Taking a lower name now could deadlock: re-run with everything known locked up front.
            self.tx.carried()[(self.store, "lock")] = self.locked.union(keys)
            raise _Conflict
        dvars = [self.store._dvars[key] for key in keys]
        known = [dvar._state[1][2] for dvar in dvars]
        if self.open:
            rows = self._database(postgres.lock_rows, keys, known, naming=keys)
        else:
            rows = self._database(postgres.begin_locked, keys, known, self._lock_timeout(), naming=keys)
            self.open = True
        self.locked.update(keys)
        self.highest = keys[-1]
        found = {row.name for row in rows}
        for dvar in dvars:
            if dvar.key not in found:
                raise self.store._deleted(dvar)
        self.store._install_rows(rows, dvars)
        if connections[self.store.alias].in_atomic_block:
            self.relock.update((dvar.key, dvar._state[1][2]) for dvar in dvars)

    def _refresh(self, dvars: list[RemoteDVar] | Any, read: list[RemoteDVar] | Any, required: Any = ()) -> None:
        """Fetch ``read`` and ``dvars`` in one snapshot; ``_Conflict`` if one of ``read`` had changed.

        A row of ``required`` that is gone or does not decode raises (see ``_install_rows``).
        """
        tx = self.tx
        dvars = list(dict.fromkeys([*read, *dvars]))
        known = [_seen_row_version(tx, dvar) if dvar in tx.reads else dvar._state[1][2] for dvar in dvars]
        rows = self._database(postgres.fetch_rows, [dvar.key for dvar in dvars], known)
        epoch, changed = self.store._install_rows(rows, dvars, required)
        if changed.intersection(read):
            raise _Conflict
        self.epoch = epoch
        self.fresh = True

    # -- the engine's side: commit, end, retry -------------------------------------

    def _check_relocked(self) -> None:
        keys = sorted(self.relock)
        rows = self._database(postgres.lock_rows, keys, [self.relock[key] for key in keys], naming=keys)
        if len(rows) != len(keys) or any(row.version != self.relock[row.name] for row in rows):
            raise _Conflict  # changed while a rolled-back savepoint had released it: run again

    @property
    def holds_locks(self) -> bool:
        return self.open

    def prepare(self, tx: Any, local: bool) -> None:
        """The part of the commit that may wait for other transactions' row locks (see Transaction._commit_remote).

        With ``local`` (the transaction touched local variables too) an optimistic commit leaves its database
        transaction open, rows locked, for ``commit`` to finish under the commit lock.
        """
        store = self.store
        if store.closed:
            raise StoreClosed(
                f"store {store.name!r} was closed before this transaction could commit, so nothing was "
                "committed; open the store again (djstm.with_store) and use its DVars"
            )
        writes = [dvar for dvar in tx.writes if dvar._store is store]
        if self.mode == "optimistic":
            self._commit_checked(tx, writes, keep_open=local)
        elif self.mode == "pessimistic":
            if self.relock:
                self._check_relocked()  # may wait for a row lock: here, not under the commit lock
        elif self.mode == "joined":
            self._commit_joined(tx, writes)

    def commit(self, tx: Any) -> bool:
        """Finish the database commit; never waits for a row lock. False: deferred to the caller's transaction."""
        if self.mode == "joined":
            return False
        if self.open:
            writes = [dvar for dvar in tx.writes if dvar._store is self.store] if self.mode == "pessimistic" else []
            written = self._database(
                postgres.commit_locked, [d.key for d in writes], [tx.writes[d][1] for d in writes]
            )
            self.open = False
            if self.mode == "pessimistic":
                self.written = written
        if self.written:
            self.store.publish(self.written)
        return True

    def _commit_checked(self, tx: Any, writes: list[RemoteDVar], keep_open: bool) -> None:
        store = self.store
        reads = [dvar for dvar in tx.reads if dvar._store is store and dvar not in tx.writes]
        written = {dvar: dvar in tx.reads for dvar in writes}
        # Read-only here, it only checks. But a transaction that writes local variables on what it read here
        # locks those rows until its commit (below), so no commit elsewhere can come between check and install.
        if not writes and not (keep_open and tx.writes):
            if reads and not self.fresh:
                # One snapshot in which everything read is current. (No cache update here: the commit lock
                # may be held; install() records the check, the next attempt fetches what moved.)
                known = {dvar: _seen_row_version(tx, dvar) for dvar in reads}
                rows = self._database(postgres.fetch_rows, [dvar.key for dvar in reads], list(known.values()))
                moved = {row.name for row in rows if row.version != known[store._dvars[row.name]]}
                if moved:
                    tx.carried()[(store, "stale")] = [store._dvars[key] for key in moved]
                    raise _Conflict
            self.verified = reads
            return
        dvars = sorted([*reads, *writes], key=lambda dvar: dvar.key)
        known = [
            _seen_row_version(tx, dvar) if dvar not in written or written[dvar] else _NOT_READ for dvar in dvars
        ]
        outcome = self._database(
            postgres.commit_checked,
            [dvar.key for dvar in dvars],
            known,
            [dvar in written for dvar in dvars],
            [tx.writes[dvar][1] if dvar in written else None for dvar in dvars],
            self._lock_timeout(),
            keep_open,
        )
        self.open = keep_open  # rolled back by end() if stale
        if outcome.stale:
            # The next attempt starts by fetching these rows, all in one snapshot.
            tx.carried()[(store, "stale")] = [store._dvars[key] for key in outcome.stale]
            store._note_contended(outcome.stale)
            raise _Conflict
        self.written = outcome.written
        self.verified = reads

    def _commit_joined(self, tx: Any, writes: list[RemoteDVar]) -> None:
        store = self.store
        if any(tvar._store is not store for tvar in tx.writes) or tx.stores:
            raise STMError(
                f"a transaction inside Django's transaction.atomic() on {store.where} wrote variables that are "
                "not in the distributed store, which cannot commit or roll back with the database; write them "
                "in a separate atomically() after the surrounding transaction"
            )
        private = self.private
        dvars = sorted({*private, *writes}, key=lambda dvar: dvar.key)
        outcome = self._database(
            postgres.commit_checked,
            [dvar.key for dvar in dvars],
            [private[dvar][2] if dvar in private else _NOT_READ for dvar in dvars],
            [dvar in tx.writes for dvar in dvars],
            [tx.writes[dvar][1] if dvar in tx.writes else None for dvar in dvars],
            self._lock_timeout(),
            False,
        )
        if outcome.stale:
            raise _Conflict  # the next attempt reads the rows afresh
        if outcome.written or tx.callbacks:
            values = {dvar: tx.writes[dvar] for dvar in writes}
            callbacks, tx.callbacks = tx.callbacks, None
            transaction.on_commit(
                lambda: store._after_joined_commit(values, outcome.written, callbacks), using=store.alias
            )

    def install(self, new_version: int) -> list[RemoteDVar]:
        """Under the commit lock, after ``commit``: put the committed states in the cache."""
        store = self.store
        epoch = store._next_epoch()
        tx = self.tx
        changed = []
        for dvar in tx.writes:
            if dvar._store is not store:
                continue
            version = self.written.get(dvar.key, -1)  # -1: the row was gone (deleted by hand meanwhile)
            state = dvar._state[1]
            if version > state[2]:  # else a newer version arrived meanwhile: keep it
                value, text = tx.writes[dvar][:2]
                dvar._state = (new_version, (value, text, version, epoch))
                dvar.row_version = version
                changed.append(dvar)
        for dvar in self.verified:
            local_version, state = dvar._state
            if local_version == tx.reads[dvar]:
                dvar._state = (local_version, (*state[:3], epoch))
        store._remember_fetched(epoch, [*changed, *self.verified])
        return changed

    def end(self) -> None:
        """The attempt is over: roll back our database transaction if it is still open."""
        if self.open:
            self.open = False
            postgres.rollback(self.store.alias)

    def still_current(self, tx: Any) -> bool:
        """Before blocking in retry: is every row read still what the database holds? (Refreshes if not.)"""
        if self.mode == "joined":
            raise STMError(
                f"retry() inside Django's transaction.atomic() on {self.store.where} would wait while holding "
                "the surrounding transaction open; call atomically() with retry outside transaction.atomic()"
            )
        reads = [dvar for dvar in tx.reads if dvar._store is self.store]
        if not reads:
            return True
        known = []
        for dvar in reads:
            if dvar._state[0] != tx.reads[dvar]:
                return False  # the cache moved on since the read (a commit in this process): run again
            known.append(dvar._state[1][2])
        rows = self._database(postgres.fetch_rows, [d.key for d in reads], known)
        _, changed = self.store._install_rows(rows, reads, required=())
        return not changed

    def _lock_timeout(self) -> float:
        """How long a statement may wait for a row lock: the store's limit, within the call's ``timeout``."""
        deadline = self.tx.deadline
        if deadline is None:
            return self.store.lock_timeout
        return max(0.001, min(self.store.lock_timeout, deadline - time.monotonic()))

    def read_stale_values(self, tx: Any) -> bool:
        """After an exception escaped the transaction: did it read values the database has since replaced?

        Rows fetched during this attempt, or locked, were current; cached ones are checked (one query).
        If the database cannot be asked, the exception stands.
        """
        if self.mode != "optimistic" or self.fresh:
            return False
        try:
            return not self.still_current(tx)
        except (_Conflict, StoreUnavailable):
            return False

    def _database(self, operation: Callable[..., Any], *args: Any, naming: list[str] = ()) -> Any:
        """Run ``operation(alias, store, *args)``; a failure worth re-running re-runs, a bounded number of times.

        ``naming``: keys the operation is about, besides those the transaction touched, for the message.
        """
        store = self.store
        try:
            return operation(store.alias, store.name, *args)
        except postgres.TransientDatabaseError as error:
            self.open = False
            failures = self.tx.carried().get((store, "failures"), 0) + 1
            self.tx.carried()[(store, "failures")] = failures
            if self.mode == "joined" or failures > store.database_retries:
                raise StoreUnavailable(self._failure_message(error, failures, naming)) from error
            # The next attempt first waits a little, outside any lock: a restarting server or a lock holder
            # gets ahead.
            self.tx.carried()[(store, "backoff")] = min(1.0, 0.01 * 2**failures)
            raise _Conflict from None

    def _failure_message(self, error: postgres.TransientDatabaseError, failures: int, naming: list[str]) -> str:
        tx = self.tx
        names = sorted({d.key for d in itertools.chain(tx.reads, tx.writes) if d._store is self.store}.union(naming))
        shown = ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if self.mode == "joined":
            what = "inside Django's transaction.atomic(), so it cannot be re-run here; re-run the surrounding block"
        else:
            what = f"after {failures} attempts; nothing was committed. Check the database, then try again"
        return (
            f"store {self.store.name!r} in {self.store.where}: a transaction on DVars {shown or '(none yet)'} "
            f"failed with {error.reason} {what}"
        )


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
            (row,) = postgres.fetch_rows(self.alias, self.name, [key], [_NOT_READ])
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

    def session(self, tx: Any) -> _Session:
        """The session of transaction ``tx`` with this store (created on first use)."""
        session = tx.remote
        if session is None:
            if self._generation != _fork_generation[0]:
                with self._opening:
                    if self._generation != _fork_generation[0]:
                        self._attach()  # opened before this process was forked: its threads stayed in the parent
            self._check_open()
            refuse_in_event_loop(f"a transaction on distributed store {self.name!r}")
            session = tx.remote = _Session(self, tx)
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

