"""The demo as several workers share it: DVars in PostgreSQL, wake-ups over Redis (`make demo-distributed`).

Reads DJSTM_PG_DSN and DJSTM_REDIS_URL (defaults: the local servers); the demo's own database is
DJSTM_DEMO_DATABASE (default djstm_demo), which `make demo-distributed` creates if it is missing.
"""

import os

from djstm.conf import postgresql_database

from .settings import *  # noqa: F403  (the single-process demo, changed below)

DATABASES = {
    "default": postgresql_database(
        os.environ.get("DJSTM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        NAME=os.environ.get("DJSTM_DEMO_DATABASE", "djstm_demo"),
    )
}
DATABASE_ROUTERS = []
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("DJSTM_REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}
BOARD_STORE = {"database": "default", "mode": "distributed", "name": "board"}
DJSTM = {
    "ADMIN_DATABASE": "default",
    "CAN_READ": "demo_site.board.state.may_read",
    "DISTRIBUTED_DATABASES": ["default"],
}
