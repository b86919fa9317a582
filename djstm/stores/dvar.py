"""``DVar``: a ``TVar`` that belongs to a store, has a type, and hands out snapshots.

Its committed state holds ``(value, text)``: the value, and its encoding that
the store writes. The value a DVar holds is private: ``read`` and ``peek``
return it as-is only for immutable types and a fresh copy otherwise, and
``write`` keeps a copy of what it was given, so mutating a value in place
never changes what is stored or what another transaction sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..codecs import Codec
from ..errors import DVarTypeError, NoTransaction, StoreClosed
from ..names import Name
from ..stm._context import current
from ..stm.tvar import TVar

if TYPE_CHECKING:
    from .durable import DurableStore

__all__ = ["DVar"]

T = TypeVar("T")


class DVar(TVar[T]):
    """A typed, named transactional variable kept by a store (see ``Store.dvar``)."""

    __slots__ = ("_store", "name", "key", "codec", "row_version")

    def __init__(self, store: DurableStore, name: Name, key: str, codec: Codec, value: Any, text: str, row_version: int) -> None:
        super().__init__((value, text))
        self._store = store
        self.name = name  # as the program gave it: a str or a tuple
        self.key = key  # canonical text: the row's name column, and the lock order
        self.codec = codec
        self.row_version = row_version  # committed writes so far; the row's version column

    @property
    def store(self) -> DurableStore:
        return self._store

    def read(self) -> T:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("read"))
        value = tx.read(self)[0]
        return self.codec.copy(value) if self.codec.mutable else value

    def write(self, value: T) -> None:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("write"))
        tx.write(self, self.encode(value))

    def peek(self) -> T:
        value = self._state[1][0]
        return self.codec.copy(value) if self.codec.mutable else value

    def encode(self, value: Any) -> tuple[Any, str]:
        """Return the ``(private value, text)`` state for ``value``, or raise naming this DVar."""
        if self._store.closed:
            raise StoreClosed(f"{self._describe()} was written after its store was closed; open the store again")
        try:
            text = self.codec.dumps(value)
        except DVarTypeError as error:
            raise DVarTypeError(f"cannot write to {self._describe()} of type {self.codec.tag}: {error}") from None
        if self.codec.mutable:
            value = self.codec.loads(text)
        return value, text

    def _describe(self) -> str:
        return f"DVar {self.name!r} of store {self._store.name!r}"
