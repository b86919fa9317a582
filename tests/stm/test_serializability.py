"""Semantics 1, checked by a model: concurrent random transactions equal some serial order."""

import itertools
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djstm import TVar, atomically

VARIABLES = 3

operation = st.one_of(
    st.tuples(st.just("read"), st.integers(0, VARIABLES - 1)),
    st.tuples(st.just("write"), st.integers(0, VARIABLES - 1), st.integers(-5, 5)),
    st.tuples(st.just("add"), st.integers(0, VARIABLES - 1), st.integers(0, VARIABLES - 1)),
    st.tuples(st.just("yield")),
)
program = st.lists(operation, min_size=1, max_size=6)


def run_program(ops, read, write):
    """Interpret ``ops``; return the values it read, in order (the transaction's observable output)."""
    observed = []
    for op in ops:
        if op[0] == "read":
            observed.append(read(op[1]))
        elif op[0] == "write":
            write(op[1], op[2])
        elif op[0] == "add":
            total = read(op[1]) + read(op[2])
            observed.append(total)
            write(op[1], total)
        else:
            time.sleep(0)  # let another thread run in the middle of this transaction
    return observed


def serial_explanation(initial, programs, observed, final):
    """Return an order of the programs whose serial run explains every output and the final state."""
    for order in itertools.permutations(range(len(programs))):
        state = list(initial)
        explained = True
        for index in order:
            outputs = run_program(programs[index], state.__getitem__, state.__setitem__)
            if outputs != observed[index]:
                explained = False
                break
        if explained and state == final:
            return order
    return None


def test_the_checker_rejects_a_lost_update():
    programs = [[("add", 0, 1)], [("add", 0, 1)]]
    # Both read x0=0 (a lost update): no serial order explains it.
    assert serial_explanation([0, 1, 0], programs, [[1], [1]], [1, 1, 0]) is None
    assert serial_explanation([0, 1, 0], programs, [[1], [2]], [2, 1, 0]) == (0, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=st.lists(program, min_size=2, max_size=5), initial=st.lists(st.integers(-3, 3), min_size=VARIABLES, max_size=VARIABLES))
def test_concurrent_random_transactions_are_serializable(programs, initial):
    cells = [TVar(value) for value in initial]
    observed = [None] * len(programs)
    start = threading.Barrier(len(programs))

    def worker(index):
        start.wait(5)
        observed[index] = atomically(
            run_program, programs[index], lambda i: cells[i].read(), lambda i, v: cells[i].write(v)
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(programs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    final = [cell.peek() for cell in cells]
    assert serial_explanation(initial, programs, observed, final) is not None, (programs, observed, final)
