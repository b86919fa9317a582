"""Distributed stores at their edges: races around retry, rolled-back creation, stale exceptions, bad rows,
lock waits within a timeout, forked workers, long names, failed commits, Django transaction modes."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from django.db import connections, transaction

import djstm

from .conftest import ALIAS, bump_by_hand, run_sql, stored

ROOT = Path(__file__).resolve().parents[2]


def in_thread(fn, timeout=10):
    """Run ``fn`` in another thread (its own transaction context and connection), bounded."""
    out = []

    def target():
        try:
            out.append(("ok", fn()))
        except BaseException as error:
            out.append(("error", error))
        finally:
            connections[ALIAS].close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "helper thread hung"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


# -- retry: a change between the read and the retry re-runs the transaction ----------------------------------


def test_retry_after_a_concurrent_local_commit_reruns_instead_of_leaking_conflict(open_store):
    store = open_store(poll_interval=60)
    ready = store.dvar("ready", False)
    attempts = []

    def wait_ready():
        attempts.append(1)
        if ready.read():
            return "ready"
        if len(attempts) == 1:
            # Another thread of this process commits the awaited change before we reach retry().
            in_thread(lambda: djstm.atomically(lambda: ready.write(True)))
        djstm.retry()

    outcome = []

    def run():
        try:
            outcome.append(djstm.atomically(wait_ready, timeout=5))
        except BaseException as error:  # noqa: B036 - the bug is a BaseException escaping
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert outcome == ["ready"], f"atomically raised {outcome[0]!r} ({type(outcome[0]).__mro__})"


# -- creating a DVar inside a transaction that rolls back, or after its row was deleted ----------------------


def test_a_dvar_created_in_a_rolled_back_django_transaction_can_be_used_afterwards(open_store, store_name):
    store = open_store(poll_interval=60)
    with pytest.raises(RuntimeError), transaction.atomic(using=ALIAS):
        store.dvar("cart", 0)  # e.g. a view under ATOMIC_REQUESTS that then fails
        raise RuntimeError("the request failed")
    cart = store.dvar("cart", 0)  # the next request opens it again
    djstm.atomically(lambda: cart.write(cart.read() + 1), timeout=10)
    assert stored(store_name, "cart") == ("1", 1)


def test_a_dvar_created_inside_a_pessimistic_transaction_that_fails_can_be_used_afterwards(open_store, store_name):
    store = open_store(poll_interval=60)
    a = store.dvar("a", 0)

    def fn():
        a.write(a.read() + 1)  # pessimistic: the database transaction is open from here
        store.dvar("new", 5)
        raise ValueError("validation failed")

    with pytest.raises(ValueError):
        djstm.atomically(fn, lock="pessimistic", timeout=10)
    new = store.dvar("new", 5)
    assert djstm.atomically(new.read, timeout=10) == 5


def test_a_pessimistic_restart_after_creating_a_dvar_loses_no_write(open_store, store_name):
    store = open_store(poll_interval=60)
    b = store.dvar("b", 0)

    def fn():
        b.write(b.read() + 1)  # locks "b"
        new = store.dvar("a-new", 5)  # INSERT inside the open database transaction
        new.write(new.read() + 1)  # "a-new" < "b": release everything, re-run with both locked up front

    djstm.atomically(fn, lock="pessimistic", timeout=10)
    assert stored(store_name, "b") == ("1", 1)
    assert stored(store_name, "a-new") == ("6", 1)


def test_a_row_deleted_by_hand_can_be_created_anew_as_the_error_says(open_store, store_name):
    store = open_store(poll_interval=60)
    flag = store.dvar("flag", 1)
    djstm.atomically(flag.read)
    run_sql("DELETE FROM djstm_dvar WHERE store = %s AND name = 'flag'", [store_name])
    with pytest.raises(djstm.StoreUnavailable, match="open it again with store.dvar"):
        djstm.atomically(flag.read, timeout=10)
    flag = store.dvar("flag", 1)  # as the message says
    assert djstm.atomically(flag.read, timeout=10) == 1


# -- an exception is never decided on a stale cached value ---------------------------------------------------


def test_an_exception_escaping_fn_is_not_decided_on_a_stale_cache(open_store, store_name):
    store = open_store(poll_interval=60)
    balance = store.dvar("balance", 5)
    djstm.atomically(balance.read)  # cached: 5
    bump_by_hand(store_name, "balance", "100")  # another program (or a worker whose notification is late) paid in

    class Insufficient(Exception):
        pass

    def withdraw():
        value = balance.read()
        if value < 50:
            raise Insufficient(value)
        balance.write(value - 50)
        return value - 50

    # The transaction starts after the payment committed: it must see 100, not refuse on the cached 5.
    assert djstm.atomically(withdraw, timeout=10) == 50


# -- a DVar that does not decode leaves reads of other DVars alone -------------------------------------------


def test_a_row_that_does_not_decode_does_not_break_reads_of_other_dvars(open_store, store_name):
    store = open_store(poll_interval=60)
    x, y = store.dvar("x", 1), store.dvar("y", 1)
    z = store.dvar("z", 1)
    djstm.atomically(lambda: (x.read(), y.read()))  # x and y now cached by one query
    bump_by_hand(store_name, "y", "not json")
    # This transaction never reads y.
    assert djstm.atomically(lambda: (z.read(), x.read()), timeout=10) == (1, 1)


# -- timeout= bounds a wait for a row lock -------------------------------------------------------------------


@pytest.mark.parametrize("lock", ["optimistic", "pessimistic"])
def test_timeout_bounds_a_wait_for_a_row_lock(open_store, store_name, lock):
    import psycopg

    from tests.services import require_postgres

    store = open_store(poll_interval=60)  # LOCK_TIMEOUT: the default 5 s
    seat = store.dvar("seat", "free")
    with psycopg.connect(require_postgres()) as holder:
        holder.execute("SELECT 1 FROM djstm_dvar WHERE store = %s AND name = 'seat' FOR UPDATE", [store_name])
        started = time.monotonic()
        with pytest.raises(djstm.Timeout):
            djstm.atomically(lambda: seat.write("taken"), timeout=0.5, lock=lock)
        elapsed = time.monotonic() - started
        holder.rollback()
    assert elapsed < 2.5, f"atomically(timeout=0.5) returned after {elapsed:.1f}s"


# -- forked workers (gunicorn --preload, multiprocessing) wake each other ------------------------------------

_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, json
    import django
    django.setup()
    import djstm
    from django.db import connections

    store_name, how = sys.argv[1], sys.argv[2]
    if how == "open":
        # App start-up in the parent (e.g. gunicorn --preload): the store is opened once, then workers fork.
        store = djstm.with_store(database="distributed", mode="distributed", name=store_name, poll_interval=30)
        ready = store.dvar("ready", False)
    else:
        import djstm.stores.distributed  # only imported before the fork; each worker opens the store itself
    connections.close_all()  # as Django's docs say, before forking

    def opened():
        if how == "open":
            return ready
        store = djstm.with_store(database="distributed", mode="distributed", name=store_name, poll_interval=30)
        return store.dvar("ready", False)

    waiter = os.fork()
    if waiter == 0:
        ready = opened()
        started = time.monotonic()
        try:
            djstm.atomically(lambda: ready.read() or djstm.retry(), timeout=8)
            print(json.dumps({"woke_after": time.monotonic() - started}), flush=True)
        except djstm.Timeout:
            print(json.dumps({"woke_after": None}), flush=True)
        os._exit(0)
    writer = os.fork()
    if writer == 0:
        ready = opened()
        time.sleep(1.5)  # let the waiter block
        djstm.atomically(lambda: ready.write(True))
        time.sleep(1)  # let the notification leave
        os._exit(0)
    os.waitpid(writer, 0)
    os.waitpid(waiter, 0)
    """
)


@pytest.mark.parametrize("how", ["open", "import"])
def test_forked_workers_wake_each_other(store_name, tmp_path, how):
    from tests.services import require_redis

    require_redis()
    script = tmp_path / "fork.py"
    script.write_text(_FORK_SCRIPT)
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(script), store_name, how], env=env, cwd=ROOT, capture_output=True, text=True, timeout=40
    )
    import json

    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-3000:]
    woke_after = lines[0]["woke_after"]
    assert woke_after is not None and woke_after < 4, f"the forked waiter woke after {woke_after}s (None: never)"


# -- the longest names that pass validation fit the index ----------------------------------------------------


def test_the_longest_allowed_names_can_be_created(open_store, store_name):
    import random

    from djstm.names import MAX_NAME_CHARS, MAX_STORE_NAME_CHARS

    rng = random.Random(store_name)  # names of this test alone
    store_name = "".join(chr(rng.randrange(0x20000, 0x2A6D0)) for _ in range(MAX_STORE_NAME_CHARS))
    name = "".join(chr(rng.randrange(0x20000, 0x2A6D0)) for _ in range(MAX_NAME_CHARS))
    store = open_store(name=store_name, poll_interval=60)
    v = store.dvar(name, 1)
    djstm.atomically(lambda: v.write(v.read() + 1), timeout=10)
    assert djstm.atomically(v.read) == 2


# -- a failed mixed (TVar + DVar) commit leaves the connection usable ----------------------------------------


def test_an_integrity_error_in_a_mixed_commit_leaves_the_connection_usable(open_store, store_name):
    store = open_store(poll_interval=60)
    x = store.dvar("x", "fine")
    audit = djstm.TVar(0)
    run_sql("ALTER TABLE djstm_dvar ADD CONSTRAINT djstm_test_adv_no_boom CHECK (value <> '\"boom\"')")
    try:
        from django.db import IntegrityError

        with pytest.raises(IntegrityError):
            djstm.atomically(lambda: (audit.write(1), x.write("boom")), lock="optimistic", timeout=10)
    finally:
        run_sql("ALTER TABLE djstm_dvar DROP CONSTRAINT djstm_test_adv_no_boom")
    assert djstm.atomically(lambda: x.write("ok"), timeout=10) is None
    assert stored(store_name, "x") == ('"ok"', 1)


# -- set_autocommit(False): refused with the way out ---------------------------------------------------------


def test_atomically_under_manual_transaction_management_is_refused_clearly(open_store, store_name):
    store = open_store(poll_interval=60)
    a = store.dvar("a", 0)
    transaction.set_autocommit(False, using=ALIAS)  # Django's "manual transaction management"
    try:
        with pytest.raises(djstm.STMError, match="transaction.atomic"):
            djstm.atomically(lambda: a.write(1), timeout=10)
    finally:
        transaction.rollback(using=ALIAS)
        transaction.set_autocommit(True, using=ALIAS)
    assert stored(store_name, "a") == ("0", 0)
    assert a.peek() == 0


# -- transaction.atomic() inside a pessimistic transaction nests in it ---------------------------------------


def test_transaction_atomic_inside_a_pessimistic_transaction(open_store, store_name):
    store = open_store(poll_interval=60)
    a = store.dvar("a", 0)

    def fn():
        a.write(a.read() + 1)
        with transaction.atomic(using=ALIAS):  # e.g. Model.objects.get_or_create() inside the transaction
            with connections[ALIAS].cursor() as cursor:
                cursor.execute("SELECT 1")

    djstm.atomically(fn, lock="pessimistic", timeout=10)
    assert stored(store_name, "a") == ("1", 1)
