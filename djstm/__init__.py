"""djstm: Haskell's ``stm`` API over in-memory, durable, large and distributed variables.

Importing ``djstm`` does not import Django; opening a store does. Every public
name is listed in ``__all__`` and defined in exactly one submodule.
"""

from .errors import (
    DVarDecodeError,
    DVarNotFound,
    DVarTypeError,
    InvalidName,
    NoTransaction,
    RetryWithNothingRead,
    StoreClosed,
    StoreCorrupt,
    StoreLocked,
    StoreUnavailable,
    STMError,
    Timeout,
)
from .stm import TVar, aatomically, after_commit, atomically, check, or_else, retry, transactional
from .stores import with_store
from .stores.dvar import DVar

__all__ = [
    "TVar",
    "DVar",
    "with_store",
    "atomically",
    "aatomically",
    "retry",
    "check",
    "or_else",
    "after_commit",
    "transactional",
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
