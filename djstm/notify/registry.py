"""The process-wide change feed of each configured channel layer."""

from __future__ import annotations

import atexit
import os
import threading

from .feed import ChangeFeed

__all__ = ["change_feed"]

_feeds: dict[str, ChangeFeed] = {}
_lock = threading.Lock()


def change_feed(layer_alias: str = "default") -> ChangeFeed | None:
    """The feed of ``CHANNEL_LAYERS[layer_alias]``, created and started on first call.

    Every call in one process returns the same running feed; None if the alias is not
    configured or channels is not installed. A forked child gets a feed of its own
    (the parent's thread does not exist there), so does a caller after ``close()``.
    """
    try:
        from channels.layers import channel_layers
    except ImportError:
        return None
    if layer_alias not in channel_layers:
        return None
    with _lock:
        feed = _feeds.get(layer_alias)
        if feed is None or feed.pid != os.getpid() or feed.closed:
            # A layer instance of the feed's own: layers keep per-event-loop state, and the
            # shared one (channel_layers[alias]) belongs to the consumers' loop.
            feed = _feeds[layer_alias] = ChangeFeed(channel_layers.make_backend(layer_alias), name=layer_alias)
    return feed


def _forget_after_fork() -> None:
    # The parent's feeds have no thread here, and _lock may have been held at fork.
    global _lock
    _lock = threading.Lock()
    _feeds.clear()


def _close_all() -> None:
    # At exit, send what is still queued and leave the groups (the core Redis layer
    # would otherwise keep queueing messages for this process's channel for a day).
    for feed in list(_feeds.values()):
        if feed.pid == os.getpid():
            feed.close()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_close_all)
