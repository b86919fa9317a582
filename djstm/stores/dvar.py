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
from ..errors import DVarTypeError, NoTransaction
from ..names import Name
from ..stm._context import current
from ..stm.tvar import TVar

if TYPE_CHECKING:
    from .durable import DurableStore

__all__ = ["DVar"]

T = TypeVar("T")


class DVar(TVar[T]):
    """A typed, named transactional variable kept by a store; get one with ``store.dvar(name, default)``."""

    __slots__ = ("_store", "name", "key", "codec", "type_tag", "row_version", "_mutable", "_dumps", "_loads")

    def __init__(
        self, store: DurableStore, name: Name, key: str, codec: Codec, value: Any, text: str, row_version: int
    ) -> None:
        super().__init__((value, text))
        self._store = store
        self.name = name  # as the program gave it: a str or a tuple
        self.key = key  # canonical text: the row's name column, and the lock order
        self.codec = codec
        self.type_tag = codec.tag
        self.row_version = row_version  # committed writes so far; the row's version column
        self._mutable = codec.mutable
        self._dumps = codec.dumps  # bound once: write is a hot path
        self._loads = codec.loads

    @property
    def store(self) -> DurableStore:
        return self._store

    def read(self) -> T:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("read"))
        value = tx.read(self)[0]
        return self.codec.copy(value) if self._mutable else value

    def write(self, value: T) -> None:
        tx = current.tx
        if tx is None:
            raise NoTransaction(self._outside_message("write"))
        tx.write(self, self._encode(value))
        store = self._store
        if store not in tx.stores:
            tx.stores[store] = None  # enlist: the store takes part in the commit, or refuses it if closed
            if store.changed_signal.receivers:  # someone listens to djstm.signals.dvar_changed
                tx.announce(store, store.announce_commit)

    def _encode(self, value: Any) -> tuple[Any, str]:
        """``(value to keep, its text)``; the value kept is a private copy if the type is mutable."""
        try:
            text = self._dumps(value)
        except DVarTypeError as error:
            raise self._does_not_fit(error) from None
        return (self._loads(text) if self._mutable else value), text

    def peek(self) -> T:
        value = self._state[1][0]
        return self.codec.copy(value) if self._mutable else value

    def _does_not_fit(self, error: DVarTypeError) -> DVarTypeError:
        return DVarTypeError(f"cannot write to {self._describe()} of type {self.type_tag}: {error}")

    def _describe(self) -> str:
        return f"DVar {self.name!r} of store {self._store.name!r}"

    def __repr__(self) -> str:
        shown = repr(self._state[1][0])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"<{self._describe()} type={self.type_tag} version={self.row_version} value={shown}>"
