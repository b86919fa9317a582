"""One transaction attempt's dealings with a distributed store: reading through the cache, locking, committing.

The engine sees this object as ``tx.remote`` (see ``Transaction._commit_remote`` for the protocol);
``distributed.py`` explains the cache and the locking modes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction

from ..backends import postgres
from ..errors import STMError, StoreClosed, StoreUnavailable
from ..stm.transaction import _Conflict

if TYPE_CHECKING:
    from .distributed import DistributedStore, RemoteDVar

__all__ = ["AUTO_PESSIMISTIC_AFTER", "CONTENDED_SECONDS", "NOT_READ", "STALE", "Session"]

#: An ``atomically(lock="auto")`` call that conflicted this many times re-runs pessimistically.
AUTO_PESSIMISTIC_AFTER = 3
#: For this long after an optimistic commit lost a row to another commit, "auto" transactions whose first
#: row is that one start pessimistic.
CONTENDED_SECONDS = 1.0

STALE = -1  # the epoch of a cached state that a notification said is out of date
NOT_READ = -1  # the "known version" of a row written without being read: not checked at commit


def _seen_row_version(tx: Any, dvar: RemoteDVar) -> int:
    """The row version ``tx`` read of ``dvar``; ``_Conflict`` if the cache moved on since (the read is stale)."""
    state = dvar._state
    if state[0] != tx.reads[dvar]:
        raise _Conflict
    return state[1][2]


class Session:
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
        (row,) = self._database(postgres.fetch_rows, [dvar.key], [NOT_READ])
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
        if writes and self.mode != "joined":
            tx.add_callback(self._announce)  # runs once committed, in commit order, outside the locks
        if self.mode == "optimistic":
            self._commit_checked(tx, writes, keep_open=local)
        elif self.mode == "pessimistic":
            if self.relock:
                self._check_relocked()  # may wait for a row lock: here, not under the commit lock
        elif self.mode == "joined":
            self._commit_joined(tx, writes)

    def version_seen(self, dvar: RemoteDVar) -> int:
        """The row version of ``dvar`` this attempt read (call after reading it)."""
        if self.private is not None and dvar in self.private:
            return self.private[dvar][2]
        return dvar._state[1][2]

    def _announce(self) -> None:
        self.store.announce(self.written)

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
            _seen_row_version(tx, dvar) if dvar not in written or written[dvar] else NOT_READ for dvar in dvars
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
            [private[dvar][2] if dvar in private else NOT_READ for dvar in dvars],
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
