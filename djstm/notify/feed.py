"""ChangeFeed: one process's connection to a Channels layer, for change notifications.

A feed owns a daemon thread running its own event loop; the loop holds one
channel of a layer instance reserved for the feed, receives what is sent to the
groups the process subscribed to, and sends what the process publishes.

The feed repairs itself rather than trust the layer to: on a lost connection
channels-redis's core layer raises from ``receive``, and a restarted Redis has
forgotten its group memberships; the pub/sub layer logs, retries every second,
and redis-py resubscribes on reconnect. So each connection is a *session*
(``_session.py``) that pings itself through a private group every
``ping_interval``; a failed layer call, a failed receive or a lost ping ends it,
and every second the feed starts a new one (new channel, every subscribed group
joined again) until a ping makes the round trip. While the layer is known to be
down, published messages are dropped with one warning per outage: callers keep
a poll fallback for what a dropped or lost message would have told them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from ._session import _Session
from .groups import _check_group

__all__ = ["ChangeFeed", "MESSAGE_TYPE", "GROUP_REFRESH_INTERVAL", "PING_INTERVAL"]

logger = logging.getLogger("djstm.notify")

#: The ``type`` of published messages that do not name one (channel-layer messages need a type).
MESSAGE_TYPE = "djstm.changes"
#: Longest time between re-adds of group memberships (the core Redis layer expires them).
GROUP_REFRESH_INTERVAL = 300.0
#: Default seconds between liveness pings through the feed's private group.
PING_INTERVAL = 1.0
_RECONNECT_DELAY = 1.0
_MAX_BACKLOG = 10_000  # queued publishes; beyond that the layer is not keeping up and we drop

Handler = Callable[[dict], None]


class ChangeFeed:
    """Delivers the messages of subscribed groups to callbacks; publishes messages to groups.

    ``layer`` must be an instance for this feed alone (layers keep per-event-loop state, and
    the feed runs its own loop). Supported: channels-redis's ``RedisPubSubChannelLayer``
    (recommended) and ``RedisChannelLayer``, and ``InMemoryChannelLayer`` (one process).
    :func:`change_feed` gives the process-wide feed of a ``CHANNEL_LAYERS`` alias.
    ``timeout`` bounds each layer call and each wait of :meth:`subscribe`.
    """

    def __init__(self, layer: Any, *, name: str = "default", refresh_interval: float | None = None,
                 ping_interval: float = PING_INTERVAL, timeout: float = 5.0) -> None:
        self.name, self.pid = name, os.getpid()
        self._layer, self._timeout = layer, timeout
        self._refresh_interval, self._ping_interval = refresh_interval, ping_interval
        self._ping_group = f"djstm.feed.{uuid.uuid4().hex}"
        self._handlers: dict[str, list[Handler]] = {}
        self._handlers_lock = threading.Lock()  # caller threads edit _handlers; the feed thread reads it
        self._closed = False
        # Used only in the feed's thread:
        self._session: _Session | None = None
        self._up = asyncio.Event()  # set while the session is connected
        self._down = False  # known unreachable: publishes are dropped, not queued
        self._warned = self._backlog_warned = False  # this outage, this backlog were logged
        self._outbox: asyncio.Queue = asyncio.Queue(_MAX_BACKLOG)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._main = self._loop.create_task(self._sessions())
        self._thread = threading.Thread(target=self._run, name=f"djstm-notify-{name}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, group: str, on_message: Handler) -> None:
        """Call ``on_message(message)`` in the feed's thread for every message published to ``group``
        by any process, this one included, from now until :meth:`unsubscribe`.

        Returns once the layer holds the subscription; if the layer is unreachable, after a bounded
        wait with a warning, and the feed subscribes as soon as the layer is back. ``on_message``
        must be quick; what it raises is logged and does not stop the feed.
        """
        _check_group(group)
        if self._closed:
            raise RuntimeError(f"change feed {self.name!r} is closed")
        with self._handlers_lock:
            self._handlers.setdefault(group, []).append(on_message)
        joined = asyncio.run_coroutine_threadsafe(self._join(group), self._loop)
        if threading.current_thread() is self._thread:
            return  # called from a handler: the loop cannot wait for itself
        try:
            joined.result(self._timeout)
        except concurrent.futures.CancelledError:
            pass  # closed meanwhile
        except concurrent.futures.TimeoutError:
            logger.warning("change feed %r: not subscribed to %s after %ss, the channel layer seems "
                           "unreachable; subscribing when it is back", self.name, group, self._timeout)

    def unsubscribe(self, group: str, on_message: Handler) -> None:
        """Stop calling ``on_message`` for ``group`` (a call already running may finish)."""
        with self._handlers_lock:
            handlers = self._handlers.get(group, [])
            if on_message not in handlers:
                return
            handlers.remove(on_message)
            if handlers:
                return
            del self._handlers[group]
        self._call_soon(lambda: self._loop.create_task(self._leave(group)))

    def publish(self, group: str, message: dict) -> None:
        """Send ``message`` (str/int/list values) to every subscriber of ``group``; never blocks.

        Subscribers get a copy with ``"group": group`` added, and ``"type": MESSAGE_TYPE`` unless
        ``message`` has a type. Messages leave in the order ``publish`` was called; while the layer
        is down they are dropped (logged once per outage).
        """
        _check_group(group)
        if message.get("group", group) != group:
            raise ValueError(f"message key 'group' is reserved for the feed: {message['group']!r} != {group!r}")
        self._call_soon(self._enqueue, group, {"type": MESSAGE_TYPE, **message, "group": group})

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (unless the layer is down), leave all groups, stop the thread; bounded."""
        if not self._closed:
            self._closed = True
            self._call_soon(lambda: self._loop.create_task(self._shutdown(timeout / 2)))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the feed's thread ---------------------------------------------------------------------------

    def _call_soon(self, callback: Callable, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the feed has stopped
            self._loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("change feed %r stopped by an unexpected error", self.name)
        finally:
            self._closed = True
            rest = asyncio.all_tasks(self._loop)  # subscribe() calls still waiting for a session
            for task in rest:
                task.cancel()
            if rest:
                self._loop.run_until_complete(asyncio.wait(rest, timeout=1.0))
            self._loop.close()  # channels-redis hooks close() to drop its connections

    async def _sessions(self) -> None:
        while True:
            self._session = _Session(self)
            error = await self._session.run()
            dropped = self._outbox.qsize()
            for _ in range(dropped):
                self._outbox.get_nowait()
                self._outbox.task_done()
            if not self._warned:
                self._warned = True
                logger.warning("change feed %r: channel layer unreachable (%r); dropping change notifications "
                               "(%d queued) until it is back, retrying every %ss",
                               self.name, error, dropped, _RECONNECT_DELAY)
            await asyncio.sleep(_RECONNECT_DELAY)

    def _session_up(self) -> None:
        if self._warned:
            logger.info("change feed %r: channel layer reachable again", self.name)
        self._down = self._warned = self._backlog_warned = False
        self._up.set()

    def _session_failed(self) -> None:
        self._up.clear()  # joins wait for the next session instead of retrying this one
        self._down = True

    def _groups(self) -> list[str]:
        with self._handlers_lock:
            return list(self._handlers)

    def _refresh_every(self) -> float:
        # The core layer drops a membership group_expiry seconds after it was (re-)added.
        expiry = getattr(self._layer, "group_expiry", math.inf)
        return self._refresh_interval or min(expiry / 2, GROUP_REFRESH_INTERVAL)

    def _dispatch(self, message: dict) -> None:
        with self._handlers_lock:
            handlers = tuple(self._handlers.get(message.get("group"), ()))
        for handler in handlers:
            try:
                handler(dict(message))
            except Exception:
                logger.exception("change feed %r: handler %r failed on %r", self.name, handler, message)

    async def _join(self, group: str) -> None:
        while not self._closed:
            await self._up.wait()
            session = self._session
            with self._handlers_lock:
                if group not in self._handlers or group in session.joined:
                    return  # unsubscribed meanwhile, or joined (at the session's start or by another call)
            await session.join(group)  # on failure the session ends and we wait for the next

    async def _leave(self, group: str) -> None:
        session = self._session
        with self._handlers_lock:
            if group in self._handlers:
                return  # subscribed again meanwhile
        if session is not None and self._up.is_set() and group in session.joined:
            await session.leave(group)

    def _enqueue(self, group: str, message: dict) -> None:
        if self._down:
            return  # dropped; the outage was logged
        try:
            self._outbox.put_nowait((group, message))
        except asyncio.QueueFull:
            if not self._backlog_warned:
                self._backlog_warned = True
                logger.warning("change feed %r: %d messages wait for the channel layer; dropping more",
                               self.name, _MAX_BACKLOG)

    async def _shutdown(self, timeout: float) -> None:
        if not self._down:  # up, or still connecting: what was published gets sent
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._outbox.join()
        self._main.cancel()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # channels-redis leaves background tasks (the core layer's backup cleaner) that fail when
        # Redis goes away; the outage is logged once already, so keep their tracebacks out.
        error = context.get("exception")
        if isinstance(error, OSError) or type(error).__module__.startswith("redis"):
            logger.debug("change feed %r: background task failed: %r", self.name, error)
        else:
            loop.default_exception_handler(context)
