"""Distributed stores at their edges, continued: pessimistic restarts, savepoints in fn, rows that stop
decoding or are created anew, stores opened through two aliases."""

import threading

import pytest
from django.db import connections, transaction

import djstm

from .conftest import ALIAS, bump_by_hand, run_sql, stored


def row_is_locked(store_name, name):
    """True if another connection cannot lock the row within 300 ms."""
    import psycopg

    from tests.services import require_postgres

    with psycopg.connect(require_postgres()) as other:
        other.execute("SET lock_timeout = '300ms'")
        try:
            other.execute(
                "SELECT 1 FROM djstm_dvar WHERE store = %s AND name = %s FOR UPDATE", [store_name, name]
            )
        except psycopg.errors.LockNotAvailable:
            return True
        finally:
            other.rollback()
    return False


def bounded(fn, timeout):
    """Run ``fn`` in a daemon thread; ("hung", None) if it does not finish within ``timeout``."""
    out = []

    def target():
        try:
            out.append(("ok", fn()))
        except BaseException as error:  # noqa: B036
            out.append(("error", error))
        finally:
            for alias in list(connections.settings):
                if alias.startswith(ALIAS) and hasattr(connections._connections, alias):
                    connections[alias].close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return ("hung", None)
    return out[0]


# -- a pessimistic restart whose up-front lock fails leaves no transaction open ------------------------------


def test_failed_up_front_lock_in_a_pessimistic_restart_leaves_no_open_transaction(open_store, store_name):
    """Session.__init__ locks the carried rows (begin_locked: BEGIN + autocommit=False), then raises
    (a row that does not decode); tx.remote was never assigned, so end() never rolls back."""
    store = open_store(poll_interval=60)
    a, b = store.dvar("a", 0), store.dvar("b", 0)
    attempts = []

    def fn():
        attempts.append(1)
        b.write(b.read() + 1)  # locks "b"
        if len(attempts) == 1:
            bump_by_hand(store_name, "a", "not json")  # "a" is not locked yet
        a.write(a.read() + 1)  # "a" < "b": restart with both locked up front -> the decode fails there

    try:
        with pytest.raises(djstm.DVarDecodeError):
            djstm.atomically(fn, lock="pessimistic", timeout=5)
        connection = connections[ALIAS]
        status = connection.connection.info.transaction_status if connection.connection else None
        assert connection.get_autocommit(), "Django's autocommit flag was left False on this thread"
        assert status is None or status.name == "IDLE", f"a database transaction was left open ({status.name})"
        assert not row_is_locked(store_name, "b"), "row 'b' stays locked by the abandoned transaction"
    finally:
        connections[ALIAS].close()


def test_after_a_failed_up_front_lock_transaction_atomic_still_commits(open_store, store_name):
    """The consequence for later Django code on the thread: transaction.atomic() turns into a savepoint of
    the leftover transaction and nothing it does is committed."""
    store = open_store(poll_interval=60)
    a, b = store.dvar("a", 0), store.dvar("b", 0)
    c = store.dvar("c", 0)
    attempts = []

    def fn():
        attempts.append(1)
        b.write(b.read() + 1)
        if len(attempts) == 1:
            run_sql("DELETE FROM djstm_dvar WHERE store = %s AND name = 'a'", [store_name])
        a.write(a.read() + 1)

    try:
        with pytest.raises(djstm.StoreUnavailable):
            djstm.atomically(fn, lock="pessimistic", timeout=5)
        # Later code on the same thread: a plain Django transaction that bumps a row.
        with transaction.atomic(using=ALIAS), connections[ALIAS].cursor() as cursor:
            cursor.execute(
                "UPDATE djstm_dvar SET value = '7', version = version + 1 WHERE store = %s AND name = 'c'",
                [store_name],
            )
        assert stored(store_name, "c") == ("7", 1), "transaction.atomic() did not commit"
        # And djstm itself on this thread:
        djstm.atomically(lambda: c.write(8), lock="optimistic", timeout=5)
    finally:
        connections[ALIAS].close()


# -- a row that stops decoding, or is created anew, ends in an error or a fresh value, never a loop ----------


def test_an_exception_after_reading_a_row_that_no_longer_decodes_is_not_rerun_forever(open_store, store_name):
    """fn reads x from the cache and raises; x's row was meanwhile overwritten with text that does not
    decode. still_current counts the broken row as changed but _install_rows leaves the old cached state,
    so each re-run reads the same cached value, raises again, and is re-run again."""
    store = open_store(poll_interval=60)
    x = store.dvar("x", 1)
    djstm.atomically(x.read)  # cached
    bump_by_hand(store_name, "x", "not json")
    runs = []

    def fn():
        runs.append(1)
        x.read()
        raise ValueError("refused")

    kind, value = bounded(lambda: djstm.atomically(fn, lock="optimistic", timeout=3), 8)
    assert kind == "error", kind
    assert isinstance(value, (ValueError, djstm.DVarDecodeError)), (
        f"expected the user's ValueError or a DVarDecodeError naming x, got {value!r} after {len(runs)} runs"
    )


def test_retry_on_a_row_that_no_longer_decodes_does_not_spin(open_store, store_name):
    """Before blocking, block() asks still_current(); the broken row counts as changed, so the attempt is
    re-run at once, reads the same cached value and retries again: a busy loop (a query per turn) until the
    timeout, even with lock="auto" (block() resets conflicts, so it never turns pessimistic)."""
    store = open_store(poll_interval=60)
    ready = store.dvar("ready", False)
    djstm.atomically(ready.read)
    bump_by_hand(store_name, "ready", "not json")
    runs = []

    def wait_ready():
        runs.append(1)
        if not ready.read():
            djstm.retry()
        return True

    kind, value = bounded(lambda: djstm.atomically(wait_ready, lock="auto", timeout=2), 8)
    assert len(runs) < 20, f"fn ran {len(runs)} times in 2 s ({kind}: {value!r})"
    assert isinstance(value, djstm.DVarDecodeError), f"{kind}: {value!r}"


def test_a_row_deleted_and_created_anew_by_another_worker_does_not_livelock(open_store, store_name):
    """Another worker (or an admin) deleted the row and it was created anew at version 0. This process
    cached version 3: _install_rows ignores a row older than the cache, so every optimistic attempt reads
    the old cached value, fails its commit check, refreshes nothing, and runs again, forever."""
    store = open_store(poll_interval=60)
    n = store.dvar("n", 0)
    for _ in range(3):
        djstm.atomically(lambda: n.write(n.read() + 1))
    run_sql("DELETE FROM djstm_dvar WHERE store = %s AND name = 'n'", [store_name])
    # Created anew as another process's store.dvar("n", 100) would: version 0.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        f"""
        import django, os
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        django.setup()
        import djstm
        store = djstm.with_store(database="distributed", mode="distributed", name={store_name!r}, poll_interval=60)
        store.dvar("n", 100)
        store.close()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert stored(store_name, "n") == ("100", 0)
    kind, value = bounded(lambda: djstm.atomically(lambda: n.write(n.read() + 1), lock="optimistic", timeout=3), 8)
    assert kind == "ok" or isinstance(value, djstm.StoreUnavailable), f"{kind}: {value!r}"


# -- a rolled-back savepoint inside a pessimistic fn releases row locks: the commit re-checks them -----------


def test_a_rolled_back_savepoint_inside_a_pessimistic_transaction_loses_no_update(open_store, store_name):
    """Inside a pessimistic fn, transaction.atomic() is a savepoint of djstm's BEGIN. A row first locked
    inside that savepoint is unlocked by ROLLBACK TO SAVEPOINT, but djstm still counts it as locked and
    commit_locked writes it without any version check: a concurrent update in between is lost."""
    store = open_store(poll_interval=60)
    first, counter = store.dvar("a-first", 0), store.dvar("counter", 0)
    attempts = []
    other_updated = []

    class Failed(Exception):
        pass

    def fn():
        attempts.append(1)
        first.write(first.read() + 1)  # BEGIN: djstm's own database transaction
        try:
            with transaction.atomic(using=ALIAS):  # a savepoint
                counter.write(counter.read() + 1)  # SELECT ... FOR UPDATE inside the savepoint
                raise Failed  # e.g. an IntegrityError of a model save, handled below
        except Failed:
            pass
        if len(attempts) == 1:
            # Another worker increments the counter meanwhile: it should have to wait for our lock.
            import psycopg

            from tests.services import require_postgres

            with psycopg.connect(require_postgres(), autocommit=True) as other:
                other.execute("SET lock_timeout = '300ms'")
                try:
                    other.execute(
                        "UPDATE djstm_dvar SET value = (value::int + 10)::text, version = version + 1 "
                        "WHERE store = %s AND name = 'counter'",
                        [store_name],
                    )
                    other_updated.append(True)
                except psycopg.errors.LockNotAvailable:
                    pass  # the lock held: no lost update possible

    try:
        djstm.atomically(fn, lock="pessimistic", timeout=5)
    finally:
        connections[ALIAS].close()
    value, version = stored(store_name, "counter")
    # Our +1 and, if the other worker got through, its +10: anything else is a lost update.
    expected = 1 + 10 * len(other_updated)
    assert int(value) == expected, (
        f"lost update: counter = {value} (version {version}), expected {expected}; "
        f"the other worker's update got through while djstm counted the row as locked: {bool(other_updated)}"
    )


# -- a store opened through a second alias joins that alias's transactions -----------------------------------


def test_a_store_opened_through_a_second_alias_joins_that_alias_s_transaction(open_store, store_name):
    """with_store keys stores by server and database name, so with_store(database=B) returns the store
    opened through alias A; in_callers_transaction(store.alias) then looks at A's connection and a
    transaction.atomic(using=B) is not joined: the DVar write commits although B's block rolled back."""
    other = f"{ALIAS}-second"
    connections.settings[other] = dict(connections.settings[ALIAS])
    try:
        open_store(poll_interval=60)  # e.g. opened by another module through the first alias
        store = djstm.with_store(database=other, mode="distributed", name=store_name, poll_interval=60)
        try:
            x = store.dvar("x", 0)

            class Failed(Exception):
                pass

            with pytest.raises(Failed), transaction.atomic(using=other):
                djstm.atomically(lambda: x.write(5), timeout=5)
                raise Failed
            assert stored(store_name, "x") == ("0", 0), "the DVar write escaped the rolled-back transaction"
        finally:
            store.close()
    finally:
        connections[other].close()
        del connections.settings[other]
