"""A 1-read-1-write transaction on one variable: djstm vs a bare lock vs ZODB (MappingStorage)."""

from __future__ import annotations

import threading

import transaction
import ZODB
from persistent import Persistent
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConflictError

from djstm import TVar, atomically

from ._measure import Table, rates

COUNT = 40_000
ZODB_COUNT = 4_000


class _Counter(Persistent):
    def __init__(self) -> None:
        self.value = 0


def _lock_update() -> object:
    lock = threading.Lock()
    box = [0]

    def update() -> None:
        with lock:
            box[0] = box[0] + 1

    return update


def _djstm_update() -> object:
    counter = TVar(0)

    def body() -> None:
        counter.write(counter.read() + 1)

    return lambda: atomically(body)


def _zodb_update() -> object:
    db = ZODB.DB(MappingStorage(), pool_size=16)  # a connection per thread
    with db.transaction() as connection:
        connection.root.counter = _Counter()
    local = threading.local()

    def update() -> None:
        if not hasattr(local, "manager"):  # ZODB connections are per thread
            local.manager = transaction.TransactionManager()
            local.root = db.open(transaction_manager=local.manager).root
        while True:
            try:
                local.manager.begin()
                local.root.counter.value += 1
                local.manager.commit()
                return
            except ConflictError:
                local.manager.abort()

    return update


def run() -> Table:
    table = Table("Engine: one read and one write per transaction")
    for threads in (1, 4):
        lock, stm, zodb = rates(
            (_lock_update(), COUNT, threads), (_djstm_update(), COUNT, threads), (_zodb_update(), ZODB_COUNT, threads)
        )
        table.rate(f"threading.Lock, {threads} thread(s)", lock)
        table.rate(f"djstm TVar, {threads} thread(s)", stm)
        table.rate(f"ZODB MappingStorage, {threads} thread(s)", zodb)
        table.ratio(f"djstm / ZODB, {threads} thread(s)", stm / zodb, ">= 3x", stm / zodb >= 3)
        table.ratio(f"lock / djstm, {threads} thread(s)", lock / stm, "<= 10x", lock / stm <= 10)
    return table
