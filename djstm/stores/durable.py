"""The durable store: DVars live in memory and are written behind to a database.

A commit touching only durable stores runs at in-memory speed; the store's
writer persists committed transactions in commit order. Only one process may
have a durable store open (``StoreLocked`` for a second). Within the process,
``dvar(name)`` returns the same live object for the same name for as long as
the store is open, so a commit through one reference wakes transactions
blocked on another.

A DVar's life here: *absent* (no row) → created with its default (its row
goes into the dirty set at once, so its type tag is recorded) → *dirty*
(committed in memory, row not yet flushed) → *flushed*. Closing the store
flushes and turns every DVar *closed*: reading still works, a transaction
that writes one raises ``StoreClosed`` and commits nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.db import connections

from ..backends.rows import (
    commits_independently,
    fold_log_into_file,
    load_row,
    upsert_rows,
)
from ..names import Name
from ..signals import dvar_changed
from ..stm.transaction import commit_lock
from .base import MISSING, StoreBase, refuse_in_event_loop
from .dvar import DVar
from .write_behind import WriteBehind

__all__ = ["DurableStore", "MISSING"]


class DurableStore(StoreBase):
    """A named set of DVars in one database, open in this process only."""

    mode = "durable"

    def __init__(
        self,
        *,
        alias: str,
        name: str,
        where: str,
        owns_database: bool,
        release: Callable[[DurableStore], None],
        on_close: Callable[[DurableStore], None],
        closing: threading.RLock,
    ) -> None:
        super().__init__(name, where, release)
        self.alias = alias
        self._owns_database = owns_database  # a store file djstm opened, not a database of the project
        self._on_close = on_close
        self._closing = closing  # held while closing, so the same store cannot be reopened half-closed
        self._writer = WriteBehind(
            self, self._write_rows, self._can_write_here, self._writer_exits, f"store {name!r} in {where}"
        )
        # Transaction.commit hands each committed write set straight to the writer.
        self.accept_commit = self._writer.accept_commit

    def _load_or_create(self, name: Name, key: str, default: Any, type: Any) -> DVar[Any]:
        refuse_in_event_loop(f"store.dvar({name!r}) (a DVar not loaded yet)")
        row = load_row(self.alias, self.name, key)
        if row is None:
            if default is MISSING:
                raise self._not_found(name)
            codec = self._codec_for(name, type, default)  # refuses a default that does not fit
            text = codec.dumps(default)
            dvar = DVar(self, name, key, codec, codec.loads(text) if codec.mutable else default, text, 0)
            with commit_lock:  # recorded at a commit boundary, before any write to it can commit
                self._check_open()  # close() sets closed under this lock: no row slips in after the last flush
                self._writer.accept_creation(dvar, text)
            return dvar
        codec = self._codec_of_row(name, type, default, row.type_tag)
        return DVar(self, name, key, codec, self._decode(name, codec, row.value), row.value, row.version)

    # -- durability and life cycle --------------------------------------------

    changed_signal = dvar_changed  # here, not imported by DVar: a plain `import djstm` imports no Django

    def announce_commit(self, tx: Any) -> None:
        """After a commit that wrote this store's DVars: send ``djstm.signals.dvar_changed``."""
        changes = [(dvar.key, dvar.row_version) for dvar in tx.writes if dvar._store is self]
        if changes:
            dvar_changed.send(sender=self, store=self.name, database=self.alias, changes=changes)

    def wait_durable(self, receipt: int | None) -> None:
        """Called after a ``durable=True`` commit with what ``accept_commit`` returned."""
        if receipt is not None:
            self._writer.wait_flushed(receipt)

    def sync(self) -> None:
        """Return once everything committed to this store so far is on disk."""
        refuse_in_event_loop("store.sync()")
        self._writer.wait_flushed()

    def close(self) -> None:
        """Flush and close now; later writes to this store's DVars raise ``StoreClosed``.

        Raises ``STMError`` if the last flush failed (the store is closed all the same).
        """
        with self._closing:
            if self.closed:
                return
            with commit_lock:  # no commit may slip in between the last flush and the close
                self.closed = True
                # Transactions blocked in retry on our DVars would never wake: wake them so they raise StoreClosed.
                waiters = [waiter for dvar in self._dvars.values() for waiter in dvar._waiters]
            for waiter in waiters:
                waiter.wake()
            try:
                self._writer.stop()
            finally:
                if self._owns_database:
                    connections[self.alias].close()  # this thread's connection to the file, if it loaded DVars
                self._on_close(self)

    def _write_rows(self, rows: Any) -> None:
        upsert_rows(self.alias, self.name, rows)

    def _can_write_here(self) -> bool:
        return commits_independently(self.alias)

    def _writer_exits(self) -> None:
        try:
            fold_log_into_file(self.alias)
        finally:
            connections[self.alias].close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._dvars)} DVars loaded"
        return f"<DurableStore {self.name!r} in {self.where}, {state}>"
