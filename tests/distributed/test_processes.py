"""Distributed stores used by real processes against the real PostgreSQL and Redis (never mocks).

Every worker is ``tests/distributed/worker.py`` started with subprocess; it sets Django up
itself. A worker that raises exits non-zero, and the test fails showing its stderr. Each
test uses a store name of its own, so tests never see each other's rows, and every child
still running when a test ends is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time

import psycopg
import pytest

from tests.services import require_postgres, require_redis

from .proc_history import find_anomaly
from .proc_util import Children, OwnRedis, child_env, percentile

ACCOUNTS = 20
TOTAL = 100 * ACCOUNTS
SECONDS = 2.5  # how long each worker of a stress test runs


@pytest.fixture
def services():
    """PostgreSQL and the shared Redis, or a skip (a failure under DJSTM_REQUIRE_SERVICES=1)."""
    dsn = require_postgres()
    require_redis()
    return dsn


@pytest.fixture(autouse=True)
def _drop_rows_afterwards(request, store_name):
    """Each test's stores are named after ``store_name``; their rows go when the test ends."""
    yield
    if "services" in request.fixturenames:
        sql("DELETE FROM djstm_dvar WHERE store LIKE %s", [store_name.replace("_", r"\_") + "%"])


def sql(query: str, params=()) -> list[tuple]:
    """Run ``query`` on a fresh connection of its own, as another program would."""
    with psycopg.connect(require_postgres(), autocommit=True) as connection:
        cursor = connection.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def stored(store: str) -> dict[str, tuple]:
    """``{name: (decoded value, row version)}`` of every row of ``store``, read by SQL."""
    rows = sql("SELECT name, value, version FROM djstm_dvar WHERE store = %s", [store])
    return {name: (json.loads(value), version) for name, value, version in rows}


def transfer_workers(children: Children, store: str, locks: list[str], tmp_path, *extra: str, seconds=SECONDS):
    seed = int.from_bytes(os.urandom(2), "big")
    return [
        children.start(
            f"transfer worker {i} (lock={lock}, seed={seed + i})",
            "transfer", "--store", store, "--lock", lock, "--worker", i, "--seconds", seconds,
            "--seed", seed + i, "--log", tmp_path / f"log-{i}.json", *extra,
        )
        for i, lock in enumerate(locks)
    ]


def merged_history(tmp_path, count: int) -> list[dict]:
    history = []
    for i in range(count):
        with open(tmp_path / f"log-{i}.json") as file:
            history.extend(json.load(file))
    return history


def sample_totals_while_running(store: str, children: list, limit: float = 60.0) -> tuple[int, list[int]]:
    """Sum the balances by SQL, from outside, until every child has exited; (samples, wrong sums)."""
    samples, wrong = 0, []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(child.process.poll() is None for child in children):
        rows = sql("SELECT value FROM djstm_dvar WHERE store = %s AND name LIKE 'acct-%%'", [store])
        if len(rows) == ACCOUNTS:
            samples += 1
            total = sum(json.loads(value)[0] for (value,) in rows)
            if total != TOTAL:
                wrong.append(total)
        time.sleep(0.02)
    return samples, wrong


def check_accounts(rows: dict[str, tuple]) -> None:
    accounts = {name: value for name, value in rows.items() if name.startswith("acct-")}
    assert len(accounts) == ACCOUNTS
    assert sum(balance for (balance, _), _ in accounts.values()) == TOTAL
    for name, ((_, written), row_version) in accounts.items():
        # Every committed write bumps the row version once, and so does our own counter in the value.
        assert written == row_version, f"{name}: value says {written} writes, row version says {row_version}"


# -- 1. transfers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lock", ["optimistic", "pessimistic", "auto"])
def test_transfers_conserve_the_total_and_count_every_commit(services, store_name, tmp_path, lock):
    with Children() as children:
        workers = transfer_workers(children, store_name, [lock] * 4, tmp_path)
        samples, wrong = sample_totals_while_running(store_name, workers)
        results = [worker.finish(timeout=60) for worker in workers]
    assert wrong == [], f"{len(wrong)} of {samples} totals read by SQL during the run were wrong: {wrong[:10]}"

    for worker, result in zip(workers, results):
        assert result["bad_sums"] == [], f"{worker.label}: committed audits saw totals {result['bad_sums'][:10]}"
        assert result["bad_inside"] == [], f"{worker.label}: audits saw totals {result['bad_inside'][:10]} inside"
        assert result["commits"] >= 10 and result["audits"] >= 2, f"{worker.label} barely ran: {result}"
        assert result["logged"] == result["commits"] + result["audits"], "after_commit ran once per commit"
    rows = stored(store_name)
    check_accounts(rows)
    commits = [result["commits"] for result in results]
    assert rows["counter"][0] == sum(commits)
    assert [rows[f"count-{i}"][0] for i in range(4)] == commits
    assert find_anomaly(merged_history(tmp_path, 4)) is None


# -- 2. a worker SIGKILLed mid-run ----------------------------------------------------------------------


def test_a_worker_killed_mid_run_leaves_no_lock_and_a_consistent_store(services, store_name, tmp_path):
    with Children() as children:
        # The victim sleeps inside each pessimistic transaction, so it most likely dies holding row locks.
        (victim,) = transfer_workers(children, store_name, ["pessimistic"], tmp_path, "--think", "0.02", seconds=60)
        victim.expect("ready", timeout=30)
        survivors = [
            children.start(
                f"transfer worker {i} (pessimistic)", "transfer", "--store", store_name, "--lock", "pessimistic",
                "--worker", i, "--seconds", 3, "--seed", i,
            )
            for i in (1, 2, 3)
        ]
        for survivor in survivors:
            survivor.expect("ready", timeout=30)
        time.sleep(0.7)  # all four committing
        assert victim.process.poll() is None, victim.describe()
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(10)
        results = [survivor.finish(timeout=60) for survivor in survivors]

    for survivor, result in zip(survivors, results):
        assert result["bad_sums"] == [] and result["bad_inside"] == [], f"{survivor.label}: {result}"
    # No row of the store stays locked: a fresh connection locks them all without waiting.
    with psycopg.connect(require_postgres()) as connection:
        locked = connection.execute(
            "SELECT name FROM djstm_dvar WHERE store = %s FOR UPDATE NOWAIT", [store_name]
        ).fetchall()
        connection.rollback()
    assert len(locked) == ACCOUNTS + 1 + 4
    rows = stored(store_name)
    check_accounts(rows)
    counts = [rows[f"count-{i}"][0] for i in range(4)]
    assert counts[0] > 0, "the victim was killed before it committed anything"
    assert counts[1:] == [result["commits"] for result in results]
    assert rows["counter"][0] == sum(counts), f"counter {rows['counter'][0]} != per-worker counts {counts}"


# -- 3. serializability of a logged history ------------------------------------------------------------


def test_checker_accepts_a_serial_history():
    history = [
        {"reads": [["x", 0], ["y", 0]], "writes": [["x", 1]]},
        {"reads": [["x", 1], ["y", 0]], "writes": [["y", 1]]},
        {"reads": [["x", 1], ["y", 1]], "writes": []},
    ]
    assert find_anomaly(history) is None


def test_checker_finds_write_skew():
    history = [  # both read x0 and y0; each writes one of them: no serial order gives this
        {"reads": [["x", 0], ["y", 0]], "writes": [["x", 1]]},
        {"reads": [["x", 0], ["y", 0]], "writes": [["y", 1]]},
    ]
    assert "cycle" in find_anomaly(history)


def test_checker_finds_a_fractured_read():
    history = [
        {"reads": [["x", 0], ["y", 0]], "writes": [["x", 1], ["y", 1]]},
        {"reads": [["x", 1], ["y", 0]], "writes": []},  # half before T0, half after it
    ]
    assert "cycle" in find_anomaly(history)


def test_checker_finds_a_lost_update_and_a_phantom_version():
    assert "lost update" in find_anomaly(
        [{"reads": [["x", 0]], "writes": [["x", 1]]}, {"reads": [["x", 0]], "writes": [["x", 1]]}]
    )
    assert "no committed" in find_anomaly([{"reads": [["x", 3]], "writes": []}])


def test_committed_history_across_processes_is_serializable(services, store_name, tmp_path):
    locks = ["optimistic", "pessimistic", "auto", "optimistic"]  # modes mixed across processes
    with Children() as children:
        workers = transfer_workers(children, store_name, locks, tmp_path, "--no-counter", "--audit-every", "3")
        results = [worker.finish(timeout=60) for worker in workers]
    history = merged_history(tmp_path, 4)
    assert len(history) == sum(result["commits"] + result["audits"] for result in results)
    assert sum(result["audits"] for result in results) >= 20
    assert find_anomaly(history) is None
    check_accounts(stored(store_name))


# -- 4. opacity across processes -------------------------------------------------------------------------


def test_readers_never_see_x_different_from_y_inside_a_transaction(services, store_name):
    with Children() as children:
        roles = [("writer", "optimistic"), ("writer", "pessimistic"), ("reader", "optimistic"), ("reader", "auto")]
        workers = [
            children.start(
                f"{role} {i} ({lock})", "opacity", "--store", store_name, "--lock", lock, "--seconds", SECONDS,
                *(["--writer"] if role == "writer" else []),
            )
            for i, (role, lock) in enumerate(roles)
        ]
        results = [worker.finish(timeout=60) for worker in workers]
    writes = results[0]["commits"] + results[1]["commits"]
    for worker, result in zip(workers[2:], results[2:]):
        assert result["violation_count"] == 0, f"{worker.label} saw x != y: {result['violations']}"
        assert result["commits"] >= 100, f"{worker.label} read only {result['commits']} times"
    assert writes >= 20
    rows = stored(store_name)
    assert rows["x"][0] == rows["y"][0] == writes


# -- 5. wake-up latency ---------------------------------------------------------------------------------------


def test_retry_wakes_within_a_second_p99_of_a_commit_in_another_process(services, store_name):
    rounds = 50
    with Children() as children:
        # Polling every 30 s: a wake-up within the test's time can only come from a notification.
        waiter = children.start("waiter", "waiter", f"{store_name}@30*{rounds}", "--timeout", 20)
        committer = children.start("committer", "committer", store_name)
        reader = children.start("reader", "committer", store_name)  # caches v too, and only reads it
        for child in (waiter, committer, reader):
            child.expect("ready", timeout=30)
        reader.send(f"get {store_name}")
        assert reader.expect("got", timeout=20)["value"] == 0
        time.sleep(0.3)
        latencies = []
        for n in range(1, rounds + 1):
            time.sleep(0.02)  # the waiter is blocked again
            committer.send(store_name)
            committed = committer.expect("committed", timeout=20)
            # Strict serializability: a transaction begun after the commit returned sees it, even
            # in a process whose cache the notification may not have reached yet.
            reader.send(f"get {store_name}")
            woke = waiter.expect("wake", timeout=20)
            assert committed["value"] == woke["value"] == n
            assert reader.expect("got", timeout=20)["value"] == n, "a read after the commit returned missed it"
            latencies.append(woke["t"] - committed["t"])
        for child in (committer, reader):
            child.send("quit")
            child.finish(timeout=20)
        waiter.finish(timeout=20)
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(f"\ncross-process wake-up latency over {rounds}: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, "
          f"max {max(latencies) * 1000:.2f} ms")
    assert p99 < 1.0, f"p99 wake-up latency {p99:.3f}s (p50 {p50:.3f}s): {sorted(latencies)[-5:]}"


# -- 6. lost notifications ---------------------------------------------------------------------------------


def test_wake_ups_survive_redis_going_down_and_are_fast_again_after_it_returns(services, store_name):
    redis = OwnRedis()  # never the shared Redis
    redis.start()
    polled, notified = f"{store_name}-p", f"{store_name}-n"
    env = child_env(DJSTM_REDIS_URL=redis.url)
    try:
        with Children() as children:
            waiter = children.start("waiter", "waiter", f"{polled}@0.5*6", f"{notified}@30*3", env=env)
            committer = children.start("committer", "committer", polled, notified, env=env)
            reader = children.start("reader", "committer", polled, notified, env=env)  # reads only
            for child in (waiter, committer, reader):
                child.expect("ready", timeout=30)
            reader.send(f"get {polled}")  # now it has v cached
            assert reader.expect("got", timeout=20)["value"] == 0
            time.sleep(0.3)

            def commit_and_wait(store: str, limit: float) -> float:
                time.sleep(0.1)
                committer.send(store)
                committed = committer.expect("committed", timeout=20)
                reader.send(f"get {store}")  # begun after the commit returned: must see it, notified or not
                got = reader.expect("got", timeout=20)
                assert got["value"] == committed["value"], f"{store}: read {got['value']} after {committed['value']}"
                woke = waiter.expect("wake", timeout=40)
                assert (woke["store"], woke["value"]) == (store, committed["value"])
                latency = woke["t"] - committed["t"]
                assert latency < limit, f"{store}: woke {latency:.3f}s after the commit (limit {limit}s)"
                return latency

            up = [commit_and_wait(polled, 1.5) for _ in range(3)]
            subscribed = redis.subscriptions()
            assert subscribed >= 3, f"the three processes hold only {subscribed} subscriptions"
            redis.stop()
            down = [commit_and_wait(polled, 0.5 + 1.0) for _ in range(3)]  # the poll, not Redis, wakes it
            redis.start()
            redis.wait_for_subscriptions(subscribed, timeout=20)  # every feed reconnected
            time.sleep(0.5)  # and its ping made the round trip
            again = [commit_and_wait(notified, 1.0) for _ in range(3)]  # polls every 30 s: only Redis can
            for child in (committer, reader):
                child.send("quit")
                child.finish(timeout=20)
            waiter.finish(timeout=20)
    finally:
        redis.stop()
    print(f"\nwake-ups: Redis up {fmt(up)}, Redis down (poll 0.5 s) {fmt(down)}, Redis back {fmt(again)}")


def fmt(latencies: list[float]) -> str:
    return "[" + ", ".join(f"{latency * 1000:.0f} ms" for latency in latencies) + "]"


def test_a_commit_whose_notification_never_comes_wakes_within_the_poll_interval(services, store_name):
    with Children() as children:
        waiter = children.start("waiter", "waiter", f"{store_name}@0.5*3")
        reader = children.start("reader", "committer", store_name)
        waiter.expect("ready", timeout=30)
        reader.expect("ready", timeout=30)
        reader.send(f"get {store_name}")  # now it has v cached
        assert reader.expect("got", timeout=20)["value"] == 0
        time.sleep(0.3)
        latencies = []
        for n in range(1, 4):
            # What a writer SIGKILLed between its database commit and its publish leaves behind.
            changed = sql(
                "UPDATE djstm_dvar SET value = %s, version = version + 1, updated_at = now() "
                "WHERE store = %s AND name = 'v' RETURNING version",
                [json.dumps(n), store_name],
            )
            committed = time.time()
            assert len(changed) == 1
            reader.send(f"get {store_name}")  # the next transaction sees a row changed by hand
            assert reader.expect("got", timeout=20)["value"] == n
            woke = waiter.expect("wake", timeout=20)
            assert woke["value"] == n
            latencies.append(woke["t"] - committed)
            assert latencies[-1] < 0.5 + 1.0, f"woke {latencies[-1]:.3f}s after the commit; poll interval 0.5 s"
            time.sleep(0.2)
        reader.send("quit")
        reader.finish(timeout=20)
        waiter.finish(timeout=20)
    print(f"\nwake-ups without a notification (poll 0.5 s): {fmt(latencies)}")


def test_a_writer_killed_before_its_notification_went_out_still_wakes_waiters(services, store_name):
    """A real djstm writer commits, its notification never leaves (its Redis is unreachable), and it is
    SIGKILLed at once: the blocked transaction in another process wakes by polling."""
    with Children() as children:
        waiter = children.start("waiter", "waiter", f"{store_name}@0.5*1")
        # Port 9 (discard) on loopback: nothing listens, so this writer's notifications are lost.
        unreachable = child_env(DJSTM_REDIS_URL="redis://127.0.0.1:9/0")
        writer = children.start("writer", "committer", store_name, env=unreachable)
        waiter.expect("ready", timeout=30)
        writer.expect("ready", timeout=30)
        time.sleep(0.3)
        writer.send(store_name)
        committed = writer.expect("committed", timeout=30)
        writer.kill()
        woke = waiter.expect("wake", timeout=20)
        assert woke["value"] == committed["value"] == 1
        assert woke["t"] - committed["t"] < 0.5 + 1.0, "a poll interval of 0.5 s should have caught the commit"
        waiter.finish(timeout=20)


# -- 7. pessimistic transactions in random orders ---------------------------------------------------------


def test_pessimistic_transactions_in_random_orders_all_finish(services, store_name):
    with Children() as children:
        workers = [
            children.start(f"shuffle worker {i}", "shuffle", "--store", store_name, "--seconds", SECONDS, "--seed", i)
            for i in range(4)
        ]
        results = [worker.finish(timeout=60) for worker in workers]
    for worker, result in zip(workers, results):
        assert result["commits"] >= 10, f"{worker.label} barely ran: {result}"
    rows = stored(store_name)
    assert len(rows) == 10
    assert sum(value for value, _ in rows.values()) == sum(result["increments"] for result in results)
    for name, (value, version) in rows.items():
        assert value == version, f"{name}: value {value} after {version} committed writes"


# -- 8. concurrent creation ---------------------------------------------------------------------------------------


def test_many_processes_creating_the_same_new_names_at_once_get_one_row_each(services, store_name):
    names = ["shared", "alpha", "beta", "gamma", "délta $1 'q' \\"]
    with Children() as children:
        workers = [
            children.start(f"creator {i}", "create", "--store", store_name, "--names", ",".join(names), "--seed", i)
            for i in range(6)
        ]
        for worker in workers:
            worker.expect("ready", timeout=30)
        start = time.time() + 0.5
        for worker in workers:
            worker.send(repr(start))
        results = [worker.finish(timeout=60) for worker in workers]
    counts = dict(sql("SELECT name, count(*) FROM djstm_dvar WHERE store = %s GROUP BY name", [store_name]))
    assert counts == {name: 1 for name in names}
    rows = stored(store_name)
    assert {name: rows[name] for name in names} == {name: (6, 6) for name in names}  # each process's +1 landed
    print(f"\nevery creator had its DVars within {max(result['late'] for result in results) * 1000:.1f} ms of the start")
