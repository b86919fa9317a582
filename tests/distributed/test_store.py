"""Distributed stores in one process: commits, caches, locking modes, Django transactions, failures."""

import threading
import time

import pytest
from django.db import IntegrityError, connections, transaction
from django.test.utils import CaptureQueriesContext, override_settings

import djstm
from djstm.stores.distributed import AUTO_PESSIMISTIC_AFTER
from tests.conftest import run_threads, wait_until

from .conftest import ALIAS, bump_by_hand, run_sql, stored


def queries_of(fn, **kwargs):
    with CaptureQueriesContext(connections[ALIAS]) as captured:
        djstm.atomically(fn, **kwargs)
    return len(captured)


def transfer(source, target, amount):
    source.write(source.read() - amount)
    target.write(target.read() + amount)


# -- basics ---------------------------------------------------------------------------------------


def test_values_commit_to_the_database_and_identity_holds(open_store, store_name):
    store = open_store()
    assert djstm.with_store(database=ALIAS, mode="distributed", name=store_name) is store
    store.release()
    balance = store.dvar("balance", 10)
    assert store.dvar("balance") is balance
    djstm.atomically(lambda: balance.write(balance.read() + 5))
    assert balance.peek() == 15
    assert stored(store_name, "balance") == ("15", 1)


def test_distributed_needs_postgresql_and_a_database_alias():
    with pytest.raises(djstm.StoreUnavailable, match="needs PostgreSQL"):
        djstm.with_store(database="stores", mode="distributed")
    with pytest.raises(TypeError, match="database=ALIAS"):
        djstm.with_store("x.sqlite3", mode="distributed")
    with pytest.raises(ValueError, match="lock must be one of"):
        djstm.with_store(database=ALIAS, mode="distributed", lock="eager")


def test_one_distributed_store_per_transaction(open_store, store_name):
    a = open_store().dvar("a", 1)
    b = open_store(name=store_name + "-other").dvar("b", 2)
    with pytest.raises(djstm.STMError, match="one distributed store"):
        djstm.atomically(lambda: a.read() + b.read())


@pytest.mark.parametrize("lock", ["optimistic", "pessimistic", "auto"])
def test_a_transfer_commits_in_each_lock_mode(open_store, store_name, lock):
    store = open_store()
    a, b = store.dvar("a", 100), store.dvar("b", 0)
    for _ in range(3):
        djstm.atomically(transfer, a, b, 10, lock=lock)
    assert (a.peek(), b.peek()) == (70, 30)
    assert stored(store_name, "a") == ("70", 3)


# -- round trips ----------------------------------------------------------------------------------


def test_round_trips_per_commit_do_not_grow_with_the_number_of_variables(open_store):
    """Optimistic: one statement per commit once the cache is warm, whatever the number of DVars."""
    store = open_store()
    counters = [store.dvar(f"c{i}", 0) for i in range(20)]

    def bump_all():
        for counter in counters:
            counter.write(counter.read() + 1)

    djstm.atomically(bump_all)  # the first reads bring all twenty to one snapshot
    assert queries_of(bump_all) == 1
    assert queries_of(lambda: counters[0].write(counters[0].read() + 1)) == 1
    assert queries_of(lambda: sum(counter.read() for counter in counters)) == 1  # read-only: one check
    # Pessimistic: the first lock opens the transaction in the same round trip; the writes and COMMIT share one.
    assert queries_of(lambda: counters[0].write(counters[0].read() + 1), lock="pessimistic") == 2
    assert [counter.peek() for counter in counters] == [4] + [2] * 19


# -- caches and strict serializability ---------------------------------------------------------------


def test_a_row_changed_by_hand_is_seen_by_the_next_transaction(open_store, store_name):
    store = open_store(poll_interval=60)  # no notification and no poll: only the commit check can notice
    price = store.dvar("price", 5)
    assert djstm.atomically(price.read) == 5
    bump_by_hand(store_name, "price", "7")
    assert djstm.atomically(price.read) == 7  # a read-only transaction is checked too
    djstm.atomically(lambda: price.write(price.read() + 1))
    assert stored(store_name, "price") == ("8", 2)


def test_rows_only_read_are_protected_against_write_skew(open_store, store_name):
    """On-call rule: at least one doctor on call. Two transactions each read both and take one off."""
    store = open_store(poll_interval=60)
    alice, bob = store.dvar("alice", True), store.dvar("bob", True)
    attempts = []

    def alice_leaves():
        attempts.append(1)
        if alice.read() and bob.read():
            if len(attempts) == 1:
                bump_by_hand(store_name, "bob", "false")  # bob left meanwhile, in another process
            alice.write(False)

    djstm.atomically(alice_leaves, lock="optimistic")
    assert len(attempts) == 2  # the stale read of bob made the first attempt re-run
    assert alice.peek() is True  # on the re-run bob was gone, so alice stayed
    assert stored(store_name, "alice") == ("true", 0)


def test_a_transaction_never_sees_two_snapshots(open_store, store_name):
    """x == y is kept by every commit; a row changed by hand between two reads must not show a mix."""
    store = open_store(poll_interval=60)
    x, y = store.dvar("x", 0), store.dvar("y", 0)
    z = store.dvar("z", 0)
    djstm.atomically(lambda: (x.read(), z.read()))  # x and z cached by one query, y by its own
    run_sql(
        "UPDATE djstm_dvar SET value = '1', version = version + 1 WHERE store = %s AND name IN ('x', 'y')",
        [store_name],
    )
    seen = []

    def read_both():
        a = x.read()
        b = y.read()  # another snapshot than x: the transaction re-reads x with it, then re-runs
        seen.append((a, b))
        return a, b

    assert djstm.atomically(read_both) == (1, 1)
    assert all(a == b for a, b in seen), seen


# -- locking -------------------------------------------------------------------------------------


def test_pessimistic_out_of_order_restarts_with_everything_locked_up_front(open_store):
    store = open_store()
    a, b = store.dvar("a", 0), store.dvar("b", 0)
    attempts = []

    def b_then_a():
        attempts.append(1)
        b.write(b.read() + 1)
        a.write(a.read() + 1)

    queries = queries_of(b_then_a, lock="pessimistic")
    assert len(attempts) == 2 and (a.peek(), b.peek()) == (1, 1)
    # attempt 1: lock b, then a would come out of order -> rollback; attempt 2: lock both, then write+commit.
    assert queries == 4


def session_mode(dvar):
    from djstm.stm._context import current

    return dvar._store.session(current.tx).mode


def test_auto_turns_pessimistic_after_repeated_conflicts(open_store, store_name):
    store = open_store(poll_interval=60)
    calm, hot = store.dvar("a-calm", 0), store.dvar("hot", 0)
    modes = []

    def contended():
        calm.read()  # the first row it touches is calm, so only the conflict count can make it pessimistic
        value = hot.read()
        modes.append(session_mode(hot))
        if modes[-1] == "optimistic":
            bump_by_hand(store_name, "hot", str(value + 100))  # someone else commits first
        hot.write(value + 1)

    djstm.atomically(contended)
    assert modes == ["optimistic"] * AUTO_PESSIMISTIC_AFTER + ["pessimistic"]
    assert stored(store_name, "hot") == (str(hot.peek()), AUTO_PESSIMISTIC_AFTER + 1)


def test_auto_starts_pessimistic_on_a_row_that_just_lost_a_commit(open_store, store_name):
    store = open_store(poll_interval=60)
    hot = store.dvar("hot", 0)
    modes = []

    def increment():
        value = hot.read()
        modes.append(session_mode(hot))
        if len(modes) == 1:
            bump_by_hand(store_name, "hot", str(value + 100))
        hot.write(value + 1)

    djstm.atomically(increment)
    djstm.atomically(increment)  # a new call: the row is still known as contended
    assert modes == ["optimistic", "pessimistic", "pessimistic"]
    assert djstm.atomically(hot.read) == 102


def test_threads_hammering_one_row_lose_no_update(open_store, busy_switching):
    store = open_store()
    counter = store.dvar("counter", 0)

    def worker(lock):
        for _ in range(30):
            djstm.atomically(lambda: counter.write(counter.read() + 1), lock=lock)
            connections[ALIAS].close()

    run_threads([lambda lock=lock: worker(lock) for lock in ("optimistic", "pessimistic", "auto", "auto")], 60)
    assert counter.peek() == 120


# -- TVars and durable DVars in the same transaction ------------------------------------------------------


def test_tvars_commit_only_if_the_database_commit_succeeds(open_store, store_name):
    store = open_store(poll_interval=60)
    balance = store.dvar("balance", 10)
    audit = djstm.TVar([])
    attempts = []

    def pay():
        attempts.append(1)
        value = balance.read()
        audit.write([*audit.read(), value])
        if len(attempts) == 1:
            bump_by_hand(store_name, "balance", "50")  # the database commit of this attempt will fail
        balance.write(value - 1)

    djstm.atomically(pay)
    assert audit.peek() == [50]  # the first attempt's write to the TVar never happened
    assert balance.peek() == 49

    with pytest.raises(ZeroDivisionError):
        djstm.atomically(lambda: (audit.write([]), balance.write(0), 1 / 0))
    assert audit.peek() == [50] and stored(store_name, "balance") == ("49", 2)


def test_a_durable_dvar_joins_a_distributed_transaction(open_store, tmp_path):
    remote = open_store().dvar("remote", 0)
    with djstm.with_store(tmp_path / "local.sqlite3") as local_store:
        local = local_store.dvar("local", 0)
        djstm.atomically(lambda: (local.write(local.read() + 1), remote.write(remote.read() + 1)))
        assert (local.peek(), remote.peek()) == (1, 1)


# -- inside Django transactions -----------------------------------------------------------------------------


@pytest.fixture
def orders_table():
    run_sql("CREATE TABLE IF NOT EXISTS djstm_test_orders (id serial PRIMARY KEY, item text)")
    yield
    run_sql("DROP TABLE IF EXISTS djstm_test_orders")


def test_inside_transaction_atomic_the_commit_joins_the_caller(open_store, store_name, orders_table):
    store = open_store()
    stock = store.dvar("stock", 3)
    events = []

    def sell():
        stock.write(stock.read() - 1)
        djstm.after_commit(lambda: events.append("after_commit"))

    with transaction.atomic(using=ALIAS):
        with connections[ALIAS].cursor() as cursor:
            cursor.execute("INSERT INTO djstm_test_orders (item) VALUES ('book')")
        djstm.atomically(sell)
        assert djstm.atomically(stock.read) == 2  # the surrounding transaction sees its own write
        assert stock.peek() == 3 and events == []  # nobody else does, yet
        assert stored(store_name, "stock") == ("3", 0)
    assert stock.peek() == 2 and events == ["after_commit"]
    assert stored(store_name, "stock") == ("2", 1)
    assert run_sql("SELECT count(*) FROM djstm_test_orders") == [(1,)]


def test_a_rolled_back_caller_leaves_no_trace(open_store, store_name, orders_table):
    store = open_store()
    stock = store.dvar("stock", 3)
    events = []
    with pytest.raises(RuntimeError), transaction.atomic(using=ALIAS):
        with connections[ALIAS].cursor() as cursor:
            cursor.execute("INSERT INTO djstm_test_orders (item) VALUES ('book')")
        djstm.atomically(lambda: (stock.write(0), djstm.after_commit(lambda: events.append(1))))
        raise RuntimeError("payment declined")
    assert stock.peek() == 3 and events == []
    assert stored(store_name, "stock") == ("3", 0)
    assert run_sql("SELECT count(*) FROM djstm_test_orders") == [(0,)]
    djstm.atomically(lambda: stock.write(stock.read() - 1))  # autocommit: its own database transaction
    assert stored(store_name, "stock") == ("2", 1)


def test_inside_transaction_atomic_retry_and_tvar_writes_are_refused(open_store):
    store = open_store()
    flag = store.dvar("flag", False)
    other = djstm.TVar(0)
    with transaction.atomic(using=ALIAS):
        with pytest.raises(djstm.STMError, match="retry"):
            djstm.atomically(lambda: flag.read() or djstm.retry())
    with transaction.atomic(using=ALIAS):
        with pytest.raises(djstm.STMError, match="not in the distributed store"):
            djstm.atomically(lambda: (flag.write(True), other.write(1)))
    assert other.peek() == 0 and flag.peek() is False


# -- creation, names and values -----------------------------------------------------------------------------


def test_only_a_name_collision_counts_as_a_creation_race(open_store, store_name):
    store = open_store()
    run_sql("ALTER TABLE djstm_dvar ADD CONSTRAINT djstm_test_no_boom CHECK (value <> '\"boom\"')")
    try:
        with pytest.raises(IntegrityError):
            store.dvar("bad", "boom")
    finally:
        run_sql("ALTER TABLE djstm_dvar DROP CONSTRAINT djstm_test_no_boom")
    assert run_sql("SELECT count(*) FROM djstm_dvar WHERE store = %s", [store_name]) == [(0,)]


ODD_NAMES = ["it's", 'say "hi"', "back\\slash", "$1 $$ price", "名前", "ünïcödé 🚀", ("quota", "up'loads"), "n" * 500]


def test_odd_names_and_values_commit_and_notify(open_store, store_name):
    from djstm.notify import change_feed

    store = open_store()
    received = []
    feed = change_feed("djstm")
    feed.subscribe(store._group, received.append)
    try:
        dvars = [store.dvar(name, "") for name in ODD_NAMES]
        big = "x" * (5 * 1024 * 1024)

        def write_all():
            for dvar in dvars:
                dvar.write(f"{dvar.name!r} \\ ' \" $$ 🚀")
            dvars[0].write(big)

        djstm.atomically(write_all)
        wait_until(lambda: received, timeout=5, what="the commit's notification")
    finally:
        feed.unsubscribe(store._group, received.append)
    (message,) = received
    assert sorted(name for name, _ in message["changes"]) == sorted(dvar.key for dvar in dvars)
    assert len(repr(message)) < 10_000  # names and versions, never the 5 MB value
    store.close()
    reopened = djstm.with_store(database=ALIAS, mode="distributed", name=store_name)
    try:
        assert reopened.dvar(ODD_NAMES[0]).peek() == big
        assert reopened.dvar(ODD_NAMES[-1]).peek() == f"{ODD_NAMES[-1]!r} \\ ' \" $$ 🚀"
    finally:
        reopened.close()


def test_a_row_that_does_not_decode_fails_only_where_it_is_read(open_store, store_name):
    store = open_store(poll_interval=60)
    good, bad = store.dvar("good", 1), store.dvar("bad", 1)
    bump_by_hand(store_name, "bad", "not json")
    with pytest.raises(djstm.DVarDecodeError, match="'bad'"):
        djstm.atomically(bad.read)
    djstm.atomically(lambda: good.write(good.read() + 1))
    assert stored(store_name, "good") == ("2", 1)


# -- database failures -------------------------------------------------------------------------------------


def test_a_lock_held_too_long_gives_a_djstm_error_and_commits_nothing(store_name, open_store):
    with override_settings(DJSTM={"CHANNEL_LAYER": "djstm", "LOCK_TIMEOUT": 0.2, "DATABASE_RETRIES": 2}):
        store = open_store()
    seat = store.dvar("seat", "free")
    import psycopg

    from tests.services import require_postgres

    with psycopg.connect(require_postgres()) as holder:
        holder.execute("SELECT 1 FROM djstm_dvar WHERE store = %s AND name = 'seat' FOR UPDATE", [store_name])
        for lock in ("optimistic", "pessimistic"):
            with pytest.raises(djstm.StoreUnavailable, match=r"'seat'.*lock that could not be had in time"):
                djstm.atomically(lambda: seat.write("taken"), lock=lock)
        holder.rollback()
    assert stored(store_name, "seat") == ('"free"', 0)
    djstm.atomically(lambda: seat.write("taken"))
    assert stored(store_name, "seat") == ('"taken"', 1)


def test_a_dropped_connection_is_reconnected_and_the_commit_happens_once(open_store, store_name):
    store = open_store()
    counter = store.dvar("counter", 0)
    djstm.atomically(lambda: counter.write(counter.read() + 1))
    backend = connections[ALIAS].connection.info.backend_pid
    run_sql("SELECT pg_terminate_backend(%s)", [backend])
    djstm.atomically(lambda: counter.write(counter.read() + 1))
    assert stored(store_name, "counter") == ("2", 2)


# -- blocking -----------------------------------------------------------------------------------------------------


def test_retry_wakes_on_a_commit_in_this_process(open_store):
    store = open_store(poll_interval=60)
    ready = store.dvar("ready", False)
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(djstm.atomically(lambda: ready.read() or djstm.retry())))
    waiter.start()
    time.sleep(0.2)
    djstm.atomically(lambda: ready.write(True))
    waiter.join(5)
    assert woke == [True]


def test_retry_wakes_by_polling_when_no_notification_comes(open_store, store_name):
    store = open_store(poll_interval=0.3)
    ready = store.dvar("ready", False)
    result = []
    waiter = threading.Thread(
        target=lambda: result.append(djstm.atomically(lambda: ready.read() or djstm.retry(), timeout=10))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    started = time.monotonic()
    bump_by_hand(store_name, "ready", "true")
    waiter.join(5)
    assert result == [True] and time.monotonic() - started < 2


def test_retry_on_a_stale_cache_rereads_instead_of_sleeping(open_store, store_name):
    store = open_store(poll_interval=60)
    ready = store.dvar("ready", False)
    djstm.atomically(ready.read)
    bump_by_hand(store_name, "ready", "true")  # the cache still says False
    assert djstm.atomically(lambda: ready.read() or djstm.retry(), timeout=5) is True


def test_aatomically_waits_without_blocking_the_event_loop(open_store):
    import asyncio

    store = open_store(poll_interval=60)
    ready = store.dvar("ready", 0)

    async def main():
        waiting = asyncio.ensure_future(djstm.aatomically(lambda: ready.read() or djstm.retry(), timeout=10))
        ticks = 0
        while ticks < 20:  # the loop keeps running while the transaction waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not waiting.done()
        await djstm.aatomically(lambda: ready.write(7))
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(main()) == 7


def test_a_channels_consumer_follows_a_dvar_with_aatomically(open_store):
    import asyncio

    from channels.generic.websocket import AsyncJsonWebsocketConsumer
    from channels.testing import WebsocketCommunicator

    store = open_store(poll_interval=60)
    level = store.dvar("level", 0)

    def next_level(seen):
        value = level.read()
        djstm.check(value != seen)
        return value

    class LevelConsumer(AsyncJsonWebsocketConsumer):
        async def connect(self):
            await self.accept()
            self.follower = asyncio.create_task(self.follow())

        async def disconnect(self, code):
            self.follower.cancel()

        async def follow(self):
            seen = None
            while True:
                seen = await djstm.aatomically(next_level, seen)
                await self.send_json({"level": seen})

    async def main():
        communicator = WebsocketCommunicator(LevelConsumer.as_asgi(), "/ws/level/")
        connected, _ = await communicator.connect()
        assert connected
        assert await communicator.receive_json_from(timeout=5) == {"level": 0}
        for expected in (1, 2):
            await djstm.aatomically(lambda: level.write(level.read() + 1))
            assert await communicator.receive_json_from(timeout=5) == {"level": expected}
        await communicator.disconnect()

    asyncio.run(main())


def test_a_read_only_transaction_over_tvars_and_dvars_checks_the_database(open_store, store_name):
    store = open_store(poll_interval=60)
    price = store.dvar("price", 5)
    quantity = djstm.TVar(2)
    assert djstm.atomically(lambda: price.read() * quantity.read(), timeout=10) == 10
    bump_by_hand(store_name, "price", "6")
    assert djstm.atomically(lambda: price.read() * quantity.read(), timeout=10) == 12


def test_plain_atomically_in_a_coroutine_is_refused_with_the_way_out(open_store):
    import asyncio

    counter = open_store().dvar("counter", 0)

    async def main():
        djstm.atomically(lambda: counter.write(1))

    with pytest.raises(djstm.STMError, match="aatomically"):
        asyncio.run(main())
    assert counter.peek() == 0


def test_a_commit_waiting_for_a_row_lock_does_not_stall_the_lock_holder(open_store):
    """A mixed commit (TVar + DVar) waits for a row lock outside the engine's commit lock, which the
    transaction holding the row lock needs to go on."""
    with override_settings(DJSTM={"CHANNEL_LAYER": "djstm", "LOCK_TIMEOUT": 3, "DATABASE_RETRIES": 0}):
        store = open_store()
    x, y = store.dvar("x", 0), store.dvar("y", 0)
    audit = djstm.TVar(0)
    holding = threading.Event()

    def holder():
        def hold_x_then_touch_y():
            x.write(x.read() + 1)  # x locked
            holding.set()
            time.sleep(0.3)  # meanwhile the other transaction waits for x
            y.write(y.read() + 1)  # locking y installs y's row in the cache: needs the commit lock
        djstm.atomically(hold_x_then_touch_y, lock="pessimistic")

    def mixed():
        holding.wait(5)
        djstm.atomically(lambda: (audit.write(audit.read() + 1), x.write(x.read() + 10)), lock="optimistic")

    started = time.monotonic()
    run_threads([holder, mixed], timeout=20)
    assert time.monotonic() - started < 2.5  # no wait for the lock timeout
    assert (x.peek(), y.peek(), audit.peek()) == (11, 1, 1)


def test_peek_shows_a_change_another_process_announced(open_store, store_name):
    store = open_store(poll_interval=60)
    price = store.dvar("price", 5)
    bump_by_hand(store_name, "price", "9")
    assert price.peek() == 5  # nobody said it changed
    store._on_notification({"store": store_name, "origin": "another process", "changes": [["price", 1]]})
    assert price.peek() == 9


def test_opening_a_distributed_store_in_a_coroutine_says_how_to_do_it(store_name):
    import asyncio

    async def main():
        djstm.with_store(database=ALIAS, mode="distributed", name=store_name)

    with pytest.raises(djstm.STMError, match="coroutine"):
        asyncio.run(main())


def test_store_names_are_limited_so_every_name_fits_the_index():
    from djstm.names import MAX_STORE_NAME_CHARS

    with pytest.raises(djstm.InvalidName, match=f"the limit is {MAX_STORE_NAME_CHARS}"):
        djstm.with_store(database=ALIAS, mode="distributed", name="s" * (MAX_STORE_NAME_CHARS + 1))


def test_dvar_changed_is_sent_after_each_commit_with_names_and_versions(open_store, store_name, orders_table):
    from djstm.signals import dvar_changed

    store = open_store()
    stock, sold = store.dvar("stock", 3), store.dvar("sold", 0)
    seen = []

    def receiver(sender, store, database, changes, **kwargs):
        # Sent outside djstm's locks: a receiver may run a transaction of its own.
        seen.append((sender, store, database, sorted(changes), djstm.atomically(sold.read)))

    dvar_changed.connect(receiver)
    try:
        djstm.atomically(lambda: (stock.write(stock.read() - 1), sold.write(sold.read() + 1)))
        assert seen == [(store, store_name, ALIAS, [("sold", 1), ("stock", 1)], 1)]
        djstm.atomically(stock.read)  # read-only: nothing changed, nothing sent
        assert len(seen) == 1
        with transaction.atomic(using=ALIAS):
            djstm.atomically(lambda: stock.write(0))
            assert len(seen) == 1  # not before the caller's transaction commits
        assert seen[-1][3] == [("stock", 2)]
        with pytest.raises(RuntimeError), transaction.atomic(using=ALIAS):
            djstm.atomically(lambda: stock.write(5))
            raise RuntimeError
        assert len(seen) == 2  # a rolled-back caller sends nothing
    finally:
        dvar_changed.disconnect(receiver)
