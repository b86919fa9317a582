"""``atomically`` and the operations that only make sense inside it.

``atomically(fn)`` runs ``fn`` as one transaction and returns its result. It
re-runs ``fn`` when a variable it read was changed by a concurrent commit, and
blocks when ``fn`` calls ``retry()`` until a variable it touched changes.
Inside a running transaction, ``atomically`` joins it with savepoint
semantics: an exception escaping the inner call undoes only the inner writes.
``fn`` should do nothing but transactional reads and writes, since it may run
several times; side effects belong in ``after_commit`` callbacks.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, ParamSpec, TypeVar

from ..errors import RetryWithNothingRead, STMError, StoreClosed, Timeout
from ._context import current, in_event_loop
from .transaction import (
    Transaction,
    _Conflict,
    _Expired,
    _RetrySignal,
    callback_order,
    current_transaction,
    escalation_gate,
)
from .waiting import AsyncWaiter, ThreadWaiter, register, unregister

__all__ = [
    "atomically",
    "aatomically",
    "retry",
    "check",
    "or_else",
    "after_commit",
    "transactional",
    "ESCALATE_AFTER_CONFLICTS",
    "LOCK_MODES",
]

P = ParamSpec("P")
R = TypeVar("R")

#: A transaction that conflicts this many times in a row runs its next attempt escalated (see transaction.py).
ESCALATE_AFTER_CONFLICTS = 8

_ABANDONED = (False, None)

#: The values of ``atomically(lock=...)``; they matter only for transactions that touch a distributed store.
LOCK_MODES = ("optimistic", "pessimistic", "auto")


def _check_lock(lock: str | None, entry: str) -> None:
    if lock is not None and lock not in LOCK_MODES:
        raise ValueError(f"{entry}(lock={lock!r}): lock must be one of {', '.join(map(repr, LOCK_MODES))}")


def _deadline_for(timeout: float | None, entry: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{entry}(timeout={timeout!r}): the timeout is a number of seconds, or None for no limit")
    if timeout < 0:
        raise ValueError(f"{entry}(timeout={timeout!r}): the timeout cannot be negative")
    return time.monotonic() + timeout


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _refuse_coroutine(fn: Callable[..., Any], result: Any, entry: str) -> None:
    if type(result) is types.CoroutineType:
        result.close()  # never awaited: close it so Python does not warn about it later
        name = _name_of(fn)
        raise TypeError(
            f"{entry}({name}): {name} is an async function; a transaction must be a plain function "
            "(it may run several times and cannot await). Use `def`, and `await djstm.aatomically(fn)` "
            "to run it from async code."
        )


def _refuse_waiting_in_event_loop() -> None:
    if not in_event_loop():
        return
    raise STMError(
        "atomically(..., durable=True) was called in a coroutine, where waiting for the disk would block "
        "the event loop; use `await djstm.aatomically(fn, durable=True)`"
    )


def _describe_watched(watched: dict[Any, int]) -> str:
    names = [tvar._describe() for tvar in list(watched)[:5]]
    more = f" and {len(watched) - 5} more" if len(watched) > 5 else ""
    return ", ".join(names) + more


class _Run:
    """One call of ``atomically``: the function, its deadline, and how often it conflicted."""

    __slots__ = (
        "fn",
        "args",
        "kwargs",
        "timeout",
        "deadline",
        "durable",
        "conflicts",
        "abandoned",
        "entry",
        "lock",
        "carry",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        durable: bool,
        deadline: float | None = None,
        conflicts: int = 0,
        entry: str = "atomically",
        lock: str | None = None,
        carry: dict | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.entry = entry  # the public function the user called, for messages
        if deadline is None:
            deadline = _deadline_for(timeout, entry)
        self.deadline = deadline
        self.durable = durable
        self.conflicts = conflicts
        self.abandoned = False  # set by a cancelled aatomically: do not commit
        self.lock = lock
        self.carry = carry  # passed from each attempt to the next (Transaction.carried)

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self, watched: dict[Any, int] | None = None) -> Timeout:
        where = f" while blocked in retry on {_describe_watched(watched)}" if watched else ""
        return Timeout(
            f"{self.entry}({_name_of(self.fn)}) did not finish within {self.timeout}s{where}; "
            "nothing it wrote was committed. Raise the timeout, or check that some "
            "other transaction will make the awaited change."
        )

    def attempt(self, make_waiter: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn`` until it commits or blocks.

        Returns ``(True, result)`` once committed (durability waits and
        callbacks done), ``(False, (waiter, watched))`` when blocked in retry
        with ``waiter`` registered, or ``_ABANDONED`` if ``abandoned`` was set.
        """
        while True:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise self.timed_out()
            escalated = self.conflicts >= ESCALATE_AFTER_CONFLICTS
            if escalated and not escalation_gate.acquire(timeout=-1 if self.deadline is None else self.remaining()):
                raise self.timed_out()
            try:
                tx = Transaction(escalated, self.durable, self.deadline, self.lock, self.conflicts, self.carry)
                current.tx = tx
                try:
                    result = self.fn(*self.args, **self.kwargs)
                    _refuse_coroutine(self.fn, result, self.entry)
                    if self.abandoned:
                        return _ABANDONED
                    receipts = tx.commit()
                except _Expired:
                    raise self.timed_out() from None
                except _Conflict:
                    self.conflicts += 1
                    continue
                except _RetrySignal:
                    committed = False
                except Exception:
                    if _decided_on_stale_reads(tx):
                        self.conflicts += 1
                        continue
                    raise
                else:
                    committed = True
                finally:
                    current.tx = None
                    self.carry = tx.carry
                    if tx.remote is not None:  # release what the attempt holds there (an open transaction)
                        tx.remote.end()
            finally:
                if escalated:
                    escalation_gate.release()
            if committed:
                # Outside the transaction and the gate: callbacks may run transactions of their own.
                return True, _after_commit(tx, receipts, result)
            self.conflicts = 0
            blocked = self.block(tx, make_waiter)
            if blocked is not None:
                return False, blocked
            # A watched variable changed before we could register: run again at once.

    def block(self, tx: Transaction, make_waiter: Callable[[], Any]) -> tuple[Any, dict[Any, int]] | None:
        """Register a waiter on all ``tx`` (which retried) touched; None if something already changed."""
        watched = tx.watched()
        for tvar in watched:
            store = tvar._store
            if store is not None and store.closed:  # nothing will ever change it again
                raise StoreClosed(
                    f"{self.entry}({_name_of(self.fn)}) waits for {tvar._describe()}, whose store is closed, "
                    "so it would never wake; open the store again (djstm.with_store) and use its DVars"
                )
        if not watched:
            raise RetryWithNothingRead(
                f"retry() was called in {self.entry}({_name_of(self.fn)}) before the transaction read any variable, "
                "so no commit could ever wake it; read the variables your condition depends on first"
            )
        if tx.remote is not None and not tx.remote.still_current(tx):
            return None  # what the database holds differs from what was read: run again now
        waiter = make_waiter()
        return (waiter, watched) if register(waiter, watched) else None


def _decided_on_stale_reads(tx: Transaction) -> bool:
    """An exception escaped ``fn``: was it decided on values a remote store's database has since replaced?

    Like a commit, an exception must come from a state that was current: otherwise ``fn`` runs again.
    """
    return tx.remote is not None and tx.remote.read_stale_values(tx)


def _after_commit(tx: Transaction, receipts: list, result: Any) -> Any:
    try:
        for store, receipt in receipts:  # only a durable transaction has receipts
            store.wait_durable(receipt)
    finally:
        try:
            if tx.announcements:
                for announcement in tx.announcements.values():
                    announcement(tx)
        finally:
            if tx.callbacks:
                callback_order.run(tx.callback_ticket, tx.callbacks)
    return result


def _join(tx: Transaction, fn: Callable[..., R], args: tuple, kwargs: dict, durable: bool = False) -> R:
    mark = tx.savepoint()
    try:
        result = fn(*args, **kwargs)
        _refuse_coroutine(fn, result, "atomically")
    except BaseException:
        tx.rollback_to(mark)
        raise
    tx.release(mark)
    if durable:
        tx.durable = True
    return result


def _run_blocking(run: _Run, retried: Transaction | None = None) -> Any:
    blocked = None if retried is None else run.block(retried, ThreadWaiter)
    while True:
        if blocked is not None:
            waiter, watched = blocked
            try:
                woken = waiter.wait(run.remaining())
            finally:
                unregister(waiter, watched)
            if not woken:
                raise run.timed_out(watched)
        committed, blocked = run.attempt(ThreadWaiter)
        if committed:
            return blocked


def atomically(
    fn: Callable[P, R],
    *args: Any,
    timeout: float | None = None,
    durable: bool = False,
    lock: str | None = None,
    **kwargs: Any,
) -> R:
    """Run ``fn(*args, **kwargs)`` as one transaction and return its result.

    ``timeout`` (seconds) bounds the whole call, blocking in ``retry``
    included, and raises :class:`~djstm.Timeout` with nothing committed.
    ``durable=True`` returns only once every store written to has the commit
    on disk. ``lock`` ("optimistic", "pessimistic" or "auto"; default: the
    store's setting) chooses how a distributed store commits. Inside a
    transaction this joins it (a savepoint), and ``timeout`` and ``lock``
    apply to the outermost call only.
    """
    tx = current.tx
    if tx is not None:
        return _join(tx, fn, args, kwargs, durable)
    if durable:
        _refuse_waiting_in_event_loop()
    if lock is not None:
        _check_lock(lock, "atomically")
    deadline = _deadline_for(timeout, "atomically")
    # The first attempt inline: most transactions commit on it, so they skip the retry machinery.
    tx = current.tx = Transaction(False, durable, deadline, lock)
    try:
        result = fn(*args, **kwargs)
        if type(result) is types.CoroutineType:
            _refuse_coroutine(fn, result, "atomically")
        receipts = tx.commit()
    except _Expired:
        raise _Run(fn, args, kwargs, timeout, durable, deadline).timed_out() from None
    except _Conflict:
        retried, conflicts = None, 1
    except _RetrySignal:
        retried, conflicts = tx, 0
    except Exception:
        if not _decided_on_stale_reads(tx):
            raise
        retried, conflicts = None, 1
    else:
        retried = conflicts = None
    finally:
        current.tx = None
        if tx.remote is not None:
            tx.remote.end()
    if conflicts is None:  # committed
        if receipts or tx.callbacks or tx.announcements:
            return _after_commit(tx, receipts, result)
        return result
    # Conflicted or retried: go on with the full machinery (waiting, escalation, timeout).
    run = _Run(fn, args, kwargs, timeout, durable, deadline, conflicts, lock=lock, carry=tx.carry)
    return _run_blocking(run, retried)


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _attempt_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="djstm-aatomically")
        return _executor


async def _outcome_despite_cancellation(job: asyncio.Future) -> tuple[bool, Any] | None:
    # The attempt cannot be interrupted in its thread; wait for it so it leaves no registration behind.
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError:
            continue
    return None if job.cancelled() or job.exception() is not None else job.result()


async def aatomically(
    fn: Callable[P, R],
    *args: Any,
    timeout: float | None = None,
    durable: bool = False,
    lock: str | None = None,
    **kwargs: Any,
) -> R:
    """Async twin of :func:`atomically`: never blocks the event loop.

    Attempts run in a worker thread; blocking in ``retry`` awaits a wake-up
    without holding a thread. If the task is cancelled, the transaction does
    not commit, unless its commit had already begun, and no registration is
    left behind. ``after_commit`` callbacks run in the worker thread.
    """
    if current.tx is not None:
        raise STMError("aatomically() was awaited inside a transaction; call atomically() there to join it")
    _check_lock(lock, "aatomically")
    loop = asyncio.get_running_loop()
    run = _Run(fn, args, kwargs, timeout, durable, entry="aatomically", lock=lock)
    executor = _attempt_executor()
    while True:
        waiter = AsyncWaiter(loop)
        job = loop.run_in_executor(executor, run.attempt, lambda: waiter)
        try:
            committed, payload = await asyncio.shield(job)
        except asyncio.CancelledError:
            run.abandoned = True
            outcome = await _outcome_despite_cancellation(job)
            if outcome is not None and outcome is not _ABANDONED and not outcome[0]:
                unregister(*outcome[1])
            raise
        if committed:
            return payload
        waiter, watched = payload
        try:
            if run.deadline is None:
                await waiter.future
            else:
                await asyncio.wait_for(waiter.future, run.remaining())
        except TimeoutError:
            raise run.timed_out(watched) from None
        finally:
            unregister(waiter, watched)


def retry() -> NoReturn:
    """Abandon this attempt and block until a variable it read changes, then run again."""
    current_transaction("retry")
    raise _RetrySignal


def check(condition: object) -> None:
    """``retry()`` unless ``condition`` is true."""
    if not condition:
        retry()


def or_else(*alternatives: Callable[[], R]) -> R:
    """Return the result of the first alternative that does not retry.

    An alternative that retries has its writes (and ``after_commit``
    callbacks) rolled back; its reads still count, so if every alternative
    retries the transaction waits on all they read. An exception escaping an
    alternative also rolls back its writes, then propagates.
    """
    tx = current_transaction("or_else")
    for alternative in alternatives:
        mark = tx.savepoint()
        try:
            result = alternative()
        except _RetrySignal:
            tx.rollback_to(mark)
            continue
        except BaseException:
            tx.rollback_to(mark)
            raise
        tx.release(mark)
        return result
    raise _RetrySignal


def after_commit(callback: Callable[[], object]) -> None:
    """Run ``callback()`` once after this transaction commits; never if it aborts or retries.

    Callbacks run in commit order; an error is raised from ``atomically``
    after all callbacks ran (the commit itself stands).
    """
    current_transaction("after_commit").add_callback(callback)


def transactional(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``fn`` so that each call runs atomically, or joins the caller's transaction."""

    @functools.wraps(fn)
    def run_atomically(*args: P.args, **kwargs: P.kwargs) -> R:
        tx = current.tx
        if tx is not None:
            return _join(tx, fn, args, kwargs)
        return _run_blocking(_Run(fn, args, kwargs, None, False))

    return run_atomically
