"""ChangeFeed: one process's connection to a Channels layer, for change notifications.

A feed owns a daemon thread running its own event loop; the loop holds one
channel of a layer instance reserved for the feed, receives what is sent to the
groups the process subscribed to, and sends what the process publishes.

The feed repairs itself instead of trusting the layer to: channels-redis does
not (the core layer's receive raises while Redis is down and group memberships
vanish with a restarted Redis; the pub/sub layer logs and relies on redis-py to
resubscribe). Every ``ping_interval`` the feed sends a ping through a private
group and expects it back; a failed layer call, a failed receive or a lost ping
ends the current *session*: the feed resets the layer, and reconnects every
second, re-joining every subscribed group, until a ping makes the round trip.
While the layer is known to be down, published messages are dropped (one
warning per outage): notifications are a latency optimisation, and callers
keep a poll fallback for what a dropped or lost message did not tell them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .groups import _check_group

__all__ = ["ChangeFeed", "MESSAGE_TYPE", "GROUP_REFRESH_INTERVAL", "PING_INTERVAL"]

logger = logging.getLogger("djstm.notify")

#: The ``type`` given to published messages that do not name one.
MESSAGE_TYPE = "djstm.changes"
#: Longest time between re-adds of group memberships (the core Redis layer expires them).
GROUP_REFRESH_INTERVAL = 300.0
#: Seconds between liveness pings through the feed's private group.
PING_INTERVAL = 1.0
_PING_TYPE = "djstm.feed.ping"
_OP_TIMEOUT = 5.0  # bound on any one layer call: a black-holed host must not stall the feed
_RECONNECT_DELAY = 1.0
_MAX_BACKLOG = 10_000  # queued publishes; beyond that Redis is not keeping up and we drop

Handler = Callable[[dict], None]


class ChangeFeed:
    """Delivers messages of subscribed groups to callbacks; publishes messages to groups.

    ``layer`` must be an instance for this feed alone (layers keep per-event-loop
    state, and the feed runs its own loop); supported are channels-redis's
    ``RedisPubSubChannelLayer`` (recommended) and ``RedisChannelLayer``, and
    ``InMemoryChannelLayer`` (one process). Use :func:`change_feed` for the
    process-wide feed of a ``CHANNEL_LAYERS`` alias.
    """

    def __init__(self, layer: Any, *, name: str = "default", refresh_interval: float | None = None,
                 ping_interval: float = PING_INTERVAL, timeout: float = _OP_TIMEOUT) -> None:
        self.name = name
        self.pid = os.getpid()
        self._layer = layer
        self._refresh_interval = refresh_interval
        self._ping_interval = ping_interval
        self._timeout = timeout
        self._ping_group = f"djstm.feed.{uuid.uuid4().hex}"
        self._handlers: dict[str, list[Handler]] = {}
        self._handlers_lock = threading.Lock()  # caller threads edit _handlers; the feed thread reads it
        self._closed = False
        # Everything below is used only in the feed's thread.
        self._joined: set[str] = set()  # groups of the current session's channel
        self._pongs: dict[str, asyncio.Future] = {}
        self._channel: str | None = None
        self._failed: asyncio.Future | None = None  # resolved (with the error) when the session fails
        self._up = asyncio.Event()  # set while the session is connected
        self._down = False  # known unreachable: publishes are dropped, not queued
        self._warned = self._backlog_warned = False  # this outage / this backlog was logged
        self._outbox: asyncio.Queue = asyncio.Queue(_MAX_BACKLOG)
        self._loop = asyncio.new_event_loop()
        self._main = self._loop.create_task(self._sessions())
        self._thread = threading.Thread(target=self._run, name=f"djstm-notify-{name}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- public API: callable from any thread --------------------------------------------------

    def subscribe(self, group: str, on_message: Handler) -> None:
        """Call ``on_message(message)`` in the feed's thread for every message published to ``group``
        by any process, this one included, from now until :meth:`unsubscribe`.

        Returns once the layer holds the subscription, or after a bounded wait (with a warning)
        if it is unreachable; the feed then subscribes as soon as the layer is back.
        ``on_message`` must be quick; what it raises is logged and does not stop the feed.
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
            pass  # the feed was closed meanwhile
        except concurrent.futures.TimeoutError:
            logger.warning("change feed %r: no subscription to %s within %ss; the channel layer seems "
                           "unreachable, subscribing when it is back", self.name, group, self._timeout)

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

        The feed sends a copy with ``"group": group`` added, and ``"type": MESSAGE_TYPE``
        unless ``message`` has a type. Messages leave in the order ``publish`` was called.
        While the layer is down they are dropped (logged once per outage).
        """
        _check_group(group)
        if message.get("group", group) != group:
            raise ValueError(f"message key 'group' is reserved for the feed: {message['group']!r} != {group!r}")
        self._call_soon(self._enqueue, group, {"type": MESSAGE_TYPE, **message, "group": group})

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (if the layer is up), leave all groups, stop the thread (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._call_soon(lambda: self._loop.create_task(self._shutdown(timeout / 2)))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the feed's thread ----------------------------------------------------------------------

    def _call_soon(self, callback: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the feed has stopped
            logger.debug("change feed %r is closed; dropped a call", self.name)

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
            rest = asyncio.all_tasks(self._loop)  # subscribe() calls still waiting for a connection
            for task in rest:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            self._loop.close()  # channels-redis hooks close() to drop its connections

    async def _sessions(self) -> None:
        while True:
            error = await self._session()
            dropped = self._drain()
            if not self._warned:
                self._warned = True
                logger.warning("change feed %r: channel layer unreachable (%r); dropping change "
                               "notifications (%d queued) until it is back, retrying every %ss",
                               self.name, error, dropped, _RECONNECT_DELAY)
            await asyncio.sleep(_RECONNECT_DELAY)

    async def _session(self) -> BaseException:
        """Connect, serve until something fails, clean up; return what failed."""
        layer, tasks = self._layer, []
        failed = self._failed = asyncio.get_running_loop().create_future()

        def watch(coroutine) -> None:  # a watched task that raises ends the session
            task = asyncio.get_running_loop().create_task(coroutine)
            task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or self._fail(failed, t.exception()))
            tasks.append(task)

        channel = None
        try:
            channel = self._channel = await self._bounded(layer.new_channel())
            self._joined = set()
            watch(self._receive(channel))
            watch(self._connect(channel, watch))
            return await failed
        except Exception as error:
            self._fail(failed, error)
            return error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._reset(channel)

    async def _connect(self, channel: str, watch: Callable) -> None:
        with self._handlers_lock:
            groups = list(self._handlers)
        for group in [self._ping_group, *groups]:
            await self._bounded(self._layer.group_add(group, channel))
            self._joined.add(group)
        await self._ping()
        if self._warned:
            logger.info("change feed %r: channel layer reachable again", self.name)
        self._down = self._warned = self._backlog_warned = False
        self._up.set()
        watch(self._send())
        watch(self._keepalive(channel))

    async def _receive(self, channel: str) -> None:
        while True:
            message = await self._layer.receive(channel)
            if message.get("type") == _PING_TYPE:
                pong = self._pongs.get(message.get("token"))
                if pong is not None and not pong.done():
                    pong.set_result(None)
                continue
            with self._handlers_lock:
                handlers = tuple(self._handlers.get(message.get("group"), ()))
            for handler in handlers:
                try:
                    handler(dict(message))
                except Exception:
                    logger.exception("change feed %r: handler %r failed on %r", self.name, handler, message)

    async def _send(self) -> None:
        while True:
            group, message = await self._outbox.get()
            try:
                await self._bounded(self._layer.group_send(group, message))
            finally:
                self._outbox.task_done()

    async def _keepalive(self, channel: str) -> None:
        # The core Redis layer forgets a membership group_expiry seconds after it was added.
        expiry = getattr(self._layer, "group_expiry", math.inf)
        refresh = self._refresh_interval or min(expiry / 2, GROUP_REFRESH_INTERVAL)
        loop = asyncio.get_running_loop()
        next_refresh, next_ping = loop.time() + refresh, loop.time() + self._ping_interval
        while True:
            await asyncio.sleep(max(0.0, min(next_refresh, next_ping) - loop.time()))
            if loop.time() >= next_refresh:
                for group in list(self._joined):
                    await self._bounded(self._layer.group_add(group, channel))
                next_refresh = loop.time() + refresh
            if loop.time() >= next_ping:
                await self._ping()
                next_ping = loop.time() + self._ping_interval

    async def _ping(self) -> None:
        """Return once a message went through the layer and came back on our channel."""
        token = uuid.uuid4().hex
        pong = self._pongs[token] = asyncio.get_running_loop().create_future()
        try:
            await self._bounded(self._layer.group_send(self._ping_group, {"type": _PING_TYPE, "token": token}))
            await self._bounded(pong)
        finally:
            del self._pongs[token]

    async def _join(self, group: str) -> None:
        while not self._closed:
            await self._up.wait()
            with self._handlers_lock:
                if group not in self._handlers:
                    return
            if group in self._joined:
                return
            failed = self._failed
            try:
                await self._bounded(self._layer.group_add(group, self._channel))
                # The pub/sub layer only writes SUBSCRIBE; a ping round trip means Redis has read it.
                await self._ping()
                if not failed.done():
                    self._joined.add(group)
            except Exception as error:
                self._fail(failed, error)

    async def _leave(self, group: str) -> None:
        with self._handlers_lock:
            if group in self._handlers:
                return  # subscribed again meanwhile
        if group in self._joined and self._up.is_set():
            self._joined.discard(group)
            try:
                await self._bounded(self._layer.group_discard(group, self._channel))
            except Exception as error:  # the ping finds out whether the layer is down
                logger.debug("change feed %r: leaving %s failed: %r", self.name, group, error)

    def _enqueue(self, group: str, message: dict) -> None:
        if self._down:
            return  # dropped; the outage was logged once
        try:
            self._outbox.put_nowait((group, message))
        except asyncio.QueueFull:
            if not self._backlog_warned:
                self._backlog_warned = True
                logger.warning("change feed %r: %d messages waiting for the channel layer; dropping",
                               self.name, _MAX_BACKLOG)

    def _drain(self) -> int:
        dropped = self._outbox.qsize()
        for _ in range(dropped):
            self._outbox.get_nowait()
            self._outbox.task_done()
        return dropped

    def _fail(self, failed: asyncio.Future, error: BaseException) -> None:
        """End the session that ``failed`` belongs to (if it is still running)."""
        if not failed.done():
            failed.set_result(error)
            self._up.clear()  # joins wait for the next session instead of retrying this one
            self._down = True

    async def _bounded(self, awaitable, timeout: float | None = None):
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (close() hangs).
        async with asyncio.timeout(timeout or self._timeout):
            return await awaitable

    async def _reset(self, channel: str | None) -> None:
        """Leave this session's groups (the core layer would keep sending to them for a day) and
        drop the layer's connections, so the next session starts clean; best effort, bounded."""
        layer = self._layer
        try:
            if channel is not None and self._joined:
                leave = [layer.group_discard(group, channel) for group in self._joined]
                await self._bounded(asyncio.gather(*leave, return_exceptions=True), 1.0)
        except Exception:
            pass
        self._joined = set()
        try:
            if hasattr(type(layer), "close_pools"):
                await self._bounded(layer.close_pools(), 1.0)  # core: flush() would delete every key
            elif _flush_is_local(layer):
                await self._bounded(layer.flush(), 1.0)
        except Exception as error:
            logger.debug("change feed %r: resetting the layer: %r", self.name, error)

    async def _shutdown(self, timeout: float) -> None:
        if not self._down:  # up, or still connecting: what was published is sent
            try:
                await self._bounded(self._outbox.join(), timeout)
            except TimeoutError:
                logger.warning("change feed %r closed with %d messages unsent", self.name, self._outbox.qsize())
        self._main.cancel()


def _flush_is_local(layer: Any) -> bool:
    """True for layers whose flush() only forgets this instance's state (nothing shared is deleted)."""
    from channels.layers import InMemoryChannelLayer

    try:
        from channels_redis.pubsub import RedisPubSubChannelLayer
    except ImportError:
        return isinstance(layer, InMemoryChannelLayer)
    return isinstance(layer, (InMemoryChannelLayer, RedisPubSubChannelLayer))
