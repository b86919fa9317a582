"""Live DVar values over a websocket: ``DVarConsumer`` (route it, e.g. at ``/ws/djstm/``).

The page sends ``{"subscribe": [{"store": S, "name": N} | {"store": S, "prefix": P}, ...],
"versions": {"S:N": version, ...}}``. The consumer answers with a snapshot (every subscribed DVar
newer than the versions the page says it has), then every committed change as
``{"store", "name", "version", "value"}`` (the value as JSON). Changes arrive through the channel layer
(``DJSTM["CHANNEL_LAYER"]``), which delivers at most once, so the consumer never trusts it alone: it
re-reads the subscribed rows every ``POLL_INTERVAL`` and sends what is newer, and it never sends a
version older than one it sent. Who may read what: ``DJSTM["CAN_READ"]``, a callable
``(user, store, name) -> bool`` or its dotted path; by default staff read everything and others nothing.
A refused subscription gets ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db.models import Q
from django.utils.module_loading import import_string

from .conf import djstm_setting
from .models import DVarRecord
from .notify import store_group

__all__ = ["DVarConsumer", "staff_may_read"]


def staff_may_read(user: Any, store: str, name: str) -> bool:
    """The default of ``DJSTM["CAN_READ"]``: staff may read every DVar, other users none."""
    return bool(getattr(user, "is_active", False) and getattr(user, "is_staff", False))


def _can_read() -> Any:
    rule = djstm_setting("CAN_READ")
    return import_string(rule) if isinstance(rule, str) else rule


class DVarConsumer(AsyncJsonWebsocketConsumer):
    """Sends the values of the DVars a page subscribes to, and each committed change, as JSON."""

    @property
    def channel_layer_alias(self) -> str:  # read when a socket connects, so settings may change
        return djstm_setting("CHANNEL_LAYER")

    async def connect(self) -> None:
        self.database = djstm_setting("ADMIN_DATABASE")
        self.names: dict[str, set[str]] = {}  # store -> names subscribed
        self.prefixes: dict[str, set[str]] = {}  # store -> prefixes subscribed
        self.sent: dict[tuple[str, str], int] = {}  # (store, name) -> version sent (or known by the page)
        self.groups: set[str] = set()
        await self.accept()
        self.resync = asyncio.create_task(self._resync_forever())

    async def disconnect(self, code: int) -> None:
        resync = getattr(self, "resync", None)
        if resync is not None:
            resync.cancel()
        for group in getattr(self, "groups", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or not isinstance(content.get("subscribe"), list):
            await self.send_json({"error": 'send {"subscribe": [{"store": ..., "name": ... or "prefix": ...}]}'})
            return
        for key, version in (content.get("versions") or {}).items():
            store, _, name = str(key).partition(":")
            if isinstance(version, int):
                self.sent[(store, name)] = max(version, self.sent.get((store, name), -1))
        for item in content["subscribe"]:
            await self._subscribe(item)
        await self._send_newer()

    async def _subscribe(self, item: Any) -> None:
        if not isinstance(item, dict) or not isinstance(item.get("store"), str):
            await self.send_json({"error": f"cannot subscribe to {item!r}: give a store and a name or prefix"})
            return
        store, name, prefix = item["store"], item.get("name"), item.get("prefix")
        user = self.scope.get("user")
        target = name if isinstance(name, str) else prefix if isinstance(prefix, str) else None
        if target is None or not await sync_to_async(_can_read())(user, store, target):
            await self.send_json({"error": f"not allowed to read {store}:{target}", "store": store, "name": target})
            return
        (self.names if isinstance(name, str) else self.prefixes).setdefault(store, set()).add(target)
        group = store_group(self._database_name(), store)
        if group not in self.groups:
            self.groups.add(group)
            await self.channel_layer.group_add(group, self.channel_name)

    def _database_name(self) -> str:
        from django.db import connections

        return str(connections.settings[self.database]["NAME"])

    def _wanted(self, store: str, name: str) -> bool:
        return name in self.names.get(store, ()) or any(name.startswith(p) for p in self.prefixes.get(store, ()))

    async def djstm_changes(self, event: dict) -> None:
        """A commit somewhere changed rows of a store: send the subscribed ones that are newer."""
        store = event.get("store")
        if any(self._wanted(store, name) and version > self.sent.get((store, name), -1)
               for name, version in event.get("changes", ())):
            await self._send_newer()

    async def _send_newer(self) -> None:
        rows = await sync_to_async(self._subscribed_rows)()
        for store, name, version, value in rows:
            if version > self.sent.get((store, name), -1):
                self.sent[(store, name)] = version
                await self.send_json({"store": store, "name": name, "version": version, "value": json.loads(value)})

    def _subscribed_rows(self) -> list[tuple[str, str, int, str]]:
        wanted = Q(pk__in=[])
        for store, names in self.names.items():
            wanted |= Q(store=store, name__in=names)
        for store, prefixes in self.prefixes.items():
            for prefix in prefixes:
                wanted |= Q(store=store, name__startswith=prefix)
        records = DVarRecord.objects.using(self.database).filter(wanted)
        may_read, user = _can_read(), self.scope.get("user")
        # Checked per row too: a prefix the rule allows must not reveal a DVar it does not.
        return [row for row in records.values_list("store", "name", "version", "value") if may_read(user, *row[:2])]

    async def _resync_forever(self) -> None:
        # Channel layers deliver at most once (and the core layer's groups expire): re-read, re-join.
        while True:
            await asyncio.sleep(djstm_setting("POLL_INTERVAL"))
            for group in self.groups:
                await self.channel_layer.group_add(group, self.channel_name)
            if self.names or self.prefixes:
                await self._send_newer()
