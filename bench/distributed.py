"""Distributed stores on PostgreSQL and Redis: commit rate vs psycopg by hand, scaling over processes,
a hot variable under each lock mode, and cross-process wake-up latency vs raw Redis pub/sub.

Needs the PostgreSQL server at ``DJSTM_PG_DSN`` and the Redis at ``DJSTM_REDIS_URL`` (the defaults are
what ``.ci/run`` starts); without them the section says so and is skipped. Several processes: the
workers are ``bench/_distributed_worker.py``, started once and driven over their stdin/stdout. Each
measurement uses a store of its own, opened only by the processes taking part, so no idle process
handles its notifications. Every store is named after this run and its rows are deleted at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import djstm

from ._measure import RUNS, Table, rates

#: The Django database alias and channel layer alias this benchmark configures.
ALIAS = "djstm-bench"
LAYER = "djstm-bench"

ONE_PROCESS_COMMITS = 400  # per run; about half a second each
SECONDS = 2.0  # each multi-process run
HOT_SECONDS = 1.5  # each run on the hot variable (3 modes x 3 runs)
HOT_PROCESSES = 8
DISJOINT_PROCESSES = 4
WAKE_SAMPLES = 200
WAKE_GAP = 0.005  # seconds the waiting process gets to block again before the next change

_ROOT = Path(__file__).resolve().parent.parent


def dsn() -> str:
    return os.environ.get("DJSTM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def redis_url() -> str:
    return os.environ.get("DJSTM_REDIS_URL", "redis://127.0.0.1:6379/0")


def configure_django() -> None:
    """Configure Django for this section: the PostgreSQL alias, the Redis pub/sub layer, djstm using it.

    In a fresh process this configures a small project; if an earlier section (or
    ``DJANGO_SETTINGS_MODULE``) configured Django already, the alias and layer are added to it.
    """
    import django
    from django.apps import apps
    from django.conf import settings
    from django.db import connections

    from djstm.conf import postgresql_database

    database = postgresql_database(dsn())
    layer = {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [redis_url()]}}
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        settings.configure(
            INSTALLED_APPS=["channels", "djstm"],
            DATABASES={"default": {}, ALIAS: database},
            CHANNEL_LAYERS={LAYER: layer},
            DJSTM={"CHANNEL_LAYER": LAYER},
            USE_TZ=True,
            TIME_ZONE="UTC",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
    else:
        if ALIAS not in connections.settings:
            connections.settings[ALIAS] = connections.configure_settings({"default": {}, ALIAS: database})[ALIAS]
        settings.CHANNEL_LAYERS = {**getattr(settings, "CHANNEL_LAYERS", {}), LAYER: layer}
        settings.DJSTM = {**(getattr(settings, "DJSTM", None) or {}), "CHANNEL_LAYER": LAYER}
    if not apps.ready:
        django.setup()


def open_store(name: str):
    """A distributed store of this benchmark; a long poll interval, so only notifications wake waiters."""
    return djstm.with_store(database=ALIAS, mode="distributed", name=name, poll_interval=30)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _unavailable() -> str | None:
    """Why the section cannot run (a line saying how to start what is missing), or None."""
    try:
        import psycopg

        with psycopg.connect(dsn(), connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except Exception as error:
        return (
            f"PostgreSQL at {dsn()} is unreachable ({_one_line(error)}); start it as .ci/run does "
            "(`pg_ctlcluster $(ls /etc/postgresql) main start`, then `createdb -U postgres test` if the "
            "database is missing), or point DJSTM_PG_DSN at a server"
        )
    try:
        import redis

        client = redis.Redis.from_url(redis_url(), socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as error:
        return (
            f"Redis at {redis_url()} is unreachable ({_one_line(error)}); start it with "
            '`redis-server --daemonize yes --port 6379 --save "" --appendonly no`, or set DJSTM_REDIS_URL'
        )
    return None


class _Skipped:
    def __init__(self, title: str, reason: str) -> None:
        self.title, self.reason = title, reason

    def print(self) -> None:
        print(f"\n## {self.title}\n  skipped: {self.reason}")


# -- 1. one process: djstm vs the same SQL through psycopg by hand --------------------------------------

_SELECT_FOR_UPDATE = "SELECT value, version FROM djstm_dvar WHERE store = %s AND name = %s FOR UPDATE"
_UPDATE = "UPDATE djstm_dvar SET value = %s, version = version + 1, updated_at = now() WHERE store = %s AND name = %s"


def _one_process(table: Table, store_name: str) -> None:
    import psycopg

    with open_store(store_name) as store:
        counter = store.dvar("counter", 0)
        peer = store.dvar("by-hand", 0)  # a row of its own, so the two never conflict
        connection = psycopg.connect(dsn())  # not autocommit: a transaction per commit() below

        def by_hand() -> None:
            with connection.cursor() as cursor:
                cursor.execute(_SELECT_FOR_UPDATE, (store_name, peer.key))
                value, _version = cursor.fetchone()
                cursor.execute(_UPDATE, (str(int(value) + 1), store_name, peer.key))
            connection.commit()

        def increment() -> None:
            counter.write(counter.read() + 1)

        try:
            hand, optimistic, pessimistic = rates(
                (by_hand, ONE_PROCESS_COMMITS, 1),
                (lambda: djstm.atomically(increment, lock="optimistic"), ONE_PROCESS_COMMITS, 1),
                (lambda: djstm.atomically(increment, lock="pessimistic"), ONE_PROCESS_COMMITS, 1),
            )
        finally:
            connection.close()
    table.rate("psycopg by hand: SELECT FOR UPDATE + UPDATE + COMMIT", hand)
    table.rate("djstm 1-read-1-write, optimistic", optimistic)
    table.rate("djstm 1-read-1-write, pessimistic", pessimistic)
    table.ratio(f"optimistic / by hand ({optimistic:,.0f}/s vs {hand:,.0f}/s)", optimistic / hand, ">= 0.6x",
                optimistic / hand >= 0.6)
    table.ratio(f"pessimistic / by hand ({pessimistic:,.0f}/s vs {hand:,.0f}/s)", pessimistic / hand, ">= 0.6x",
                pessimistic / hand >= 0.6)


# -- the worker processes ---------------------------------------------------------------------------------


class _Run(NamedTuple):
    rate: float  # commits per second, all processes together
    aborts: float  # aborted attempts per commit
    client_ms: float  # CPU milliseconds per commit in the worker processes
    backend_ms: float | None  # ... in their PostgreSQL backends (None: not on this machine)


class _Workers:
    """Worker processes started together, each answering JSON-line commands (see _distributed_worker)."""

    def __init__(self, count: int) -> None:
        env = {**os.environ, "DJSTM_PG_DSN": dsn(), "DJSTM_REDIS_URL": redis_url()}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "bench._distributed_worker"],
                cwd=_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            for _ in range(count)
        ]
        try:
            for index in range(count):
                self.receive(index)  # {"ready": pid}
        except BaseException:
            self.close()
            raise

    def send(self, index: int, **command: object) -> None:
        process = self.processes[index]
        process.stdin.write(json.dumps(command) + "\n")
        process.stdin.flush()

    def receive(self, index: int) -> dict:
        line = self.processes[index].stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {index} exited (code {self.processes[index].wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, indexes, **command: object) -> list[dict]:
        """Send ``command`` to each of ``indexes`` (all first), then collect their answers."""
        for index in indexes:
            self.send(index, **command)
        return [self.receive(index) for index in indexes]

    def run(self, indexes, store: str, variables: list[str], lock: str, seconds: float) -> _Run:
        """All of ``indexes`` increment their variable for ``seconds``, starting together."""
        start = time.time() + 0.2  # every worker has its command by then
        for index, variable in zip(indexes, variables):
            self.send(index, op="run", store=store, var=variable, lock=lock, start=start, end=start + seconds)
        answers = [self.receive(index) for index in indexes]
        commits = max(1, sum(answer["commits"] for answer in answers))
        attempts = sum(answer["attempts"] for answer in answers)
        backend = [answer["backend_cpu"] for answer in answers]
        return _Run(
            rate=commits / seconds,
            aborts=(attempts - commits) / commits,
            client_ms=1000 * sum(answer["cpu"] for answer in answers) / commits,
            backend_ms=None if None in backend else 1000 * sum(backend) / commits,
        )

    def close(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is None:
                try:
                    self.send(index, op="quit")
                except OSError:
                    pass
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- 2. disjoint variables: 4 processes vs 1 --------------------------------------------------------------


def _disjoint(table: Table, workers: _Workers, base: str) -> None:
    alone, together = f"{base}-alone", f"{base}-disjoint"
    many = list(range(DISJOINT_PROCESSES))
    names = [f"v{index}" for index in many]
    workers.ask([0], op="open", store=alone, vars=["v0"])
    for index, name in zip(many, names):
        workers.ask([index], op="open", store=together, vars=[name])
    one = four = None
    for _ in range(RUNS):  # interleaved: a slow moment of the machine hits both alike
        run = workers.run([0], alone, ["v0"], "optimistic", SECONDS)
        one = run if one is None or run.rate > one.rate else one
        run = workers.run(many, together, names, "optimistic", SECONDS)
        four = run if four is None or run.rate > four.rate else four
    table.rate("1 process, optimistic commits", one.rate)
    table.rate(f"{DISJOINT_PROCESSES} processes on disjoint DVars, aggregate", four.rate)
    cores = os.cpu_count() or 1
    table.ratio(
        f"{DISJOINT_PROCESSES} processes / 1 ({four.rate:,.0f}/s vs {one.rate:,.0f}/s; {cores} CPU cores here)",
        four.rate / one.rate,
        ">= 2.5x",
        four.rate / one.rate >= 2.5,
    )
    cpu = four.client_ms + (four.backend_ms or 0.0)  # Redis not counted
    table.rows.append((
        f"  CPU per commit: workers {four.client_ms:.2f} ms"
        + ("" if four.backend_ms is None else f" + PostgreSQL {four.backend_ms:.2f} ms"),
        f"{cpu:.2f} ms",
        f"{cores} cores cap it near {1000 * cores / cpu:,.0f}/s",
        "",
    ))


# -- 3. one hot variable: the lock modes ------------------------------------------------------------------


def _hot(table: Table, workers: _Workers, base: str) -> None:
    store = f"{base}-hot"
    everyone = list(range(HOT_PROCESSES))
    workers.ask(everyone, op="open", store=store, vars=["hot"])
    modes = ("optimistic", "pessimistic", "auto")
    best = {mode: (0.0, 0.0) for mode in modes}
    for _ in range(RUNS):
        for mode in modes:
            run = workers.run(everyone, store, ["hot"] * HOT_PROCESSES, mode, HOT_SECONDS)
            if run.rate > best[mode][0]:
                best[mode] = (run.rate, run.aborts)
    for mode in modes:
        rate, aborts = best[mode]
        table.rows.append((f"{HOT_PROCESSES} processes on one hot DVar, {mode}", f"{rate:,.0f}/s",
                           f"{aborts:.2f} aborts/commit", ""))
    optimistic, pessimistic, auto = (best[mode][0] for mode in modes)
    table.rows.append(("  hot DVar: pessimistic / optimistic commits/s", f"{pessimistic / optimistic:.2f}x", "", ""))
    table.rows.append(("  hot DVar: auto / the better of the two", f"{auto / max(optimistic, pessimistic):.2f}x", "", ""))


# -- 4. wake-up latency vs raw Redis pub/sub ---------------------------------------------------------------


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _wake_up(table: Table, workers: _Workers, base: str) -> None:
    """Worker 0 blocks in retry() on a DVar; this process commits a change to it. A sample is the time from
    this process's atomically() returning to the worker's atomically() returning with the new value
    (notification, wake-up, and the re-run that fetches the row). Interleaved with it, the same worker
    receives a raw Redis PUBLISH: from just before this process publishes to the worker receiving it.
    Both sides stamp with time.time() on this machine."""
    import redis

    store_name, channel = f"{base}-wake", f"{base}-raw"
    client = redis.Redis.from_url(redis_url())
    with open_store(store_name) as store:
        flag = store.dvar("flag", 0)
        workers.send(0, op="wake", store=store_name, var="flag", channel=channel, samples=WAKE_SAMPLES)
        workers.receive(0)  # subscribed to the raw channel and loaded the DVar: ready
        ours, raw, not_blocked = [], [], 0
        for i in range(1, WAKE_SAMPLES + 1):
            # djstm: this process commits; the worker is blocked in retry() until the DVar changes.
            time.sleep(WAKE_GAP)
            djstm.atomically(flag.write, i)
            committed = time.time()
            answer = workers.receive(0)
            if answer["value"] == i and answer["attempts"] > 1:
                ours.append(answer["t"] - committed)
            else:
                not_blocked += 1  # the worker saw the change before blocking: not a wake-up
            # raw Redis: one-way PUBLISH -> the worker's SUBSCRIBE connection receives it.
            time.sleep(WAKE_GAP)
            published = time.time()
            client.publish(channel, str(i))
            raw.append(workers.receive(0)["t"] - published)
    client.close()
    ms = 1000
    ours_p50, ours_p99 = _percentile(ours, 0.5) * ms, _percentile(ours, 0.99) * ms
    raw_p50, raw_p99 = _percentile(raw, 0.5) * ms, _percentile(raw, 0.99) * ms
    table.rows.append((f"retry() wake-up across processes ({len(ours)} samples)",
                       f"p50 {ours_p50:.2f} ms", f"p99 {ours_p99:.2f} ms", ""))
    table.rows.append((f"raw Redis PUBLISH -> SUBSCRIBE ({len(raw)} samples)",
                       f"p50 {raw_p50:.2f} ms", f"p99 {raw_p99:.2f} ms", ""))
    if not_blocked:
        table.rows.append(("  (changes seen before the waiter blocked, not counted)", str(not_blocked), "", ""))
    ratio = ours_p50 / raw_p50
    table.ratio(f"wake-up p50 / raw Redis p50 ({ours_p50:.2f} ms vs {raw_p50:.2f} ms)", ratio, "<= 2x", ratio <= 2)
    table.rows.append(("  wake-up p99 / raw Redis p99", f"{ours_p99 / raw_p99:.2f}x", "", ""))


# -- the section ----------------------------------------------------------------------------------------------


def _delete_rows(stores: list[str]) -> None:
    import psycopg

    with psycopg.connect(dsn(), autocommit=True) as connection:
        connection.execute("DELETE FROM djstm_dvar WHERE store = ANY(%s)", (stores,))


def run() -> Table | _Skipped:
    title = "Distributed store (PostgreSQL + Redis pub/sub)"
    reason = _unavailable()
    if reason is not None:
        return _Skipped(title, reason)
    configure_django()
    from django.core.management import call_command

    call_command("migrate", "djstm", database=ALIAS, verbosity=0)
    table = Table(title)
    load = os.getloadavg()[0]
    table.rows.append((f"machine: {os.cpu_count()} CPU cores, load average {load:.1f} as this section starts", "", "", ""))
    base = f"bench-{uuid.uuid4().hex[:10]}"
    stores = [f"{base}-{part}" for part in ("one", "alone", "disjoint", "hot", "wake")]
    try:
        _one_process(table, f"{base}-one")  # before any worker exists: nothing else runs
        workers = _Workers(HOT_PROCESSES)
        try:
            _disjoint(table, workers, base)
            _hot(table, workers, base)
            _wake_up(table, workers, base)
        finally:
            workers.close()
    finally:
        _delete_rows(stores)
    return table
