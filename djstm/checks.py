"""Django system checks for djstm's settings (``manage.py check``), with ids ``djstm.E0xx`` / ``djstm.W0xx``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .conf import DEFAULTS

__all__ = ["check_settings"]

_LOCKS = ("optimistic", "pessimistic", "auto")


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check ``settings.DJSTM`` and the channel layer it names."""
    configured = getattr(settings, "DJSTM", None)
    if configured is None:
        configured = {}
    if not isinstance(configured, dict):
        return [checks.Error("settings.DJSTM must be a dict", hint=f"keys: {', '.join(DEFAULTS)}", id="djstm.E001")]
    problems: list[checks.CheckMessage] = []
    unknown = sorted(set(configured) - set(DEFAULTS))
    if unknown:
        problems.append(
            checks.Error(
                f"settings.DJSTM has unknown keys: {', '.join(map(repr, unknown))}",
                hint=f"the keys djstm reads are: {', '.join(DEFAULTS)}",
                id="djstm.E002",
            )
        )
    merged = {**DEFAULTS, **configured}
    if merged["LOCK"] not in _LOCKS:
        problems.append(
            checks.Error(f"settings.DJSTM['LOCK'] is {merged['LOCK']!r}", hint=f"use one of {_LOCKS}", id="djstm.E003")
        )
    for key in ("POLL_INTERVAL", "LOCK_TIMEOUT"):
        if not _positive_number(merged[key]):
            problems.append(
                checks.Error(f"settings.DJSTM[{key!r}] is {merged[key]!r}", hint="give a positive number of seconds",
                             id="djstm.E004")
            )
    retries = merged["DATABASE_RETRIES"]
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        problems.append(
            checks.Error(f"settings.DJSTM['DATABASE_RETRIES'] is {retries!r}", hint="give a whole number, 0 or more",
                         id="djstm.E005")
        )
    if merged["ADMIN_DATABASE"] not in settings.DATABASES:
        problems.append(
            checks.Error(f"settings.DJSTM['ADMIN_DATABASE'] is {merged['ADMIN_DATABASE']!r}, not a database alias",
                         hint=f"use one of {', '.join(settings.DATABASES)}", id="djstm.E006")
        )
    distributed = merged["DISTRIBUTED_DATABASES"]
    problems.extend(_check_distributed_databases(distributed))
    problems.extend(_check_channel_layer(merged["CHANNEL_LAYER"], distributed))
    return problems


def _check_distributed_databases(aliases: Any) -> list[checks.CheckMessage]:
    if not isinstance(aliases, (list, tuple)):
        return [checks.Error("settings.DJSTM['DISTRIBUTED_DATABASES'] must be a list of database aliases",
                             id="djstm.E007")]
    problems = []
    for alias in aliases:
        database = settings.DATABASES.get(alias)
        if database is None:
            problems.append(checks.Error(f"DJSTM['DISTRIBUTED_DATABASES'] names {alias!r}, which is not in "
                                         "settings.DATABASES", hint="add it there, or remove it", id="djstm.E007"))
        elif not database.get("ENGINE", "").endswith("postgresql"):
            problems.append(checks.Error(
                f"database {alias!r} cannot serve distributed stores: its ENGINE is {database.get('ENGINE')}",
                hint="distributed stores need django.db.backends.postgresql", id="djstm.E008"))
        elif database.get("OPTIONS", {}).get("server_side_binding") is True:
            problems.append(checks.Error(
                f"database {alias!r} cannot serve distributed stores with OPTIONS['server_side_binding']",
                hint="remove server_side_binding: djstm sends a lock and its statement in one round trip",
                id="djstm.E008"))
    return problems


def _check_channel_layer(alias: str, distributed: Any) -> list[checks.CheckMessage]:
    if not distributed and not any(db.get("ENGINE", "").endswith("postgresql") for db in settings.DATABASES.values()):
        return []  # no database a distributed store could use: notifications do not matter
    layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    if alias not in layers:
        return [
            checks.Warning(
                f"distributed stores notify other processes through CHANNEL_LAYERS[{alias!r}], which is not "
                "configured; blocked transactions will only notice other processes' commits by polling",
                hint="configure channels_redis.pubsub.RedisPubSubChannelLayer there, or set DJSTM['CHANNEL_LAYER']",
                id="djstm.W001",
            )
        ]
    if layers[alias].get("BACKEND", "").endswith("InMemoryChannelLayer"):
        return [
            checks.Warning(
                f"CHANNEL_LAYERS[{alias!r}] is the in-memory layer, which reaches only its own process; with "
                "several workers on a distributed store, their wake-ups will wait for polling",
                hint="use channels_redis.pubsub.RedisPubSubChannelLayer when more than one process shares a store",
                id="djstm.W002",
            )
        ]
    return []
