"""The STM engine: ``TVar``, ``atomically``, ``retry``, ``or_else`` and friends.

Pure Python with no Django import; usable on its own (``import djstm.stm``).
"""

from .runner import aatomically, after_commit, atomically, check, or_else, retry, transactional
from .tvar import TVar

__all__ = [
    "TVar",
    "atomically",
    "aatomically",
    "retry",
    "check",
    "or_else",
    "after_commit",
    "transactional",
]
