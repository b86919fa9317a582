"""Running ``after_commit`` callbacks once each, in commit order across threads.

A committing transaction that has callbacks takes a ticket while it holds the
commit lock, so ticket order is commit order. After the commit it waits for
its turn, runs its callbacks and lets the next ticket go. A callback that
itself commits a transaction with callbacks runs those at once, nested (the
thread would otherwise wait for its own turn forever); such nested callbacks
may therefore run before those of transactions that committed in between.
Callbacks must not block on another thread's later commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ._context import current

__all__ = ["CallbackOrder"]


class CallbackOrder:
    def __init__(self) -> None:
        self._turn = threading.Condition(threading.Lock())
        self._issued = 0
        self._serving = 0
        self._done_out_of_turn: set[int] = set()

    def take_ticket(self) -> int:
        """Issue the next ticket; the caller holds the commit lock."""
        ticket = self._issued
        self._issued += 1
        return ticket

    def run(self, ticket: int, callbacks: list[Callable[[], object]]) -> None:
        """Run ``callbacks`` in order when ``ticket``'s turn comes; re-raise the first error after running all."""
        nested = current.running_callbacks
        if not nested:
            with self._turn:
                self._turn.wait_for(lambda: self._serving == ticket)
        current.running_callbacks = True
        first_error: BaseException | None = None
        try:
            for callback in callbacks:
                try:
                    callback()
                except BaseException as error:  # the others still run once each, as promised
                    if first_error is None:
                        first_error = error
        finally:
            current.running_callbacks = nested
            with self._turn:
                self._done_out_of_turn.add(ticket)
                while self._serving in self._done_out_of_turn:
                    self._done_out_of_turn.remove(self._serving)
                    self._serving += 1
                self._turn.notify_all()
        if first_error is not None:
            raise first_error
