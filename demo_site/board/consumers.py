"""The live board: each socket follows the board by blocking in ``retry`` until it changes."""

import asyncio

from channels.generic.websocket import AsyncJsonWebsocketConsumer

import djstm

from . import state


class BoardConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        await self.accept()
        self._follower = asyncio.create_task(self._follow())

    async def disconnect(self, code: int) -> None:
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()

    async def _follow(self) -> None:
        seen = None
        while True:
            board = await djstm.aatomically(state.next_snapshot, seen)
            seen = board["revision"]
            await self.send_json(board)
