"""What every store shares: one live DVar per name, type checks, and the messages that go with them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..codecs import Codec, codec_for, codec_from_tag
from ..errors import DVarDecodeError, DVarNotFound, DVarTypeError, STMError, StoreClosed
from ..names import Name, canonical_name
from ..stm._context import in_event_loop
from .dvar import DVar

__all__ = ["StoreBase", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "<no default>"


MISSING: Any = _Missing()


def refuse_in_event_loop(what: str) -> None:
    """Django forbids database work in a coroutine; say so in djstm's words, with the way out."""
    if not in_event_loop():
        return
    raise STMError(
        f"{what} touches the database, which cannot be done directly in a coroutine; do it inside "
        "`await djstm.aatomically(...)`, or wrap it with asgiref's sync_to_async"
    )


class StoreBase:
    """A named set of DVars; subclasses say where the values live (``_load_or_create``)."""

    name: str
    where: str  # the database, for messages
    closed: bool

    def __init__(self, name: str, where: str, release: Callable[[Any], None]) -> None:
        self._release = release  # ends one with_store use (the registry closes the store after the last)
        self.name = name
        self.where = where
        self.closed = False  # read by Transaction.commit: a closed store refuses commits
        self._dvars: dict[str, DVar[Any]] = {}
        self._opening = threading.Lock()

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
        if isinstance(type, Codec):  # djstm's own tools pass the codec a stored type tag names
            if default is not MISSING:
                type.dumps(default)  # raises DVarTypeError if the default does not fit
            return type
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
        raise NotImplementedError

    def _codec_of_row(self, name: Name, type: Any, default: Any, type_tag: str) -> Codec:
        """The codec to read a stored row with: from ``type``/``default`` if given (which must match), else the tag."""
        if type is None and default is MISSING:
            codec = codec_from_tag(type_tag)
            if codec is None:
                raise DVarTypeError(
                    f"DVar {name!r} of store {self.name!r} has type {type_tag}, which this process has not "
                    "used yet; pass type= (the class) when opening it"
                )
            return codec
        codec = self._codec_for(name, type, default)
        if codec.tag != type_tag:
            raise self._type_mismatch(name, type_tag, codec.tag)
        return codec

    def _decode(self, name: Name, codec: Codec, text: str) -> Any:
        try:
            return codec.loads(text)
        except DVarDecodeError as error:
            raise DVarDecodeError(
                f"DVar {name!r} of store {self.name!r} ({self.where}) does not decode as {codec.tag}: {error}"
            ) from None

    def _not_found(self, name: Name) -> DVarNotFound:
        return DVarNotFound(f"DVar {name!r} is not in store {self.name!r} ({self.where}); pass a default to create it")

    def _check_open(self) -> None:
        if self.closed:
            raise StoreClosed(f"store {self.name!r} in {self.where} is closed; open it again with djstm.with_store")

    def release(self) -> None:
        """End one ``with_store`` use; the last use to end closes the store."""
        self._release(self)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
