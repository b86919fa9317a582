"""``TVar``: a transactional variable held in memory (Haskell's ``TVar``).

A TVar's committed state is one tuple ``(version, value)`` replaced as a whole
at commit, so a reader outside any lock always sees a matching pair. The
version is the global clock value of the commit that wrote it (0 for the value
it was created with). A TVar's initial value counts as committed the moment it
is constructed, whatever transaction is running: a TVar made inside a block
that is later rolled back keeps existing and reads as the value it was created
with (writes to it inside the rolled-back block are undone like any other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..errors import NoTransaction
from ._context import current

__all__ = ["TVar"]

T = TypeVar("T")


class TVar(Generic[T]):
    """A transactional variable; ``read``/``write``/``modify`` inside ``atomically``, ``peek`` anywhere."""

    __slots__ = ("_state", "_waiters", "label", "__weakref__")

    # A store that persists this variable's commits; plain TVars have none (see DVar).
    _store: Any = None

    def __init__(self, value: T, *, label: str | None = None) -> None:
        self._state: tuple[int, Any] = (0, value)
        # Waiters blocked in retry on this variable, in registration order (dict as ordered set).
        self._waiters: dict[Any, None] = {}
        self.label = label

    def read(self) -> T:
        """Return the value as seen by the running transaction."""
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("read"))
        return tx.read(self)

    def write(self, value: T) -> None:
        """Set the value for the running transaction; others see it once it commits."""
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("write"))
        tx.write(self, value)

    def modify(self, function: Callable[[T], T]) -> None:
        """Replace the value with ``function(value)`` inside the running transaction."""
        self.write(function(self.read()))

    def peek(self) -> T:
        """Return the last committed value without a transaction (Haskell's ``readTVarIO``)."""
        return self._state[1]

    def _describe(self) -> str:
        return f"TVar {self.label!r}" if self.label else f"TVar at {id(self):#x}"

    def _outside_message(self, operation: str) -> str:
        return (
            f"{self._describe()}.{operation}() was called outside a transaction; "
            f"call it inside djstm.atomically(...), or use .peek() to see the committed value"
        )

    def __repr__(self) -> str:
        version, value = self._state
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"<{self._describe()} version={version} value={shown}>"
