"""Durable stores: write-behind commit rate, the writer's throughput, and durable commits, vs stdlib sqlite3."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import djstm
from djstm import TVar, atomically
from djstm.backends.rows import _UPSERT

from ._measure import RUNS, Table, rates, timed

COMMITS = 40_000
ROWS = 20_000
DURABLE_COMMITS = 400
_UPSERT_QMARK = _UPSERT.replace("%s", "?")


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(" ")


def _write_behind_vs_ephemeral(table: Table, scratch: Path) -> None:
    counter = TVar(0)
    with djstm.with_store(scratch / "rate.sqlite3") as store:
        dvar = store.dvar("counter", 0)
        ephemeral, durable = rates(
            (lambda: atomically(lambda: counter.write(counter.read() + 1)), COMMITS, 1),
            (lambda: atomically(lambda: dvar.write(dvar.read() + 1)), COMMITS, 1),
        )
    table.rate("ephemeral TVar commits", ephemeral)
    table.rate("durable DVar commits (write-behind)", durable)
    table.ratio("durable / ephemeral commit rate", durable / ephemeral, ">= 0.7x", durable / ephemeral >= 0.7)


def _writer_vs_executemany(table: Table, scratch: Path) -> None:
    _store_with_rows(scratch / "writer.sqlite3", ROWS)
    names = _store_with_rows(scratch / "stdlib.sqlite3", ROWS)
    values = itertools.count(1)
    connection = _stdlib_connection(scratch / "stdlib.sqlite3")

    def stdlib_upsert_all() -> None:
        value = next(values)
        rows = [("default", name, "int", str(value), value, _now()) for name in names]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(_UPSERT_QMARK, rows)
        connection.execute("COMMIT")

    writer_seconds = stdlib_seconds = float("inf")
    with djstm.with_store(scratch / "writer.sqlite3") as store:
        dvars = [store.dvar(("row", i), 0) for i in range(ROWS)]
        for _ in range(RUNS):
            value = next(values)
            atomically(lambda: [d.write(value) for d in dvars])
            writer_seconds = min(writer_seconds, timed(store.sync))  # the writer's flush of all rows
            stdlib_seconds = min(stdlib_seconds, timed(stdlib_upsert_all))
    connection.close()
    table.rate("background writer rows", ROWS / writer_seconds)
    table.rate("stdlib sqlite3 executemany rows", ROWS / stdlib_seconds)
    ratio = stdlib_seconds / writer_seconds
    table.ratio("writer / stdlib executemany rows/s", ratio, ">= 0.5x", ratio >= 0.5)


def _durable_commits(table: Table, scratch: Path) -> None:
    names = _store_with_rows(scratch / "stdlib-commits.sqlite3", 1)
    connection = _stdlib_connection(scratch / "stdlib-commits.sqlite3")
    values = itertools.count(1)

    def stdlib_commit() -> None:
        value = next(values)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(_UPSERT_QMARK, ("default", names[0], "int", str(value), value, _now()))
        connection.execute("COMMIT")

    with djstm.with_store(scratch / "durable.sqlite3") as store:
        dvars = [store.dvar(("c", i), 0) for i in range(8)]
        store.sync()
        own = threading.local()
        handed_out = itertools.count()

        def durable_commit() -> None:
            if not hasattr(own, "dvar"):  # each thread commits to a DVar of its own: no conflicts
                own.dvar = dvars[next(handed_out) % len(dvars)]
            dvar = own.dvar
            atomically(lambda: dvar.write(dvar.read() + 1), durable=True)

        stdlib, one, eight = rates(
            (stdlib_commit, DURABLE_COMMITS, 1),
            (durable_commit, DURABLE_COMMITS, 1),
            (durable_commit, DURABLE_COMMITS, 8),
        )
    connection.close()
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
