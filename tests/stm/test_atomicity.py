"""Semantics 1 and 3: atomic, isolated transactions; exceptions discard writes; nested savepoints."""

import random
import threading

import pytest

import djstm
from djstm import TVar, after_commit, atomically, or_else, retry
from tests.conftest import run_threads, wait_until


def test_threads_hammering_shared_tvars_get_exact_totals(busy_switching):
    counters = [TVar(0) for _ in range(3)]

    def increment_all():
        for counter in counters:
            counter.write(counter.read() + 1)

    def worker():
        for _ in range(2000):
            atomically(increment_all)

    run_threads([worker] * 8)
    assert [c.peek() for c in counters] == [16000, 16000, 16000]


def test_an_exception_discards_all_writes_and_propagates_unchanged():
    a, b = TVar(1), TVar(2)
    boom = ValueError("boom")

    def fails():
        a.write(10)
        b.write(20)
        raise boom

    with pytest.raises(ValueError) as raised:
        atomically(fails)
    assert raised.value is boom
    assert (a.peek(), b.peek()) == (1, 2)


def test_read_and_write_outside_a_transaction_raise_no_transaction():
    v = TVar(0, label="counter")
    with pytest.raises(djstm.NoTransaction, match="counter.*peek"):
        v.read()
    with pytest.raises(djstm.NoTransaction):
        v.write(1)
    for operation in (djstm.retry, lambda: djstm.check(False), lambda: or_else(lambda: 1), lambda: after_commit(print)):
        with pytest.raises(djstm.NoTransaction):
            operation()
    assert v.peek() == 0


def test_result_args_and_kwargs_pass_through():
    v = TVar(5)

    def add(amount, *, times):
        v.write(v.read() + amount * times)
        return v.read()

    assert atomically(add, 2, times=3) == 11
    assert v.peek() == 11


def test_nested_atomically_discards_only_the_inner_writes():
    a, b, c = TVar(0), TVar(0), TVar(0)

    def inner():
        b.write(2)
        raise KeyError("inner")

    def outer():
        a.write(1)
        try:
            atomically(inner)
        except KeyError:
            pass
        c.write(b.read() + 3)

    atomically(outer)
    assert (a.peek(), b.peek(), c.peek()) == (1, 0, 3)


def test_nested_savepoints_roll_back_to_the_right_level():
    v = TVar("start")

    def innermost():
        v.write("innermost")
        raise RuntimeError

    def middle():
        v.write("middle")
        try:
            atomically(innermost)
        except RuntimeError:
            assert v.read() == "middle"
        return v.read()

    def outer():
        v.write("outer")
        seen = atomically(middle)
        return seen, v.read()

    assert atomically(outer) == ("middle", "middle")
    assert v.peek() == "middle"


def test_a_successful_nested_call_joins_the_outer_transaction():
    v = TVar(0)

    def outer():
        atomically(lambda: v.write(1))
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        atomically(outer)
    assert v.peek() == 0


def test_transactional_runs_atomically_or_joins_the_caller():
    v = TVar(0)

    @djstm.transactional
    def bump(by):
        v.write(v.read() + by)
        return v.read()

    assert bump(2) == 2

    def outer():
        bump(3)
        raise LookupError

    with pytest.raises(LookupError):
        atomically(outer)
    assert v.peek() == 2
    assert bump.__name__ == "bump"


def test_after_commit_runs_once_and_never_on_abort_or_retry():
    gate = TVar(False)
    calls, attempts = [], []

    def body():
        attempts.append(1)
        after_commit(lambda: calls.append("committed"))
        djstm.check(gate.read())

    waiting = threading.Thread(target=lambda: atomically(body, timeout=5))
    waiting.start()
    wait_until(lambda: gate._waiters, what="the first attempt to block in retry")
    atomically(lambda: gate.write(True))
    waiting.join(5)
    assert len(attempts) == 2
    assert calls == ["committed"]

    def aborts():
        after_commit(lambda: calls.append("aborted"))
        raise ValueError

    with pytest.raises(ValueError):
        atomically(aborts)
    assert calls == ["committed"]


def test_after_commit_of_a_rolled_back_branch_is_dropped():
    calls = []
    v = TVar(0)

    def alternative_that_retries():
        after_commit(lambda: calls.append("first"))
        v.read()
        retry()

    def body():
        return or_else(alternative_that_retries, lambda: after_commit(lambda: calls.append("second")))

    atomically(body)
    assert calls == ["second"]


def test_after_commit_callbacks_run_in_commit_order_across_threads(busy_switching):
    counter = TVar(0)
    seen = []

    def increment():
        value = counter.read() + 1
        counter.write(value)
        after_commit(lambda: seen.append(value))

    def worker():
        for _ in range(300):
            atomically(increment)

    run_threads([worker] * 6)
    assert seen == list(range(1, 1801))


def test_after_commit_errors_surface_after_every_callback_ran():
    calls = []

    def body():
        after_commit(lambda: calls.append(1))
        after_commit(lambda: 1 / 0)
        after_commit(lambda: calls.append(3))

    with pytest.raises(ZeroDivisionError):
        atomically(body)
    assert calls == [1, 3]


def test_random_transfers_conserve_the_total(busy_switching):
    accounts = [TVar(100) for _ in range(10)]

    def transfer(source, target, amount):
        accounts[source].write(accounts[source].read() - amount)
        accounts[target].write(accounts[target].read() + amount)

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(1000):
            atomically(transfer, rng.randrange(10), rng.randrange(10), rng.randrange(50))

    run_threads([lambda s=s: worker(s) for s in range(6)])
    assert sum(a.peek() for a in accounts) == 1000


def test_a_callback_may_run_a_transaction_of_its_own_and_it_commits():
    a, b = TVar(0), TVar(0)
    nested_callback_ran = []

    def second():
        b.write(42)
        after_commit(lambda: nested_callback_ran.append(b.peek()))

    atomically(lambda: (a.write(1), after_commit(lambda: atomically(second))))
    assert (a.peek(), b.peek()) == (1, 42)
    assert nested_callback_ran == [42]


def test_an_async_function_is_refused_with_a_clear_error():
    async def not_a_transaction():
        return 1

    for run in (lambda: atomically(not_a_transaction), lambda: atomically(lambda: atomically(not_a_transaction))):
        with pytest.raises(TypeError, match="async function.*aatomically"):
            run()


@pytest.mark.parametrize("timeout, error", [("1", TypeError), (True, TypeError), (-1, ValueError)])
def test_a_bad_timeout_is_refused(timeout, error):
    with pytest.raises(error, match="timeout"):
        atomically(lambda: None, timeout=timeout)
