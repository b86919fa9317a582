"""Per-thread state of the engine: the transaction running in this thread, if any."""

from __future__ import annotations

import asyncio
import threading


class _ThreadState(threading.local):
    # Class attributes are the per-thread defaults, so a lookup never needs getattr(..., None).
    tx = None
    running_callbacks = False


current = _ThreadState()


def in_event_loop() -> bool:
    """True in a thread that is running an asyncio event loop, where blocking would stall it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
