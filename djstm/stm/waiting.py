"""Blocking in ``retry``: registering on variables, waking, unregistering.

A blocked transaction registers one waiter on every variable it touched and,
under the same commit lock, checks that none of them changed since it read
them. A commit installs new states and collects the waiters under that lock,
so either the commit happened before registration (the check sees it and the
transaction re-runs at once) or after (the commit wakes the waiter): no
wake-up is lost. Waiters are woken in registration order.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .transaction import commit_lock

__all__ = ["ThreadWaiter", "AsyncWaiter", "register", "unregister"]


class ThreadWaiter:
    """Wakes a thread blocked in ``atomically``."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AsyncWaiter:
    """Wakes a task blocked in ``aatomically`` from whichever thread commits."""

    __slots__ = ("_loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:
            pass  # the loop is closed, so the task that waited on it is gone too


def register(waiter: Any, watched: dict[Any, int]) -> bool:
    """Register ``waiter`` on every watched variable unless one already changed.

    Returns False (registering nothing) if a variable has a newer version than
    the transaction saw: it must re-run now instead of sleeping.
    """
    with commit_lock:
        for tvar, version in watched.items():
            if tvar._state[0] != version:
                return False
        for tvar in watched:
            tvar._waiters[waiter] = None
    return True


def unregister(waiter: Any, watched: dict[Any, int]) -> None:
    with commit_lock:
        for tvar in watched:
            tvar._waiters.pop(waiter, None)
