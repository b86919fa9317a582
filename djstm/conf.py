"""djstm's settings: the ``DJSTM`` dict in Django settings, with defaults for every key."""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "djstm_setting", "postgresql_database"]

#: Every key ``settings.DJSTM`` may hold, with its default.
DEFAULTS: dict[str, Any] = {
    # The CHANNEL_LAYERS alias that carries change notifications between processes.
    "CHANNEL_LAYER": "default",
    # Seconds after which a transaction blocked in retry on distributed DVars re-checks the database,
    # in case a notification was lost.
    "POLL_INTERVAL": 2.0,
    # How distributed stores commit unless atomically(lock=...) says otherwise.
    "LOCK": "auto",
    # Seconds a distributed commit waits for a row lock before it gives up and re-runs.
    "LOCK_TIMEOUT": 5.0,
    # How often a transaction is re-run after a database failure worth re-running before djstm gives up.
    "DATABASE_RETRIES": 5,
    # The database alias whose DVars the admin shows and edits, and live pages (djstm.consumers) follow.
    "ADMIN_DATABASE": "default",
    # Who may follow which DVar over a websocket: a callable (user, store, name) -> bool, or its dotted path.
    "CAN_READ": "djstm.consumers.staff_may_read",
    # The database aliases distributed stores use, so `manage.py check` can verify them before any store
    # opens (optional; with_store checks each database as it opens a store anyway).
    "DISTRIBUTED_DATABASES": [],
}


def djstm_setting(key: str) -> Any:
    """The value of ``settings.DJSTM[key]``, or its default."""
    from django.conf import settings

    configured = getattr(settings, "DJSTM", None) or {}
    return configured.get(key, DEFAULTS[key])


def postgresql_database(dsn: str, **overrides: Any) -> dict[str, Any]:
    """A ``settings.DATABASES`` entry for the PostgreSQL URL ``dsn`` (``postgresql://user:pw@host:port/name``).

    For settings files and scripts that take the server from one environment variable.
    """
    from urllib.parse import urlsplit

    url = urlsplit(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/") or "postgres",
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
        **overrides,
    }
