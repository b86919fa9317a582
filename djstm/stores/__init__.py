"""Opening stores: ``with_store`` and the process-wide table of open stores.

Opening the same store twice in one process gives the same object (so DVar
identity holds across both); it closes when the last ``with_store`` block
using it ends, or at interpreter exit, flushing everything committed.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from typing import TYPE_CHECKING

from ..errors import STMError, StoreUnavailable
from ..names import check_store_name

if TYPE_CHECKING:
    from .distributed import DistributedStore
    from .durable import DurableStore

__all__ = ["MODES", "open_store_in", "with_store"]

MODES = ("durable", "large", "distributed")

# Keyed by (real path of the database file, store name) for durable stores, by (database identity, store
# name) for distributed ones: one store object per database and name, whichever alias opened it.
_open_stores: dict[tuple[str, str], DurableStore | DistributedStore] = {}
_users: dict[DurableStore, int] = {}  # with_store uses not yet ended, per open store
_registry_lock = threading.RLock()


def _forget(store: DurableStore) -> None:
    with _registry_lock:
        for key, open_store in list(_open_stores.items()):
            if open_store is store:
                del _open_stores[key]
        _users.pop(store, None)


def _release(store: DurableStore) -> None:
    with _registry_lock:  # held while closing: with_store waits rather than reopen a half-closed store
        if store not in _users:  # already closed
            return
        _users[store] -= 1
        if _users[store] <= 0:
            store.close()


def _close_all() -> None:
    with _registry_lock:
        stores = list(_open_stores.values())
    for store in stores:
        store.close()


atexit.register(_close_all)


def _check_store_path(path: str | os.PathLike[str]) -> None:
    text = os.fspath(path)
    if text == ":memory:" or text.startswith("file:"):
        raise StoreUnavailable(
            f"with_store({text!r}): a durable store needs a file on disk; give a file path such as 'project.sqlite3'"
        )
    if os.path.isdir(text):
        raise StoreUnavailable(f"with_store({text!r}): that is a directory; give a file path inside it")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise StoreUnavailable(f"with_store({text!r}): the directory {directory} does not exist; create it first")


def with_store(
    path: str | os.PathLike[str] | None = None,
    *,
    database: str | None = None,
    mode: str = "durable",
    name: str = "default",
    lock: str | None = None,
    poll_interval: float | None = None,
) -> DurableStore | DistributedStore:
    """Open store ``name`` in the SQLite file ``path`` or the Django database ``database``.

    Use it as a context manager (the store is flushed and closed when the
    block ends) or keep the returned store open until the process exits.
    A file that does not exist is created; one that is not a djstm store
    raises ``StoreCorrupt`` and is left untouched. ``mode="distributed"``
    opens a store on a PostgreSQL alias that any number of processes share;
    ``lock`` (its default locking) and ``poll_interval`` (seconds between
    re-checks of rows that blocked transactions wait on) apply to it, and
    default to ``settings.DJSTM``.
    """
    if (path is None) == (database is None):
        raise TypeError("with_store() takes either a file path or database=ALIAS, not both or neither")
    check_store_name(name)
    if mode not in MODES:
        raise ValueError(f"with_store(mode={mode!r}): mode must be one of {', '.join(map(repr, MODES))}")
    if mode == "distributed":
        if database is None:
            raise TypeError(
                'with_store(mode="distributed") keeps DVars in a PostgreSQL database that many processes share; '
                "pass database=ALIAS (a key of settings.DATABASES) instead of a file path"
            )
        return _open_distributed(database, name, lock, poll_interval)
    if lock is not None or poll_interval is not None:
        raise TypeError(f'with_store(mode={mode!r}): lock= and poll_interval= apply to mode="distributed" only')
    if mode != "durable":
        raise STMError(f'with_store(mode={mode!r}) is not available in this version of djstm; use mode="durable"')

    from ..backends.connections import (
        alias_for_sqlite_file,
        describe_database,
        ensure_django,
        ensure_schema,
    )
    from ..backends.locking import acquire_store_lease
    from ..backends.sqlite_files import inspect_store_file
    from .durable import DurableStore

    ensure_django()
    from django.db import connections

    if path is not None:
        _check_store_path(path)
        alias = alias_for_sqlite_file(path)
        database_file = connections.settings[alias]["NAME"]
        inspect_store_file(database_file)
        where, create = database_file, True
    else:
        _known_alias(database)
        alias, where, create = database, describe_database(database), False
        vendor = connections[alias].vendor
        if vendor != "sqlite":
            raise StoreUnavailable(
                f"a durable store needs an SQLite database, and {where} is {vendor}; "
                "give a file path, or a database alias whose ENGINE is SQLite"
            )
        database_file = connections[alias].settings_dict["NAME"]

    with _registry_lock:
        key = (os.path.realpath(database_file), name)
        store = _open_stores.get(key)
        if store is not None and not store.closed:
            _users[store] += 1
            return store
        lease = acquire_store_lease(str(database_file), name, where)
        try:
            ensure_schema(alias, create=create)
        except BaseException:
            lease.release()
            raise

        def closed(store: DurableStore) -> None:
            lease.release()
            _forget(store)

        store = DurableStore(
            alias=alias,
            name=name,
            where=where,
            owns_database=create,
            release=_release,
            on_close=closed,
            closing=_registry_lock,
        )
        return _register(key, store)


def _register(key: tuple[str, str], store: DurableStore | DistributedStore) -> DurableStore | DistributedStore:
    _open_stores[key] = store  # the registry lock is held
    _users[store] = 1
    return store


def _known_alias(database: str) -> None:
    from django.db import connections

    if database not in connections.settings:
        known = ", ".join(map(repr, connections.settings)) or "none"
        raise StoreUnavailable(f"with_store(database={database!r}): no such alias in settings.DATABASES (known: {known})")


def _open_distributed(database: str, name: str, lock: str | None, poll_interval: float | None) -> DistributedStore:
    from ..backends.connections import describe_database, ensure_django
    from ..backends.postgres import check_can_serve
    from ..conf import djstm_setting
    from ..notify import change_feed, store_group
    from ..stm.runner import LOCK_MODES
    from .distributed import DistributedStore

    ensure_django()
    from django.db import connections

    from .base import refuse_in_event_loop

    refuse_in_event_loop(f"with_store(database={database!r}, mode='distributed')")
    lock = djstm_setting("LOCK") if lock is None else lock
    if lock not in LOCK_MODES:
        raise ValueError(f"with_store(lock={lock!r}): lock must be one of {', '.join(map(repr, LOCK_MODES))}")
    poll_interval = djstm_setting("POLL_INTERVAL") if poll_interval is None else poll_interval
    if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
        raise ValueError(f"with_store(poll_interval={poll_interval!r}): give a positive number of seconds")
    _known_alias(database)
    where = describe_database(database)
    # The database's name identifies it across processes whatever alias or host spelling they use; two
    # servers with equal names only share notifications, which costs a re-check, never a wrong value.
    identity = connections.settings[database]["NAME"]
    with _registry_lock:
        # One store per alias: a transaction joins the caller's transaction.atomic() on the store's alias.
        key = (f"distributed-alias:{database}", name)
        store = _open_stores.get(key)
        if store is not None and not store.closed:
            _users[store] += 1
            return store
        check_can_serve(database, where)
        group = store_group(identity, name)
        store = DistributedStore(
            alias=database,
            name=name,
            where=where,
            database=identity,
            lock=lock,
            poll_interval=float(poll_interval),
            lock_timeout=float(djstm_setting("LOCK_TIMEOUT")),
            database_retries=int(djstm_setting("DATABASE_RETRIES")),
            feed=functools.partial(change_feed, djstm_setting("CHANNEL_LAYER")),
            group=group,
            release=_release,
            on_close=_forget,
            closing=_registry_lock,
        )
        return _register(key, store)


def open_store_in(database: str, name: str) -> DurableStore | DistributedStore:
    """Open store ``name`` of database alias ``database`` in the mode its engine serves.

    Distributed on PostgreSQL, durable on SQLite: what djstm's own tools (the admin, ``manage.py djstm``)
    use to reach a store they find in the table. Release it (or use ``with``) when done.
    """
    from ..backends.connections import ensure_django, vendor_of

    ensure_django()
    _known_alias(database)
    mode = "distributed" if vendor_of(database) == "postgresql" else "durable"
    return with_store(database=database, mode=mode, name=name)
