"""Django set-up for stores: a minimal configuration for plain scripts, an alias per store file, and the schema.

A plain script that never configured Django gets a private configuration
holding only djstm. A store opened by file path gets its own database alias
(named after the file) in whatever configuration is active.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import django
from django.apps import apps
from django.conf import settings
from django.db import connections

from ..errors import StoreUnavailable

__all__ = ["ensure_django", "alias_for_sqlite_file", "describe_database", "vendor_of", "ensure_schema"]

_setup_lock = threading.Lock()

# FULL makes each flush survive power loss, not only a crash of the process.
_STORE_FILE_PRAGMAS = "PRAGMA synchronous=FULL"


def ensure_django() -> None:
    """Make Django usable: configure a minimal project if nothing is configured, then set up apps."""
    with _setup_lock:
        if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
            settings.configure(
                INSTALLED_APPS=["djstm"],
                DATABASES={},
                USE_TZ=True,
                TIME_ZONE="UTC",
                DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            )
        if not apps.ready:
            django.setup()
    if not apps.is_installed("djstm"):
        raise StoreUnavailable(
            'this Django project does not have "djstm" in INSTALLED_APPS; add it there, '
            "then run `python manage.py migrate djstm`"
        )


def alias_for_sqlite_file(path: str | os.PathLike[str]) -> str:
    """Register (once) and return the database alias of the SQLite store file at ``path``."""

    resolved = str(Path(path).expanduser().resolve())
    alias = f"djstm-file:{resolved}"
    with _setup_lock:
        if alias not in connections.settings:
            connections.settings[alias] = {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": resolved,
                "OPTIONS": {"init_command": _STORE_FILE_PRAGMAS, "transaction_mode": "IMMEDIATE", "timeout": 30},
                "ATOMIC_REQUESTS": False,
                "AUTOCOMMIT": True,
                "CONN_MAX_AGE": 0,
                "CONN_HEALTH_CHECKS": False,
                "TIME_ZONE": None,
                "USER": "",
                "PASSWORD": "",
                "HOST": "",
                "PORT": "",
                "TEST": {"CHARSET": None, "COLLATION": None, "MIGRATE": True, "MIRROR": None, "NAME": None},
            }
    return alias


def vendor_of(alias: str) -> str:

    return connections[alias].vendor


def describe_database(alias: str) -> str:
    """A human name for the database behind ``alias``: the file path for SQLite, else the alias."""

    if alias.startswith("djstm-file:"):
        return alias.removeprefix("djstm-file:")
    settings_dict = connections.settings[alias]
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"database {alias!r} ({settings_dict['NAME']})"
    return f"database {alias!r}"


def ensure_schema(alias: str, *, create: bool) -> None:
    """Make sure the ``djstm_dvar`` table exists on ``alias``.

    With ``create`` (a store file djstm owns) missing migrations are applied,
    without emitting ``post_migrate`` (other apps' tables have no place in a
    store file). Otherwise a missing table is an error telling how to migrate.
    """

    from django.db.migrations.executor import MigrationExecutor  # needs the app registry ready

    connection = connections[alias]
    if create:
        # Write-ahead logging lets readers load DVars while the writer flushes; the mode is kept in the file.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
    if "djstm_dvar" in connection.introspection.table_names():
        return
    if not create:
        raise StoreUnavailable(
            f"{describe_database(alias)} has no djstm_dvar table; run "
            f"`python manage.py migrate djstm --database {alias}` first"
        )
    executor = MigrationExecutor(connection)
    targets = [node for node in executor.loader.graph.leaf_nodes() if node[0] == "djstm"]
    executor.migrate(targets)
