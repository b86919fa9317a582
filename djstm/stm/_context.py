"""Per-thread state of the engine: the transaction running in this thread, if any."""

from __future__ import annotations

import threading


class _ThreadState(threading.local):
    # Class attributes are the per-thread defaults, so a lookup never needs getattr(..., None).
    tx = None
    running_callbacks = False


current = _ThreadState()
