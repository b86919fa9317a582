"""Durable stores: write-behind commit rate, the writer's throughput, and durable commits, vs stdlib sqlite3."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import djstm
from djstm import TVar, atomically
from djstm.backends.rows import _UPSERT

from ._measure import Table, best_time, rate

COMMITS = 40_000
ROWS = 20_000
DURABLE_COMMITS = 200


def _stdlib_connection(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")  # what djstm's store files use
    return connection


def _store_with_rows(path: Path, count: int) -> list[str]:
    """Create a store file holding ``count`` int DVars; return their row names (the same rows for both sides)."""
    with djstm.with_store(path) as store:
        dvars = [store.dvar(("row", i), 0) for i in range(count)]
    return [d.key for d in dvars]


def _write_behind_vs_ephemeral(table: Table, scratch: Path) -> None:
    counter = TVar(0)
    ephemeral = rate(lambda: atomically(lambda: counter.write(counter.read() + 1)), COMMITS)
    with djstm.with_store(scratch / "rate.sqlite3") as store:
        dvar = store.dvar("counter", 0)
        durable = rate(lambda: atomically(lambda: dvar.write(dvar.read() + 1)), COMMITS)
    table.rate("ephemeral TVar commits", ephemeral)
    table.rate("durable DVar commits (write-behind)", durable)
    table.ratio("durable / ephemeral commit rate", durable / ephemeral, ">= 0.7x", durable / ephemeral >= 0.7)


def _writer_vs_executemany(table: Table, scratch: Path) -> None:
    _store_with_rows(scratch / "writer.sqlite3", ROWS)
    names = _store_with_rows(scratch / "stdlib.sqlite3", ROWS)
    values = itertools.count(1)

    with djstm.with_store(scratch / "writer.sqlite3") as store:
        dvars = [store.dvar(("row", i), 0) for i in range(ROWS)]

        def commit_all_then_flush() -> float:
            value = next(values)
            atomically(lambda: [d.write(value) for d in dvars])
            return best_time(store.sync) if False else _time_sync(store)

        writer_seconds = min(commit_all_then_flush() for _ in range(3))

    connection = _stdlib_connection(scratch / "stdlib.sqlite3")
    now = datetime.now(timezone.utc).isoformat(" ")

    def upsert_all() -> None:
        value = next(values)
        rows = [("default", name, "int", str(value), value, now) for name in names]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(_UPSERT.replace("%s", "?"), rows)
        connection.execute("COMMIT")

    stdlib_seconds = best_time(upsert_all)
    connection.close()
    table.rate("background writer rows", ROWS / writer_seconds)
    table.rate("stdlib sqlite3 executemany rows", ROWS / stdlib_seconds)
    ratio = stdlib_seconds / writer_seconds
    table.ratio("writer / stdlib executemany rows/s", ratio, ">= 0.5x", ratio >= 0.5)


def _time_sync(store) -> float:
    import time

    started = time.perf_counter()
    store.sync()
    return time.perf_counter() - started


def _durable_commits(table: Table, scratch: Path) -> None:
    names = _store_with_rows(scratch / "stdlib-commits.sqlite3", 1)
    connection = _stdlib_connection(scratch / "stdlib-commits.sqlite3")
    values = itertools.count(1)
    now = datetime.now(timezone.utc).isoformat(" ")

    def stdlib_commit() -> None:
        value = next(values)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(_UPSERT.replace("%s", "?"), ("default", names[0], "int", str(value), value, now))
        connection.execute("COMMIT")

    stdlib = rate(stdlib_commit, DURABLE_COMMITS)
    connection.close()

    with djstm.with_store(scratch / "durable.sqlite3") as store:
        dvars = [store.dvar(("c", i), 0) for i in range(8)]
        store.sync()
        local = iter(dvars)
        import threading

        assigned = threading.local()
        pick = threading.Lock()

        def durable_commit() -> None:
            if not hasattr(assigned, "dvar"):
                with pick:
                    assigned.dvar = next(local, dvars[0])
            dvar = assigned.dvar
            atomically(lambda: dvar.write(dvar.read() + 1), durable=True)

        one = rate(durable_commit, DURABLE_COMMITS, threads=1)
        local = iter(dvars)
        assigned = threading.local()
        eight = rate(durable_commit, DURABLE_COMMITS, threads=8)

    table.rate("stdlib sqlite3, one commit per transaction", stdlib)
    table.rate("djstm durable=True, 1 thread", one)
    table.rate("djstm durable=True, 8 threads", eight)
    table.ratio("durable=True / stdlib, 1 thread", one / stdlib, ">= 0.7x", one / stdlib >= 0.7)
    table.ratio("group commit: 8 threads / 1 thread", eight / one, ">= 3x", eight / one >= 3)


def run() -> Table:
    table = Table("Durable store (SQLite file, WAL, synchronous=FULL)")
    with tempfile.TemporaryDirectory(prefix="djstm-bench-") as directory:
        scratch = Path(directory)
        _write_behind_vs_ephemeral(table, scratch)
        _writer_vs_executemany(table, scratch)
        _durable_commits(table, scratch)
    return table
