"""Durable stores: reopening, identity, names, write-behind, group commit, locking and corruption."""

import hashlib
import sqlite3
import threading
import time

import pytest

import djstm
from djstm import TVar, atomically, check
from tests.conftest import run_threads, wait_until
from tests.stores.conftest import plain_python


def _disk_value(path, name, store="default"):
    """The value column as it is on disk right now, read with the stdlib driver."""
    connection = sqlite3.connect(path, timeout=10)
    try:
        row = connection.execute("SELECT value FROM djstm_dvar WHERE store = ? AND name = ?", (store, name)).fetchone()
    finally:
        connection.close()
    return None if row is None else row[0]


class HeldDatabaseLock:
    """SQLite's write lock, held from another connection so that the store's writer cannot flush."""

    def __init__(self, path):
        self._connection = sqlite3.connect(path, timeout=10, isolation_level=None)
        self._connection.execute("BEGIN IMMEDIATE")

    def release(self):
        if self._connection is not None:
            self._connection.execute("COMMIT")
            self._connection.close()
            self._connection = None


@pytest.fixture
def hold_database_lock():
    held = []

    def hold(path):
        held.append(HeldDatabaseLock(path))
        return held[-1]

    yield hold
    for lock in held:
        lock.release()


def test_reopening_the_same_path_sees_the_committed_values(store_path):
    with djstm.with_store(store_path) as store:
        theme = store.dvar("theme", "light")
        quota = store.dvar(("quota", "uploads"), 100)
        atomically(lambda: (theme.write("dark"), quota.modify(lambda q: q - 1)))
    with djstm.with_store(store_path) as store:
        assert store.dvar("theme", "light").peek() == "dark"
        assert store.dvar(("quota", "uploads"), 100).peek() == 99


def test_a_plain_script_without_django_settings_persists_across_runs(store_path):
    write = plain_python(
        "import sys, djstm\n"
        "with djstm.with_store(sys.argv[1]) as store:\n"
        "    v = store.dvar('greeting', 'hello')\n"
        "    djstm.atomically(lambda: v.write(v.read() + ', world'))\n",
        store_path,
    )
    assert write.returncode == 0, write.stderr
    read = plain_python(
        "import sys, djstm\n"
        "with djstm.with_store(sys.argv[1]) as store:\n"
        "    print(store.dvar('greeting', 'hello').peek())\n",
        store_path,
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "hello, world"


def test_interpreter_exit_flushes_a_store_left_open(store_path):
    result = plain_python(
        "import sys, djstm\n"
        "store = djstm.with_store(sys.argv[1])\n"
        "v = store.dvar('left_open', 0)\n"
        "for _ in range(500):\n"
        "    djstm.atomically(lambda: v.modify(lambda n: n + 1))\n",
        store_path,
    )
    assert result.returncode == 0, result.stderr
    assert _disk_value(store_path, "left_open") == "500"


def test_the_same_name_gives_the_same_live_object(store_path):
    with djstm.with_store(store_path) as store:
        first = store.dvar(("user", 7, "inbox"), type=list[str], default=[])
        assert store.dvar(("user", 7, "inbox"), type=list[str], default=[]) is first
        assert store.dvar(("user", 7, "inbox")) is first
        with djstm.with_store(store_path) as again:
            assert again is store
            assert again.dvar(("user", 7, "inbox")) is first
        assert not store.closed  # the inner block only released its use

        def wait_for_mail():
            inbox = store.dvar(("user", 7, "inbox"))
            check(inbox.read())
            return inbox.read()

        result = []
        waiter = threading.Thread(target=lambda: result.append(atomically(wait_for_mail, timeout=10)))
        waiter.start()
        wait_until(lambda: first._waiters, what="the reader to block")
        atomically(lambda: store.dvar(("user", 7, "inbox")).write(["hi"]))
        waiter.join(10)
        assert result == [["hi"]]
    assert store.closed


@pytest.mark.parametrize(
    "bad_name, complaint",
    [
        ("", "empty"),
        ("tab\there", "control character"),
        ("x" * 501, "limit is 500"),
        ((), "at least one part"),
        (("a", 1.5), "str or int"),
        (("a", True), "str or int"),
        ("[looks structured]", "reserved"),
        (42, "str or a tuple"),
    ],
)
def test_invalid_names_are_refused_with_the_reason(store_path, bad_name, complaint):
    with djstm.with_store(store_path) as store:
        with pytest.raises(djstm.InvalidName, match=complaint):
            store.dvar(bad_name, 0)


def test_structured_names_are_distinct_from_look_alike_strings(store_path):
    with djstm.with_store(store_path) as store:
        tuple_name = store.dvar(("quota", "uploads"), 1)
        int_part = store.dvar(("user", 5), "int five")
        str_part = store.dvar(("user", "5"), "str five")
        plain = store.dvar("quota", 2)
        assert len({id(tuple_name), id(int_part), id(str_part), id(plain)}) == 4
    with djstm.with_store(store_path) as store:
        assert store.dvar(("user", 5)).peek() == "int five"
        assert store.dvar(("user", "5")).peek() == "str five"


def test_names_in_any_script_and_with_quotes_survive(store_path):
    names = ["température", "名前", "имя", "emoji 🎉", "quote ' \" \\ $1 %s %(x)s", ("ключ", 1, "値")]
    with djstm.with_store(store_path) as store:
        for index, name in enumerate(names):
            dvar = store.dvar(name, 0)
            atomically(lambda d=dvar, i=index: d.write(i + 1))
    with djstm.with_store(store_path) as store:
        assert [store.dvar(name).peek() for name in names] == list(range(1, len(names) + 1))


def test_opening_with_another_type_raises_naming_both_types(store_path):
    with djstm.with_store(store_path) as store:
        store.dvar("limit", 10)
        with pytest.raises(djstm.DVarTypeError, match=r"'limit'.*type int.*opened as str"):
            store.dvar("limit", "ten")
    with djstm.with_store(store_path) as store:
        with pytest.raises(djstm.DVarTypeError, match=r"type int.*opened as list\[str\]"):
            store.dvar("limit", type=list[str], default=[])
        assert store.dvar("limit", 0).peek() == 10


def test_a_write_that_does_not_fit_fails_at_write_and_stores_nothing(store_path):
    with djstm.with_store(store_path) as store:
        count = store.dvar("count", 0)
        tags = store.dvar("tags", type=list[str], default=[])

        def bad():
            count.write(1)
            tags.write(["ok", 3])

        with pytest.raises(djstm.DVarTypeError, match=r"DVar 'tags' of store 'default'.*\[1\]"):
            atomically(bad)
        for wrong in (True, 1.0, "1", None):
            with pytest.raises(djstm.DVarTypeError, match="'count'"):
                atomically(count.write, wrong)
        assert count.peek() == 0 and tags.peek() == []
    with djstm.with_store(store_path) as store:
        assert store.dvar("count", 0).peek() == 0
        assert store.dvar("tags", type=list[str], default=[]).peek() == []


def test_absent_name_without_default_is_a_key_error_and_none_is_a_value(store_path):
    with djstm.with_store(store_path) as store:
        with pytest.raises(KeyError, match="pass a default"):
            store.dvar("never_written")
        maybe = store.dvar("maybe", None, type=int | None)
        assert maybe.peek() is None
    with djstm.with_store(store_path) as store:
        assert store.dvar("maybe").peek() is None  # None is stored, distinct from "never written"
        with pytest.raises(KeyError):
            store.dvar("never_written")


def test_values_are_snapshots(store_path):
    with djstm.with_store(store_path) as store:
        board = store.dvar("board", type=dict[str, list[int]], default={"a": [1]})

        def mutate_what_was_read():
            value = board.read()
            value["a"].append(2)
            value["b"] = [3]
            return board.read()

        assert atomically(mutate_what_was_read) == {"a": [1]}
        assert board.peek() == {"a": [1]}
        peeked = board.peek()
        peeked["a"].append(99)
        assert board.peek() == {"a": [1]}

        written = {"a": [7]}
        atomically(board.write, written)
        written["a"].append(8)  # after write: changes nothing stored
        assert board.peek() == {"a": [7]}


def test_atomically_returns_before_the_disk_write_and_sync_waits_for_it(store_path, hold_database_lock):
    with djstm.with_store(store_path) as store:
        v = store.dvar("v", 0)
        store.sync()
        held = hold_database_lock(store_path)
        started = time.monotonic()
        atomically(lambda: v.write(1), timeout=5)
        assert time.monotonic() - started < 5
        assert v.peek() == 1

        synced = threading.Event()
        syncer = threading.Thread(target=lambda: (store.sync(), synced.set()))
        syncer.start()
        assert not synced.wait(0.3)  # the writer cannot reach the disk yet
        held.release()
        assert synced.wait(10)
        assert _disk_value(store_path, "v") == "1"


def test_durable_true_returns_only_once_the_commit_is_on_disk(store_path, hold_database_lock):
    with djstm.with_store(store_path) as store:
        v = store.dvar("v", 0)
        store.sync()
        held = hold_database_lock(store_path)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (atomically(lambda: v.write(5), durable=True), done.set()))
        worker.start()
        assert not done.wait(0.3)
        assert v.peek() == 5  # committed in memory already
        held.release()
        assert done.wait(10)
        assert _disk_value(store_path, "v") == "5"


def test_concurrent_durable_commits_share_database_commits(store_path, hold_database_lock):
    with djstm.with_store(store_path) as store:
        counters = [store.dvar(("c", i), 0) for i in range(8)]
        store.sync()
        held = hold_database_lock(store_path)
        flushes = []
        write_rows = store._writer._write_rows

        def counting(rows):
            rows = list(rows)
            flushes.append(len(rows))
            write_rows(rows)

        store._writer._write_rows = counting
        workers = [
            threading.Thread(target=atomically, args=(lambda c=c: c.write(1),), kwargs={"durable": True})
            for c in counters
        ]
        for worker in workers:
            worker.start()
        wait_until(lambda: store._writer._committed >= 8 + 8, what="all eight commits to be recorded")
        held.release()
        for worker in workers:
            worker.join(10)
        assert sum(flushes) == 8
        assert len(flushes) <= 2  # eight durable commits, at most two disk commits


def test_commits_reach_disk_in_commit_order_coalesced(store_path):
    with djstm.with_store(store_path) as store:
        seq = store.dvar("seq", 0)
        for _ in range(1000):
            atomically(lambda: seq.modify(lambda n: n + 1))
        store.sync()
        assert _disk_value(store_path, "seq") == "1000"


def test_a_tvar_and_dvars_of_two_stores_commit_in_one_transaction(tmp_path):
    with djstm.with_store(tmp_path / "one.sqlite3") as one, djstm.with_store(tmp_path / "two.sqlite3") as two:
        a, b, t = one.dvar("a", 10), two.dvar("b", 0), TVar(0)

        def move():
            amount = a.read()
            a.write(0)
            b.write(b.read() + amount)
            t.write(amount)

        atomically(move)
    with djstm.with_store(tmp_path / "one.sqlite3") as one, djstm.with_store(tmp_path / "two.sqlite3") as two:
        assert (one.dvar("a", 0).peek(), two.dvar("b", 0).peek()) == (0, 10)


def test_several_store_names_share_one_file(store_path):
    with djstm.with_store(store_path, name="alpha") as alpha, djstm.with_store(store_path, name="beta") as beta:
        atomically(alpha.dvar("x", 0).write, 1)
        atomically(beta.dvar("x", 0).write, 2)
    with djstm.with_store(store_path, name="alpha") as alpha, djstm.with_store(store_path, name="beta") as beta:
        assert (alpha.dvar("x", 0).peek(), beta.dvar("x", 0).peek()) == (1, 2)


def test_writing_after_the_store_closed_raises_store_closed(store_path):
    with djstm.with_store(store_path) as store:
        v = store.dvar("v", 0)
    assert v.peek() == 0
    other = TVar(0)
    with pytest.raises(djstm.StoreClosed, match="nothing was committed; open the store again"):
        atomically(lambda: (other.write(1), v.write(1)))
    assert other.peek() == 0
    with pytest.raises(djstm.StoreClosed):
        store.dvar("other", 0)


def test_hammering_dvars_from_threads_keeps_exact_totals(store_path, busy_switching):
    with djstm.with_store(store_path) as store:
        counters = [store.dvar(("n", i), 0) for i in range(3)]

        def worker():
            for _ in range(500):
                atomically(lambda: [c.modify(lambda n: n + 1) for c in counters])

        run_threads([worker] * 6)
    with djstm.with_store(store_path) as store:
        assert [store.dvar(("n", i), 0).peek() for i in range(3)] == [3000] * 3


def test_a_second_process_gets_store_locked_until_the_first_exits(store_path):
    import subprocess
    import sys

    from tests.stores.conftest import PROJECT

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, djstm\ns = djstm.with_store(sys.argv[1])\nprint('open', flush=True)\nsys.stdin.read()", str(store_path)],
        cwd=PROJECT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(djstm.StoreLocked, match=str(store_path)):
            djstm.with_store(store_path)
        with djstm.with_store(store_path, name="another") as other:  # other names in the file stay free
            other.dvar("x", 0)
    finally:
        holder.kill()
        holder.wait(10)
    with djstm.with_store(store_path) as store:  # the kernel released the dead holder's lock
        assert store.dvar("x", 1).peek() == 1


def _fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_a_store_raises_store_corrupt_and_is_left_untouched(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("my precious notes\n" * 100)
    before = _fingerprint(text_file)
    with pytest.raises(djstm.StoreCorrupt, match=f"{text_file}.*not an SQLite database"):
        djstm.with_store(text_file)
    assert _fingerprint(text_file) == before

    other_app = tmp_path / "other.sqlite3"
    connection = sqlite3.connect(other_app)
    connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    connection.execute("INSERT INTO invoices (total) VALUES (12.5)")
    connection.commit()
    connection.close()
    before = _fingerprint(other_app)
    with pytest.raises(djstm.StoreCorrupt, match="not a djstm store"):
        djstm.with_store(other_app)
    assert _fingerprint(other_app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.sqlite3"]


def test_a_damaged_store_raises_store_corrupt_and_is_left_untouched(store_path):
    with djstm.with_store(store_path) as store:
        for i in range(300):
            store.dvar(("row", i), "x" * 200)
    data = bytearray(store_path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for offset in range(page_size * 2, len(data), page_size):  # scribble over every page past the schema
        data[offset + 8 : offset + 40] = b"\xff" * 32
    store_path.write_bytes(bytes(data))
    before = _fingerprint(store_path)
    files_before = sorted(p.name for p in store_path.parent.iterdir())
    with pytest.raises(djstm.StoreCorrupt, match=f"{store_path} is damaged"):
        djstm.with_store(store_path)
    assert _fingerprint(store_path) == before
    assert sorted(p.name for p in store_path.parent.iterdir()) == files_before  # no -wal/-shm left beside it


def test_bad_arguments_are_explained(store_path):
    with pytest.raises(TypeError, match="either a file path or database"):
        djstm.with_store()
    with pytest.raises(ValueError, match="mode must be one of"):
        djstm.with_store(store_path, mode="fast")
    with pytest.raises(djstm.InvalidName):
        djstm.with_store(store_path, name="")
    with pytest.raises(djstm.STMError, match="no such alias"):
        djstm.with_store(database="nope")


@pytest.mark.django_db(transaction=True, databases=["default", "stores"])
def test_a_store_in_a_configured_django_database():
    with djstm.with_store(database="stores") as store:
        v = store.dvar("configured", 1)
        atomically(v.write, 2)
    with djstm.with_store(database="stores") as store:
        assert store.dvar("configured", 1).peek() == 2
    from djstm.models import DVarRecord

    record = DVarRecord.objects.using("stores").get(store="default", name="configured")
    assert (record.type_tag, record.value, record.version) == ("int", "2", 1)


@pytest.mark.django_db(transaction=True, databases=["default", "stores"])
def test_the_same_file_by_path_and_by_alias_is_one_store():
    from django.db import connections

    path = connections["stores"].settings_dict["NAME"]
    with djstm.with_store(database="stores") as by_alias, djstm.with_store(path) as by_path:
        assert by_path is by_alias


def test_dvar_changed_is_sent_after_durable_commits(store_path):
    from djstm.signals import dvar_changed

    seen = []

    def receiver(sender, store, database, changes, **kwargs):
        seen.append((store, sorted(changes)))

    with djstm.with_store(store_path) as store:
        a, b = store.dvar("a", 0), store.dvar("b", 0)
        dvar_changed.connect(receiver)
        try:
            djstm.atomically(lambda: (a.write(1), b.write(1)))

            def only_a():  # b's write is rolled back with its branch: only a changed
                a.write(2)
                djstm.or_else(lambda: (b.write(2), djstm.retry()), lambda: None)

            djstm.atomically(only_a)
            djstm.atomically(a.read)  # nothing written: nothing sent
        finally:
            dvar_changed.disconnect(receiver)
    assert seen == [("default", [("a", 1), ("b", 1)]), ("default", [("a", 2)])]
