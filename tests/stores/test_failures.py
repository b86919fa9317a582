"""Durable stores when things go wrong: a database that refuses writes, closing under load, bad paths."""

import sqlite3
import threading

import pytest

import djstm
from djstm import TVar, atomically, or_else, retry
from tests.stores.conftest import plain_python

REFUSE_UPDATES = "CREATE TRIGGER refuse BEFORE UPDATE ON djstm_dvar BEGIN SELECT RAISE(FAIL, 'disk says no'); END;"


def _sql(path, script):
    connection = sqlite3.connect(path)
    connection.executescript(script)
    connection.close()


def _open_in_another_process(path):
    return plain_python("import sys, djstm\ndjstm.with_store(sys.argv[1])", path)


def _commit_that_the_disk_refuses(store_path):
    """Open the store, make its database refuse updates, and commit ``n = 1``; return (store, the DVar)."""
    store = djstm.with_store(store_path)
    n = store.dvar("n", 0)
    store.sync()
    _sql(store_path, REFUSE_UPDATES)
    atomically(n.write, 1)
    return store, n


def test_a_failing_flush_raises_a_djstm_error_and_keeps_the_commit_for_later(store_path):
    store, v = _commit_that_the_disk_refuses(store_path)
    with store:
        with pytest.raises(djstm.STMError, match=r"store 'default'.*could not write.*disk says no"):
            store.sync()
        with pytest.raises(djstm.STMError, match="could not write"):
            atomically(v.write, 2, durable=True)
        assert v.peek() == 2
        _sql(store_path, "DROP TRIGGER refuse;")
        store.sync()  # the rows were kept: they reach the disk once it accepts them
    with djstm.with_store(store_path) as store:
        assert store.dvar("n", 0).peek() == 2


def test_closing_with_a_failing_flush_says_what_was_lost(store_path):
    store, _ = _commit_that_the_disk_refuses(store_path)
    with pytest.raises(djstm.STMError, match=r"closed with 1 commit\(s\).*lost"):
        store.close()
    assert store.closed
    _sql(store_path, "DROP TRIGGER refuse;")
    with djstm.with_store(store_path) as again:  # the process lock was released all the same
        assert again.dvar("n", 0).peek() == 0


def test_closing_and_reopening_from_two_threads_loses_nothing(store_path):
    def worker():
        for _ in range(150):
            with djstm.with_store(store_path) as store:
                v = store.dvar("n", 0)
                atomically(lambda: v.modify(lambda n: n + 1))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with djstm.with_store(store_path) as store:
        assert store.dvar("n", 0).peek() == 300
        assert "StoreLocked" in _open_in_another_process(store_path).stderr  # the process still holds its lock


def test_a_rolled_back_write_to_a_closed_store_does_not_block_the_commit(store_path):
    store = djstm.with_store(store_path)
    old = store.dvar("x", 0)
    store.close()
    t = TVar(0)

    def branch():
        old.write(1)
        retry()

    atomically(lambda: or_else(branch, lambda: t.write(5)))
    assert t.peek() == 5


def test_a_closed_store_refuses_dvar_even_for_names_it_had(store_path):
    store = djstm.with_store(store_path)
    store.dvar("x", 0)
    store.close()
    with pytest.raises(djstm.StoreClosed):
        store.dvar("x", 0)


@pytest.mark.parametrize(
    "make_path, complaint",
    [
        (lambda tmp: tmp / "missing" / "s.sqlite3", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: ":memory:", "file on disk"),
    ],
)
def test_paths_that_cannot_hold_a_store_are_refused(tmp_path, make_path, complaint):
    with pytest.raises(djstm.StoreUnavailable, match=complaint):
        djstm.with_store(make_path(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_table_of_the_wrong_shape_is_store_corrupt_and_untouched(store_path):
    _sql(store_path, "CREATE TABLE djstm_dvar (id INTEGER PRIMARY KEY, name TEXT);")
    before = store_path.read_bytes()
    with pytest.raises(djstm.StoreCorrupt, match="without the columns"):
        djstm.with_store(store_path)
    assert store_path.read_bytes() == before


def test_a_missing_name_without_default_is_dvar_not_found(store_path):
    with djstm.with_store(store_path) as store:
        with pytest.raises(djstm.DVarNotFound, match="pass a default") as raised:
            store.dvar("absent")
        assert isinstance(raised.value, KeyError)


def test_a_closed_store_never_writes_again(store_path):
    old, _ = _commit_that_the_disk_refuses(store_path)
    with pytest.raises(djstm.STMError, match="lost"):
        old.close()
    _sql(store_path, "DROP TRIGGER refuse;")
    with djstm.with_store(store_path) as new:
        atomically(new.dvar("n").write, 100)
        new.sync()
        with pytest.raises(djstm.STMError, match="is closed"):
            old.sync()  # must not flush its leftovers over the new store's commits
        assert new.dvar("n").peek() == 100
    with djstm.with_store(store_path) as again:
        assert again.dvar("n").peek() == 100


def test_a_symlinked_file_name_meets_the_same_process_lock(store_path, tmp_path):
    link = tmp_path / "link.sqlite3"
    link.symlink_to(store_path)
    with djstm.with_store(store_path):
        assert "StoreLocked" in _open_in_another_process(link).stderr


def test_closing_a_store_ends_transactions_blocked_on_its_dvars(store_path):
    store = djstm.with_store(store_path)
    flag = store.dvar("flag", False)
    outcome = []

    def wait_for_flag():
        try:
            atomically(lambda: djstm.check(flag.read()), timeout=20)
        except BaseException as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait_for_flag)
    waiter.start()
    from tests.conftest import wait_until

    wait_until(lambda: flag._waiters, what="the transaction to block on flag")
    store.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], djstm.StoreClosed), outcome
    assert "store is closed" in str(outcome[0])
    assert not flag._waiters


def test_database_work_called_directly_in_a_coroutine_gets_a_djstm_error(store_path):
    import asyncio

    with djstm.with_store(store_path) as store:
        loaded = store.dvar("loaded", 1)

        async def main():
            assert store.dvar("loaded") is loaded  # already in memory: fine anywhere
            for call in (store.sync, lambda: store.dvar("new", 0)):
                with pytest.raises(djstm.STMError, match="coroutine.*aatomically"):
                    call()
            return await djstm.aatomically(lambda: store.dvar("new", 0).read())  # the way out

        assert asyncio.run(main()) == 0
