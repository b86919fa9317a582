"""Semantics 4 and 5: retry blocks until something read changes; or_else; timeouts."""

import sys
import threading

import pytest

import djstm
from djstm import TVar, atomically, check, or_else, retry
from tests.conftest import run_threads, wait_until


def _in_thread(fn, **options):
    result = {}

    def run():
        try:
            result["value"] = atomically(fn, **options)
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_retry_wakes_when_another_thread_writes_what_it_read():
    box = TVar(None, label="box")

    def take():
        value = box.read()
        check(value is not None)
        box.write(None)
        return value

    thread, result = _in_thread(take, timeout=10)
    wait_until(lambda: box._waiters, what="the taker to block")
    atomically(lambda: box.write("parcel"))
    thread.join(10)
    assert result == {"value": "parcel"}
    assert box.peek() is None
    assert not box._waiters


def test_retry_that_read_nothing_raises_instead_of_sleeping_forever():
    with pytest.raises(djstm.RetryWithNothingRead, match="read the variables"):
        atomically(retry)


def test_timeout_raises_timeout_naming_what_it_waited_on():
    gate = TVar(False, label="gate")
    with pytest.raises(djstm.Timeout, match="gate") as raised:
        atomically(lambda: check(gate.read()), timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    assert not gate._waiters


def test_a_first_access_by_write_still_wakes_the_retrying_transaction():
    slot = TVar(0, label="slot")
    attempts = []

    def claim():
        attempts.append(1)
        slot.write(len(attempts))  # the first access to slot is a write
        if len(attempts) == 1:
            retry()

    thread, result = _in_thread(claim, timeout=10)
    wait_until(lambda: slot._waiters, what="the claim to block on slot")
    atomically(lambda: slot.write(100))
    thread.join(10)
    assert "error" not in result
    assert len(attempts) == 2
    assert slot.peek() == 2


def test_or_else_rolls_back_a_retrying_branch_and_takes_the_next():
    a, b = TVar(0), TVar(0)

    def first():
        a.write(1)
        retry_unless_b()

    def retry_unless_b():
        check(b.read() > 0)

    def second():
        b.write(2)
        return "second"

    assert atomically(lambda: or_else(first, second)) == "second"
    assert (a.peek(), b.peek()) == (0, 2)


def test_when_every_branch_retries_it_waits_on_the_union_of_their_reads():
    left, right = TVar(None, label="left"), TVar(None, label="right")

    def take_either():
        def take(box):
            value = box.read()
            check(value is not None)
            box.write(None)
            return value

        return or_else(lambda: take(left), lambda: take(right))

    for box in (right, left):
        thread, result = _in_thread(take_either, timeout=10)
        wait_until(lambda: left._waiters and right._waiters, what="registration on both branches")
        atomically(lambda: box.write(f"via {box.label}"))
        thread.join(10)
        assert result == {"value": f"via {box.label}"}
        assert not left._waiters and not right._waiters


def test_a_long_or_else_chain_costs_work_linear_in_its_length_and_wakes_on_any():
    def calls_for_one_attempt(length):
        boxes = [TVar(False) for _ in range(length)]
        scratch = TVar(0)

        def branch(box):
            scratch.write(scratch.read() + 1)  # each branch writes, so rollback work is counted too
            check(box.read())

        alternatives = [lambda box=box: branch(box) for box in boxes]
        counted = [0]

        def profiler(frame, event, arg):
            if event in ("call", "c_call"):
                counted[0] += 1

        def body():
            sys.setprofile(profiler)
            try:
                return or_else(*alternatives)
            finally:
                sys.setprofile(None)

        thread, result = _in_thread(body, timeout=10)
        wait_until(lambda: all(box._waiters for box in boxes), what=f"registration on all {length} branches")
        chosen = length * 2 // 3
        atomically(lambda: boxes[chosen].write(True))
        thread.join(10)
        assert "error" not in result
        return counted[0]

    small, large = calls_for_one_attempt(200), calls_for_one_attempt(2000)
    assert large < small * 10 * 1.5  # linear: ten times the branches, about ten times the calls


def test_nested_binary_or_else_waits_on_every_level():
    boxes = [TVar(False) for _ in range(50)]

    def nested(index):
        if index == len(boxes) - 1:
            return check(boxes[index].read()) or index
        return or_else(lambda: check(boxes[index].read()) or index, lambda: nested(index + 1))

    thread, result = _in_thread(lambda: nested(0), timeout=10)
    wait_until(lambda: all(box._waiters for box in boxes), what="registration on every level")
    atomically(lambda: boxes[37].write(True))
    thread.join(10)
    assert result == {"value": 37}


def test_a_tvar_made_in_a_rolled_back_block_reads_as_created():
    made = []

    def inner():
        fresh = TVar("as created")
        made.append(fresh)
        fresh.write("written in the rolled-back block")
        raise RuntimeError

    def outer():
        try:
            atomically(inner)
        except RuntimeError:
            pass
        return made[0].read()

    assert atomically(outer) == "as created"
    assert made[0].peek() == "as created"

    def branch_that_retries():
        fresh = TVar(1)
        made.append(fresh)
        fresh.write(2)
        retry()

    witness = TVar(0)
    assert atomically(lambda: or_else(lambda: (witness.read(), branch_that_retries()), lambda: made[-1].read())) == 1


def test_woken_groups_are_served_fairly():
    """Two groups wait on one mailbox for tokens addressed to them; each group, and each waiter, is served."""
    mailbox = TVar(None)
    served = {(group, n): 0 for group in "AB" for n in range(3)}
    rounds = 480  # enough that every waiter wins some, however the machine schedules threads
    done = TVar(False)

    def waiter(group, n):
        def take():
            if done.read():
                return False
            token = mailbox.read()
            check(token == group)
            mailbox.write(None)
            return True

        while atomically(take, timeout=20):
            served[(group, n)] += 1

    def producer():
        for i in range(rounds):
            token = "AB"[i % 2]
            atomically(lambda: (check(mailbox.read() is None), mailbox.write(token)), timeout=20)
        atomically(lambda: (check(mailbox.read() is None), done.write(True)), timeout=20)

    run_threads([producer] + [lambda g=g, n=n: waiter(g, n) for g in "AB" for n in range(3)])
    per_group = {group: sum(count for (g, _), count in served.items() if g == group) for group in "AB"}
    assert per_group == {"A": rounds // 2, "B": rounds // 2}
    assert min(served.values()) > 0, served
