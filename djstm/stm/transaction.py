"""The transaction log and its commit (TL2 with a global version clock).

How a commit works, and why each step is where it is:

1. A transaction remembers the clock value when it started (``read_version``).
   Every read checks that the variable's version is not newer; if it is, the
   read set is revalidated under the commit lock and ``read_version`` moves
   forward (extension), or the transaction aborts with ``_Conflict``. So user
   code never sees two variables from different snapshots (opacity).
2. A read-only transaction commits without taking any lock: every read was
   consistent at ``read_version``, which is its serialization point.
3. A writing transaction takes the global commit lock, revalidates its read
   set, checks that no store it wrote to is closed, then installs the new
   states, hands the write set to its stores, and only *then* publishes the
   new clock value. Publishing last means that a transaction starting
   meanwhile sees the new states as "too new" and extends (which waits for
   the lock) instead of mixing old and new values. A transaction that finds
   the lock taken and its reads already stale re-runs without queueing.

Escalation: a transaction that keeps conflicting takes the *gate* before its
next attempt. While the gate is held other transactions wait at their commit,
so the escalated one runs against a quiet world and finishes (no starvation).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..errors import NoTransaction, StoreClosed
from ._callbacks import CallbackOrder
from ._context import current

__all__ = ["Transaction"]

_MISSING: Any = object()

# The global commit lock orders commits, extensions and waiter (un)registration.
commit_lock = threading.Lock()
# The global clock: version of the last commit. A one-element list, mutated under commit_lock.
clock = [0]
# Held by an escalated transaction for its whole attempt; others wait before committing.
escalation_gate = threading.Lock()
# Tickets taken under commit_lock make after_commit callbacks run in commit order.
callback_order = CallbackOrder()


class _Conflict(BaseException):
    """Internal: the transaction read a stale variable and must run again.

    A BaseException so that ``except Exception`` in user code cannot swallow it.
    """


class _RetrySignal(BaseException):
    """Internal: ``retry()`` was called; abort and block until something read changes."""


class _Expired(BaseException):
    """Internal: the transaction's deadline passed while it waited to commit; nothing was committed."""


class Transaction:
    """One attempt of an ``atomically`` block: what it read, what it wrote, what to run after."""

    __slots__ = (
        "read_version",
        "reads",
        "writes",
        "blind_writes",
        "_undo",
        "_depth",
        "callbacks",
        "durable",
        "escalated",
        "callback_ticket",
        "stores",
        "deadline",
        "remote",
        "announcements",
        "lock",
        "conflicts",
        "carry",
    )

    def __init__(
        self,
        escalated: bool = False,
        durable: bool = False,
        deadline: float | None = None,
        lock: str | None = None,
        conflicts: int = 0,
        carry: dict | None = None,
    ) -> None:
        self.read_version = clock[0]
        self.reads: dict[Any, int] = {}  # variable -> version seen
        self.writes: dict[Any, Any] = {}  # variable -> value to install
        # Variables written before being read, with the version they had then: retry waits on them too.
        self.blind_writes: dict[Any, int] | None = None
        # Undo log, only while a savepoint (nested atomically, or_else branch) is open.
        self._undo: list[tuple[Any, Any]] | None = None
        self._depth = 0
        self.callbacks: list[Any] | None = None
        self.durable = durable  # wait until enlisted stores have the commit on disk
        self.deadline = deadline  # time.monotonic() past which waiting to commit raises _Expired
        self.escalated = escalated
        self.callback_ticket = -1
        # Stores whose variables were written (their variables' write adds them): they take part in commit.
        self.stores: dict[Any, None] = {}
        # The session of the one remote (database-backed) store this transaction touched, if any: it commits
        # in the database first (see _commit_remote).
        self.remote: Any = None
        # Stores' own after-commit work (e.g. sending a signal), kept through savepoint rollbacks: each looks
        # at the final write set itself. None until a store adds one.
        self.announcements: dict[Any, Any] | None = None
        self.lock = lock  # the locking the caller asked for; None: the store's default
        self.conflicts = conflicts  # how many earlier attempts of this atomically call conflicted
        # What an aborted attempt leaves for the next one (e.g. rows to lock up front), keyed by its owner;
        # None until something is left (see carried()).
        self.carry: dict | None = carry

    # -- reading and writing -------------------------------------------------

    def read(self, tvar: Any) -> Any:
        writes = self.writes
        if writes:
            value = writes.get(tvar, _MISSING)
            if value is not _MISSING:
                return value
        version, value = tvar._state
        if version > self.read_version:
            version, value = self._extend(tvar)
        self.reads[tvar] = version
        return value

    def _extend(self, tvar: Any) -> tuple[int, Any]:
        # Under the lock no commit is half-installed, so "unchanged" really means unchanged.
        with commit_lock:
            for seen, version in self.reads.items():
                if seen._state[0] != version:
                    raise _Conflict
            self.read_version = clock[0]
            return tvar._state

    def write(self, tvar: Any, value: Any) -> None:
        writes = self.writes
        if tvar not in writes and tvar not in self.reads:
            if self.blind_writes is None:
                self.blind_writes = {}
            self.blind_writes[tvar] = tvar._state[0]
        if self._undo is not None:
            self._undo.append((tvar, writes.get(tvar, _MISSING)))
        writes[tvar] = value

    def announce(self, store: Any, announcement: Any) -> None:
        """Have ``announcement(tx)`` run once after this transaction commits (once per ``store``)."""
        if self.announcements is None:
            self.announcements = {}
        self.announcements[store] = announcement

    def add_callback(self, callback: Any) -> None:
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(callback)

    # -- savepoints (nested atomically, or_else branches) ---------------------

    def savepoint(self) -> tuple[int, int]:
        if self._undo is None:
            self._undo = []
        self._depth += 1
        return len(self._undo), len(self.callbacks) if self.callbacks else 0

    def rollback_to(self, mark: tuple[int, int]) -> None:
        """Undo the writes and callbacks made since ``mark``; reads stay (retry waits on them)."""
        undo_length, callback_count = mark
        undo = self._undo
        writes = self.writes
        while len(undo) > undo_length:
            tvar, previous = undo.pop()
            if previous is _MISSING:
                del writes[tvar]
            else:
                writes[tvar] = previous
        if self.callbacks:
            del self.callbacks[callback_count:]
        self._close_savepoint()

    def release(self, mark: tuple[int, int]) -> None:
        self._close_savepoint()

    def _close_savepoint(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._undo = None

    # -- commit ---------------------------------------------------------------

    def watched(self) -> dict[Any, int]:
        """Every variable this transaction touched, with the version it saw: what retry waits on."""
        if not self.blind_writes:
            return self.reads
        return {**self.blind_writes, **self.reads}

    def commit(self) -> list[tuple[Any, Any]]:
        """Install the writes atomically; raise ``_Conflict`` if a read went stale.

        The store protocol: a transaction whose ``stores`` holds a store with
        ``closed`` set fails before anything changed; otherwise each store's
        ``accept_commit(writes)`` (which must not fail, and gets the whole write
        set to pick its variables from) runs while the commit lock is held, so
        stores see commits in commit order. Returns ``(store, receipt)`` pairs for
        ``wait_durable`` if the transaction is durable; the waiters to wake
        are woken before returning.
        """
        if self.remote is not None:
            return self._commit_remote()
        writes = self.writes
        if not writes:
            if self.callbacks:
                with commit_lock:
                    self.callback_ticket = callback_order.take_ticket()
            return []
        if escalation_gate.locked():
            self._wait_for_escalated()
        stores = self.stores
        reads = self.reads
        # The checks of the reads are written out here, not called: this is the hot path of every commit.
        if not commit_lock.acquire(False):
            # The holder is a thread preempted mid-commit. Queueing behind it costs a context switch,
            # and if what we read is already stale the wait is for nothing: re-run at once instead.
            for tvar, version in reads.items():
                if tvar._state[0] != version:
                    raise _Conflict
            commit_lock.acquire()
        try:
            for tvar, version in reads.items():
                if tvar._state[0] != version:
                    raise _Conflict
            if stores:
                self._refuse_closed_stores()
            # Installing, written out for the same reason (_install_with_remote does it for remote stores).
            new_version = clock[0] + 1
            woken: dict[Any, None] | None = None
            for tvar, value in writes.items():
                tvar._state = (new_version, value)
                if tvar._waiters:
                    if woken is None:
                        woken = {}
                    woken.update(tvar._waiters)
            receipts = []
            if stores:
                if self.durable:
                    receipts = [(store, store.accept_commit(writes)) for store in stores]
                else:
                    for store in stores:
                        store.accept_commit(writes)
            if self.callbacks:
                self.callback_ticket = callback_order.take_ticket()
            clock[0] = new_version  # the linearization point: from here on others see this commit
        finally:
            commit_lock.release()
        if woken:
            for waiter in woken:
                waiter.wake()
        return receipts

    def carried(self) -> dict:
        """What earlier attempts of this call left for the next ones (created on first use)."""
        if self.carry is None:
            self.carry = {}
        return self.carry

    def _wait_for_escalated(self) -> None:
        if escalation_gate.locked() and not self.escalated:
            # An escalated transaction is running; let it finish first (within our deadline).
            wait = -1 if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            if not escalation_gate.acquire(timeout=wait):
                raise _Expired
            escalation_gate.release()

    def _check_reads(self) -> None:
        for tvar, version in self.reads.items():
            if tvar._state[0] != version:
                raise _Conflict

    def _refuse_closed_stores(self) -> None:
        writes = self.writes
        for store in self.stores:
            # Refuse before anything changed, unless this store's writes were all rolled back.
            if store.closed and any(tvar._store is store for tvar in writes):
                raise StoreClosed(
                    f"store {store.name!r} was closed before this transaction could commit, so nothing "
                    "was committed; open the store again (djstm.with_store) and use its DVars"
                )

    def _install_with_remote(self, remote: Any) -> tuple[list[tuple[Any, Any]], dict[Any, None] | None]:
        """Install the writes of a remote-store transaction (see ``commit`` for the local one). Commit lock held.

        Writes to ``remote``'s variables are left to ``remote.install``, which
        knows their database versions. Returns the durability receipts and
        the waiters to wake once the lock is released.
        """
        writes = self.writes
        stores = self.stores
        new_version = clock[0] + 1
        woken: dict[Any, None] | None = None
        remote_store = remote.store
        for tvar, value in writes.items():
            if tvar._store is remote_store:
                continue
            tvar._state = (new_version, value)
            if tvar._waiters:
                if woken is None:
                    woken = {}
                woken.update(tvar._waiters)
        for tvar in remote.install(new_version):
            if tvar._waiters:
                if woken is None:
                    woken = {}
                woken.update(tvar._waiters)
        receipts = []
        if stores:
            if self.durable:
                receipts = [(store, store.accept_commit(writes)) for store in stores]
            else:
                for store in stores:
                    store.accept_commit(writes)
        if self.callbacks:
            self.callback_ticket = callback_order.take_ticket()
        if writes:
            clock[0] = new_version  # the linearization point: from here on others see this commit
        return receipts, woken

    def _commit_remote(self) -> list[tuple[Any, Any]]:
        """Commit a transaction that touched a remote (database) store: the database decides first.

        The remote session's protocol: ``holds_locks`` tells whether it holds
        database row locks already; ``prepare(tx, local)`` does whatever may
        wait for another transaction's row locks, and raises ``_Conflict`` if
        what was read is stale in the database; ``commit(tx)`` then finishes
        the database commit without waiting for any lock, and returns False
        if it deferred it to a surrounding database transaction (it then
        installs, and runs the callbacks, itself once that commits);
        ``install(new_version)`` puts the committed states in place. When the
        transaction touched local variables too, ``commit`` runs under the
        commit lock between validating the local reads and installing, so
        both parts commit or neither does; since it never waits for a row
        lock there, a transaction holding row locks that needs the commit
        lock cannot be stuck behind it. For the same reason a transaction
        holding row locks never waits at the escalation gate.
        """
        remote = self.remote
        if self.writes and not remote.holds_locks:
            self._wait_for_escalated()
        local = self._touches_local(remote.store)
        if not local:
            self._check_reads()  # a stale cached read fails here, without a round trip
        remote.prepare(self, local)
        if not local:
            if not remote.commit(self):
                return []
            with commit_lock:
                receipts, woken = self._install_with_remote(remote)
        else:
            with commit_lock:
                self._check_reads()
                if self.stores:
                    self._refuse_closed_stores()
                if not remote.commit(self):
                    return []
                receipts, woken = self._install_with_remote(remote)
        if woken:
            for waiter in woken:
                waiter.wake()
        return receipts

    def _touches_local(self, remote_store: Any) -> bool:
        if self.stores:
            return True
        for tvar in self.writes:
            if tvar._store is not remote_store:
                return True
        for tvar in self.reads:
            if tvar._store is not remote_store:
                return True
        return False


def refresh(apply: Any) -> None:
    """Install states committed elsewhere (a cache refreshed from a database) as one local commit.

    ``apply(new_version)`` runs under the commit lock, replaces the states it
    must (with ``new_version`` as their version) and returns the variables it
    changed; if there are any, the clock moves to ``new_version`` and their
    waiters wake. Transactions that read an older state conflict, as with any commit.
    """
    with commit_lock:
        new_version = clock[0] + 1
        changed = apply(new_version)
        if not changed:
            return
        clock[0] = new_version
        waiters = [waiter for tvar in changed for waiter in tvar._waiters]
    for waiter in waiters:
        waiter.wake()


def current_transaction(operation: str) -> Transaction:
    """Return the running transaction or raise ``NoTransaction`` naming ``operation``."""
    tx = current.tx
    if tx is None:
        raise NoTransaction(f"djstm.{operation}() was called outside a transaction; call it inside djstm.atomically(...)")
    return tx
