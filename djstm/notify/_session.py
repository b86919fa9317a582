"""One connection of a ChangeFeed to its layer: a channel, its groups, and the tasks serving them.

A session lives from connecting until its first failure (a failed layer call, a
failed receive, a ping that does not come back); it then cleans up after itself
and the feed starts a new one. Keeping all per-connection state here means a
new session never sees leftovers of the old one. Runs only in the feed's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .feed import ChangeFeed

_PING, _STOP = "djstm.feed.ping", "djstm.feed.stop"


class _Session:
    def __init__(self, feed: ChangeFeed) -> None:
        self.feed, self.layer = feed, feed._layer
        self.loop = asyncio.get_running_loop()
        self.failed = self.loop.create_future()  # resolved with the error that ends the session
        self.channel: str | None = None
        self.joined: set[str] = set()  # groups self.channel is in
        self._tasks: list[asyncio.Task] = []
        self._pongs: dict[str, asyncio.Future] = {}

    async def run(self) -> BaseException:
        """Connect, serve until something fails, clean up; return what failed."""
        try:
            self.channel = await self.call(self.layer.new_channel())
            self._watch(self._receive())
            self._watch(self._connect())
            return await self.failed
        except Exception as error:
            self.fail(error)
            return error
        finally:
            await self._end()

    def fail(self, error: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_result(error)
            self.feed._session_failed()

    async def call(self, awaitable, timeout: float | None = None):
        """Await a layer call, bounded: a black-holed host must not stall the feed."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (close() would hang).
        async with asyncio.timeout(timeout or self.feed._timeout):
            return await awaitable

    async def join(self, group: str) -> None:
        """Add the channel to ``group``; return once messages sent to it from now on reach us."""
        try:
            await self.call(self.layer.group_add(group, self.channel))
            # The pub/sub layer only writes SUBSCRIBE; once a ping is back, Redis has read it.
            await self._ping()
            if not self.failed.done():
                self.joined.add(group)
        except Exception as error:
            self.fail(error)

    async def leave(self, group: str) -> None:
        self.joined.discard(group)
        try:
            await self.call(self.layer.group_discard(group, self.channel))
        except Exception:  # the next ping tells whether the layer is down
            pass

    def _watch(self, coroutine) -> None:
        """Run ``coroutine`` as a task of this session; if it raises, the session ends."""
        self._tasks.append(task := self.loop.create_task(coroutine))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or self.fail(t.exception()))

    async def _connect(self) -> None:
        for group in [self.feed._ping_group, *self.feed._groups()]:
            await self.call(self.layer.group_add(group, self.channel))
            self.joined.add(group)
        await self._ping()
        self.feed._session_up()
        self._watch(self._send())
        self._watch(self._keepalive())

    async def _receive(self) -> None:
        while True:
            message = await self.layer.receive(self.channel)
            kind = message.get("type")
            if kind == _STOP:
                return
            if kind == _PING:
                if (pong := self._pongs.get(message.get("token"))) and not pong.done():
                    pong.set_result(None)
            else:
                self.feed._dispatch(message)

    async def _send(self) -> None:
        outbox = self.feed._outbox
        while True:
            group, message = await outbox.get()
            try:
                await self.call(self.layer.group_send(group, message))
            finally:
                outbox.task_done()

    async def _keepalive(self) -> None:
        refresh = self.feed._refresh_every()
        now = self.loop.time
        next_refresh, next_ping = now() + refresh, now() + self.feed._ping_interval
        while True:
            await asyncio.sleep(max(0.0, min(next_refresh, next_ping) - now()))
            if now() >= next_refresh:
                for group in list(self.joined):
                    await self.call(self.layer.group_add(group, self.channel))
                next_refresh = now() + refresh
            if now() >= next_ping:
                await self._ping()
                next_ping = now() + self.feed._ping_interval

    async def _ping(self) -> None:
        """Return once a message went out through the layer and came back on our channel."""
        token = uuid.uuid4().hex
        pong = self._pongs[token] = self.loop.create_future()
        try:
            await self.call(self.layer.group_send(self.feed._ping_group, {"type": _PING, "token": token}))
            await self.call(pong)
        finally:
            del self._pongs[token]

    async def _end(self) -> None:
        """Stop the tasks, leave the groups, drop the layer's connections; best effort, bounded."""
        self.fail(RuntimeError("session ended"))
        receiver = self._tasks[:1]
        if receiver and not receiver[0].done():
            # End the receiver with a message: redis-py can swallow the cancellation of the core
            # layer's BZPOPMIN, which then keeps the task alive for up to 5 s.
            with contextlib.suppress(Exception):
                await self.call(self.layer.send(self.channel, {"type": _STOP}), 1.0)
                await asyncio.wait(receiver, timeout=1.0)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        with contextlib.suppress(Exception):
            # Leave, or the core layer queues messages for this dead channel until group_expiry.
            if self.joined:
                await self.call(asyncio.gather(*(self.layer.group_discard(g, self.channel) for g in self.joined)), 1.0)
        with contextlib.suppress(Exception):
            if hasattr(type(self.layer), "close_pools"):  # the core layer; its flush() deletes every key
                await self.call(self.layer.close_pools(), 1.0)
            elif {"RedisPubSubChannelLayer", "InMemoryChannelLayer"} & {c.__name__ for c in type(self.layer).__mro__}:
                await self.call(self.layer.flush(), 1.0)  # forgets this instance's local state only
