"""Every error djstm raises on purpose; all derive from :class:`STMError`.

The hierarchy says what the caller should do: fix the call (``NoTransaction``,
``InvalidName``, ``DVarTypeError``), wait or give up (``Timeout``), or look at
the store (``StoreLocked``, ``StoreCorrupt``, ``StoreUnavailable``). Messages name the variable, the
store and the fix. This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

__all__ = [
    "STMError",
    "NoTransaction",
    "Timeout",
    "RetryWithNothingRead",
    "DVarTypeError",
    "DVarDecodeError",
    "InvalidName",
    "StoreLocked",
    "StoreCorrupt",
    "StoreClosed",
    "StoreUnavailable",
    "DVarNotFound",
]


class STMError(Exception):
    """Base class of every djstm error."""


class NoTransaction(STMError):
    """A transactional operation (``read``, ``write``, ``retry``…) ran outside ``atomically``."""


class Timeout(STMError, TimeoutError):
    """``atomically(..., timeout=…)`` did not finish in time; nothing it did was committed."""


class RetryWithNothingRead(STMError):
    """``retry()`` in a transaction that read no variable: nothing could ever wake it."""


class DVarTypeError(STMError, TypeError):
    """A DVar was opened with another type than the store records, or given a value that does not fit its type."""


class StoreCorrupt(STMError):
    """A store file or row is not what djstm wrote; it has been left untouched."""


class DVarDecodeError(StoreCorrupt):
    """One stored row does not decode as its DVar's type; the rest of the store stays usable."""


class InvalidName(STMError, ValueError):
    """A DVar or store name is empty, holds control characters, is too long, or has a part of the wrong kind."""


class StoreLocked(STMError):
    """Another process holds this single-process store open."""


class StoreClosed(STMError):
    """A DVar or store was used after its ``with_store`` block ended."""


class StoreUnavailable(STMError):
    """The store cannot be opened as asked: a path that cannot hold it, or a database not set up for djstm."""


class DVarNotFound(STMError, KeyError):
    """``store.dvar(name)`` without a default, for a name the store does not have."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""
