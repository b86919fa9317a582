"""A worker process of ``bench.distributed``: reads JSON-line commands on stdin, answers on stdout.

Commands (each answered with one line, except ``wake``, which answers twice per sample):

* ``open``: open store ``store`` and load DVars ``vars`` (so later runs time commits only);
* ``run``: from time ``start`` to ``end`` (``time.time()``), increment DVar ``var`` of ``store`` with
  ``lock``; answer the commits finished by ``end``, the attempts they took (the transaction
  function counts its own runs: attempts - commits = aborts), and the CPU seconds this process
  and its PostgreSQL backend (read from /proc, when the server runs on this machine) used;
* ``wake``: ``samples`` times, block in ``retry()`` until DVar ``var`` changes, then wait for one
  message on Redis channel ``channel``; answer once when ready, then the time each was seen;
* ``quit``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from bench.distributed import ALIAS, configure_django, open_store, redis_url


def _answer(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> None:
    configure_django()
    import djstm

    stores: dict[str, object] = {}

    def dvar(store: str, name: str):
        if store not in stores:
            stores[store] = open_store(store)
        return stores[store].dvar(name, 0)

    def backend_cpu() -> float | None:
        """CPU seconds used so far by this process's PostgreSQL backend, if it runs on this machine."""
        from django.db import connections

        try:
            with connections[ALIAS].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                (pid,) = cursor.fetchone()
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def run(store: str, var: str, lock: str, start: float, end: float) -> None:
        counter = dvar(store, var)
        attempts = 0

        def increment() -> None:
            nonlocal attempts
            attempts += 1
            counter.write(counter.read() + 1)

        commits = counted_attempts = 0
        djstm.atomically(counter.read)  # this thread's database connection is open
        backend_before = backend_cpu()
        time.sleep(max(0.0, start - time.time()))
        cpu_before = time.process_time()
        while True:
            djstm.atomically(increment, lock=lock)
            if time.time() > end:
                break
            commits += 1
            counted_attempts = attempts
        cpu = time.process_time() - cpu_before
        backend_after = backend_cpu()
        backend = None if backend_before is None or backend_after is None else backend_after - backend_before
        _answer(commits=commits, attempts=counted_attempts, cpu=cpu, backend_cpu=backend)

    def wake(store: str, var: str, channel: str, samples: int) -> None:
        import redis

        flag = dvar(store, var)
        subscription = redis.Redis.from_url(redis_url()).pubsub()
        subscription.subscribe(channel)
        while (subscription.get_message(timeout=10) or {}).get("type") != "subscribe":
            pass  # Redis confirmed the subscription
        seen = djstm.atomically(flag.read)
        _answer(ready=True)
        for _ in range(samples):
            attempts = 0

            def changed() -> int:
                nonlocal attempts
                attempts += 1
                value = flag.read()
                djstm.check(value != seen)
                return value

            seen = djstm.atomically(changed)
            _answer(value=seen, t=time.time(), attempts=attempts)
            while (subscription.get_message(timeout=10) or {}).get("type") != "message":
                pass
            _answer(t=time.time())
        subscription.close()

    _answer(ready=os.getpid())
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        if op == "open":
            for name in command["vars"]:
                dvar(command["store"], name)
            _answer(ok=True)
        elif op == "run":
            run(**command)
        elif op == "wake":
            wake(**command)
    for store in stores.values():
        store.close()


if __name__ == "__main__":
    main()
