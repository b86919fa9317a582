"""Semantics 2 and 9: no transaction ever sees an inconsistent state; repeated losers still finish."""

import random
import threading
import time

import pytest

import djstm
from djstm import TVar, atomically
from djstm.stm.runner import ESCALATE_AFTER_CONFLICTS
from tests.conftest import run_threads


def test_readers_see_the_conserved_total_inside_their_transactions(busy_switching):
    accounts = [TVar(100) for _ in range(8)]
    violations, reads = [], []
    stop = threading.Event()

    def transfer(rng):
        source, target = rng.sample(range(8), 2)
        amount = rng.randrange(30)
        accounts[source].write(accounts[source].read() - amount)
        time.sleep(0)  # invite a reader in between the two writes' reads
        accounts[target].write(accounts[target].read() + amount)

    def observe():
        total = 0
        for account in accounts:
            total += account.read()
            time.sleep(0)
        if total != 800:  # recorded inside the transaction, even if it would abort later
            violations.append(total)
        reads.append(total)

    def writer(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            atomically(transfer, rng)

    def reader():
        for _ in range(400):
            atomically(observe)
        stop.set()

    run_threads([lambda: writer(1), lambda: writer(2), reader, reader])
    assert violations == []
    assert len(reads) == 800
    assert sum(a.peek() for a in accounts) == 800


def test_x_equals_y_is_never_violated_even_in_doomed_attempts(busy_switching):
    x, y = TVar(0), TVar(0)
    violations = []
    stop = threading.Event()

    def bump():
        value = x.read() + 1
        x.write(value)
        y.write(value)

    def check_equal():
        first = x.read()
        time.sleep(0)
        if first != y.read():
            violations.append(1)

    def writer():
        while not stop.is_set():
            atomically(bump)

    def reader():
        for _ in range(2000):
            atomically(check_equal)
        stop.set()

    run_threads([writer, writer, reader])
    assert violations == []
    assert x.peek() == y.peek() > 0


def test_a_long_transaction_under_constant_conflicts_is_escalated_and_finishes():
    cells = [TVar(0) for _ in range(40)]
    stop = threading.Event()
    attempts = []

    def long_sum():
        attempts.append(1)
        total = 0
        for cell in cells:
            total += cell.read()
            time.sleep(0.0005)  # long enough that a writer always commits meanwhile
        cells[0].write(cells[0].read())
        return total

    def writer(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            atomically(lambda: cells[rng.randrange(40)].modify(lambda n: n + 1))

    writers = [threading.Thread(target=writer, args=(seed,), daemon=True) for seed in range(3)]
    for thread in writers:
        thread.start()
    try:
        total = atomically(long_sum, timeout=30)
    finally:
        stop.set()
        for thread in writers:
            thread.join(5)
    assert total >= 0
    assert len(attempts) > ESCALATE_AFTER_CONFLICTS  # it really lost often enough to escalate


def test_an_escalated_transactions_callback_can_commit_without_deadlock():
    from djstm.stm.runner import _Run, _run_blocking

    a, b = TVar(0), TVar(0)

    def body():
        a.write(1)
        djstm.after_commit(lambda: atomically(lambda: b.write(2)))

    # Start as if it had already lost often enough to be escalated.
    finished = threading.Thread(
        target=_run_blocking, args=(_Run(body, (), {}, None, False, conflicts=ESCALATE_AFTER_CONFLICTS),), daemon=True
    )
    finished.start()
    finished.join(10)
    assert not finished.is_alive(), "the callback's transaction waited on the escalation gate forever"
    assert (a.peek(), b.peek()) == (1, 2)


def test_timeout_bounds_the_wait_behind_an_escalated_transaction():
    from djstm.stm.runner import _Run, _run_blocking

    slow, other = TVar(0), TVar(0)
    inside = threading.Event()

    def long_escalated():
        slow.write(1)
        inside.set()
        time.sleep(1.0)

    escalated = threading.Thread(
        target=_run_blocking, args=(_Run(long_escalated, (), {}, None, False, conflicts=ESCALATE_AFTER_CONFLICTS),)
    )
    escalated.start()
    try:
        assert inside.wait(5)
        started = time.monotonic()
        with pytest.raises(djstm.Timeout):
            atomically(lambda: other.write(1), timeout=0.1)
        assert time.monotonic() - started < 0.9
        assert other.peek() == 0
    finally:
        escalated.join(10)
