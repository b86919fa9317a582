"""A separate process on the change feed: ``python -m tests.notify.child MODE BACKEND URL GROUP COUNT [PACE]``.

``subscribe``: print ``ready`` once subscribed, then one JSON line per message
received (with ``received`` = time.time_ns()), exit 0 after COUNT messages (1 after 60 s).
``publish``: publish COUNT messages ``{"origin", "n", "sent"}``, PACE seconds apart,
then exit; the feed's exit hook sends what is still queued.
"""

import json
import os
import sys
import threading
import time

import django
from django.conf import settings


def main(mode: str, backend: str, url: str, group: str, count: str, pace: str = "0") -> int:
    settings.configure(CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": {"hosts": [url]}}})
    django.setup()
    from djstm.notify import change_feed

    feed = change_feed()
    if mode == "publish":
        for n in range(int(count)):
            feed.publish(group, {"origin": os.getpid(), "n": n, "sent": time.time_ns()})
            time.sleep(float(pace))
        return 0
    seen, done = [], threading.Event()

    def on_message(message: dict) -> None:
        print(json.dumps({**message, "received": time.time_ns()}), flush=True)
        seen.append(message)
        if len(seen) >= int(count):
            done.set()

    feed.subscribe(group, on_message)
    print("ready", flush=True)
    return 0 if done.wait(60) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
