"""Change notifications between processes, over the Django Channels layer.

After a commit, a distributed store publishes which DVars changed (names and
versions, never values) to :func:`store_group` and :func:`dvar_group`; every
process's :class:`ChangeFeed` delivers them to its subscribers, which
invalidate caches and wake blocked transactions. Delivery is best effort: a
message can be lost while the layer is down, so subscribers keep a poll fallback.
"""

from .feed import GROUP_REFRESH_INTERVAL, MESSAGE_TYPE, PING_INTERVAL, ChangeFeed
from .groups import dvar_group, store_group
from .registry import change_feed

__all__ = [
    "ChangeFeed",
    "change_feed",
    "store_group",
    "dvar_group",
    "MESSAGE_TYPE",
    "GROUP_REFRESH_INTERVAL",
    "PING_INTERVAL",
]
