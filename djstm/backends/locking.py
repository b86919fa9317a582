"""The single-process lock of a durable store.

A durable store keeps its DVars in memory and writes them behind, so only one
process may have it open. For an SQLite database the lock is an ``lockf``
byte-range lock in a sidecar file ``<database>.djstm-lock``, one byte per
store name, released by the kernel when the process dies. The sidecar (not
the database itself) is locked because closing any descriptor of a file drops
all of a process's POSIX locks on it, which would break SQLite's own locking.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading

from ..errors import StoreLocked, StoreUnavailable

__all__ = ["StoreLease", "acquire_store_lease"]

# One descriptor per sidecar file for the whole process: closing a second one would drop every lock on it.
_sidecars: dict[str, tuple[int, int]] = {}  # path -> (fd, leases held)
_sidecars_lock = threading.Lock()


def _byte_for(store_name: str) -> int:
    return int.from_bytes(hashlib.blake2b(store_name.encode(), digest_size=7).digest(), "big")


class StoreLease:
    """Proof that this process holds a store; ``release()`` gives it up."""

    def __init__(self, sidecar: str, offset: int) -> None:
        self._sidecar = sidecar
        self._offset = offset

    def release(self) -> None:
        with _sidecars_lock:
            fd, held = _sidecars[self._sidecar]
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, self._offset)
            if held == 1:
                os.close(fd)
                del _sidecars[self._sidecar]
            else:
                _sidecars[self._sidecar] = (fd, held - 1)


def acquire_store_lease(database_file: str, store_name: str, where: str) -> StoreLease:
    """Lock store ``store_name`` of the SQLite file ``database_file`` for this process, or raise StoreLocked."""
    if not database_file or database_file == ":memory:" or "mode=memory" in database_file:
        raise StoreUnavailable(
            f"{where} is an in-memory SQLite database, which a durable store cannot write behind to; "
            "give the database a file NAME"
        )
    # Beside the real file, so that every spelling of its path (symlinks included) meets the same lock.
    # Hard links to one store file are not recognised as one file.
    sidecar = os.path.realpath(database_file) + ".djstm-lock"
    offset = _byte_for(store_name)
    with _sidecars_lock:
        fd, held = _sidecars.get(sidecar, (None, 0))
        if fd is None:
            fd = os.open(sidecar, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            if held == 0:
                os.close(fd)
            raise StoreLocked(
                f"store {store_name!r} in {where} is open in another process; a durable store "
                "serves one process at a time. Close it there (leave its with_store block or stop "
                "that process), or open another store name."
            ) from None
        _sidecars[sidecar] = (fd, held + 1)
    return StoreLease(sidecar, offset)
