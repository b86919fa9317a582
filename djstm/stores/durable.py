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

from ..backends.rows import commits_independently, fold_log_into_file, load_row, upsert_rows
from ..codecs import Codec, codec_for, codec_from_tag
from ..errors import DVarDecodeError, DVarNotFound, DVarTypeError, STMError, StoreClosed
from ..names import Name, canonical_name
from ..stm._context import in_event_loop
from ..stm.transaction import commit_lock
from .dvar import DVar
from .write_behind import WriteBehind

__all__ = ["DurableStore", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "<no default>"


MISSING: Any = _Missing()


def _refuse_in_event_loop(what: str) -> None:
    """Django forbids database work in a coroutine; say so in djstm's words, with the way out."""
    if not in_event_loop():
        return
    raise STMError(
        f"{what} touches the database, which cannot be done directly in a coroutine; do it inside "
        "`await djstm.aatomically(...)`, or wrap it with asgiref's sync_to_async"
    )


class DurableStore:
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
        self.alias = alias
        self._owns_database = owns_database  # a store file djstm opened, not a database of the project
        self.name = name
        self.where = where  # the database, for messages
        self.closed = False  # read by Transaction.commit: a closed store refuses commits
        self._release = release
        self._on_close = on_close
        self._closing = closing  # held while closing, so the same store cannot be reopened half-closed
        self._dvars: dict[str, DVar[Any]] = {}
        self._opening = threading.Lock()
        self._writer = WriteBehind(
            self, self._write_rows, self._can_write_here, self._writer_exits, f"store {name!r} in {where}"
        )
        # Transaction.commit hands each committed write set straight to the writer.
        self.accept_commit = self._writer.accept_commit

    # -- DVars ---------------------------------------------------------------

    def dvar(self, name: Name, default: Any = MISSING, *, type: Any = None) -> DVar[Any]:
        """Return the DVar ``name``, creating it with ``default`` if the store does not have it.

        ``type`` is needed when the default does not tell it (``list[str]``,
        ``int | None``…). Raises ``DVarTypeError`` if the store recorded
        another type for this name, ``InvalidName`` for a bad name.
        """
        self._check_open()
        key = canonical_name(name)
        existing = self._dvars.get(key)
        if existing is not None:
            self._check_same_type(existing, type, default)
            return existing
        with self._opening:
            existing = self._dvars.get(key)
            if existing is not None:
                self._check_same_type(existing, type, default)
                return existing
            dvar = self._load_or_create(name, key, default, type)
            self._dvars[key] = dvar
            return dvar

    def _codec_for(self, name: Name, type: Any, default: Any) -> Codec:
        try:
            if default is MISSING:
                return codec_for(type)
            return codec_for(type, default)
        except DVarTypeError as error:
            raise DVarTypeError(f"DVar {name!r} of store {self.name!r}: {error}") from None

    def _check_same_type(self, dvar: DVar[Any], type: Any, default: Any) -> None:
        if type is None and default is MISSING:
            return
        wanted = self._codec_for(dvar.name, type, default)
        if wanted.tag != dvar.codec.tag:
            raise self._type_mismatch(dvar.name, dvar.codec.tag, wanted.tag)

    def _type_mismatch(self, name: Name, stored: str, wanted: str) -> DVarTypeError:
        return DVarTypeError(
            f"DVar {name!r} of store {self.name!r} has type {stored}, but was opened as {wanted}; "
            f"open it with type={stored}, or use another name for the new type"
        )

    def _load_or_create(self, name: Name, key: str, default: Any, type: Any) -> DVar[Any]:
        _refuse_in_event_loop(f"store.dvar({name!r}) (a DVar not loaded yet)")
        row = load_row(self.alias, self.name, key)
        if row is None:
            if default is MISSING:
                raise DVarNotFound(
                    f"DVar {name!r} is not in store {self.name!r} ({self.where}); pass a default to create it"
                )
            codec = self._codec_for(name, type, default)  # refuses a default that does not fit
            text = codec.dumps(default)
            dvar = DVar(self, name, key, codec, codec.loads(text) if codec.mutable else default, text, 0)
            with commit_lock:  # recorded at a commit boundary, before any write to it can commit
                self._check_open()  # close() sets closed under this lock: no row slips in after the last flush
                self._writer.accept_creation(dvar, text)
            return dvar
        if type is None and default is MISSING:
            codec = codec_from_tag(row.type_tag)
            if codec is None:
                raise DVarTypeError(
                    f"DVar {name!r} of store {self.name!r} has type {row.type_tag}, which this process has not "
                    "used yet; pass type= (the class) when opening it"
                )
        else:
            codec = self._codec_for(name, type, default)
            if codec.tag != row.type_tag:
                raise self._type_mismatch(name, row.type_tag, codec.tag)
        try:
            value = codec.loads(row.value)
        except DVarDecodeError as error:
            raise DVarDecodeError(
                f"DVar {name!r} of store {self.name!r} ({self.where}) does not decode as {codec.tag}: {error}"
            ) from None
        return DVar(self, name, key, codec, value, row.value, row.version)

    # -- durability and life cycle --------------------------------------------

    def wait_durable(self, receipt: int | None) -> None:
        """Called after a ``durable=True`` commit with what ``accept_commit`` returned."""
        if receipt is not None:
            self._writer.wait_flushed(receipt)

    def sync(self) -> None:
        """Return once everything committed to this store so far is on disk."""
        _refuse_in_event_loop("store.sync()")
        self._writer.wait_flushed()

    def release(self) -> None:
        """End one ``with_store`` use; the last use to end closes the store."""
        self._release(self)

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

    def _check_open(self) -> None:
        if self.closed:
            raise StoreClosed(f"store {self.name!r} in {self.where} is closed; open it again with djstm.with_store")

    def _write_rows(self, rows: Any) -> None:
        upsert_rows(self.alias, self.name, rows)

    def _can_write_here(self) -> bool:
        return commits_independently(self.alias)

    def _writer_exits(self) -> None:
        try:
            fold_log_into_file(self.alias)
        finally:
            connections[self.alias].close()

    def __enter__(self) -> DurableStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._dvars)} DVars loaded"
        return f"<DurableStore {self.name!r} in {self.where}, {state}>"
