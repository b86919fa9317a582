"""The change feed against real layers: in-memory, and channels-redis's pub/sub and core layers on a live Redis.

Tests that stop Redis run their own redis-server on a free port; the shared one is never touched.
"""

import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from channels.layers import BaseChannelLayer, InMemoryChannelLayer
from hypothesis import given
from hypothesis import strategies as st

from djstm.notify import MESSAGE_TYPE, ChangeFeed, change_feed, dvar_group, store_group
from tests.conftest import run_threads, wait_until
from tests.services import require_redis

PROJECT = Path(__file__).resolve().parents[2]
PUBSUB = "channels_redis.pubsub.RedisPubSubChannelLayer"
CORE = "channels_redis.core.RedisChannelLayer"
REDIS_LAYERS = pytest.mark.parametrize("backend", [PUBSUB, CORE], ids=["pubsub", "core"])


def _layer(backend, url, **config):
    if backend == PUBSUB:
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(hosts=[url], **config)
    from channels_redis.core import RedisChannelLayer

    return RedisChannelLayer(hosts=[url], **config)


def _group():
    return store_group("postgresql://127.0.0.1:5432/test", f"notify-test-{uuid.uuid4().hex}")


class _Inbox:
    """Collects what a feed delivers; get() waits a bounded time."""

    def __init__(self):
        self.messages = queue.Queue()

    def __call__(self, message):
        self.messages.put(message)

    def get(self, timeout=5.0):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no message within {timeout}s")

    def wait_for(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if predicate(message):
                return message
        pytest.fail(f"no matching message within {timeout}s")


@pytest.fixture
def feeds():
    """Make feeds with ``feeds(layer, **options)``; all are closed after the test."""
    made = []

    def make(layer, **options):
        made.append(ChangeFeed(layer, **options))
        return made[-1]

    yield make
    for feed in made:
        feed.close()


def test_the_package_exports_each_public_name_once():
    import inspect

    import djstm.notify

    assert len(djstm.notify.__all__) == len(set(djstm.notify.__all__))
    public = {name for name, value in vars(djstm.notify).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert public == set(djstm.notify.__all__)


# ---- group names ---------------------------------------------------------------------------------

_checker = BaseChannelLayer()
_text = st.text(max_size=500)


@given(_text, _text, _text)
def test_group_names_are_valid_channel_layer_group_names_for_any_text(database, store, key):
    for name in (store_group(database, store), dvar_group(database, store, key)):
        assert _checker.require_valid_group_name(name)
        assert len(name) < BaseChannelLayer.MAX_NAME_LENGTH


@given(st.tuples(_text, _text), st.tuples(_text, _text))
def test_distinct_stores_get_distinct_groups(first, second):
    assert (store_group(*first) == store_group(*second)) == (first == second)


@given(st.tuples(_text, _text, _text), st.tuples(_text, _text, _text))
def test_distinct_dvars_get_distinct_groups(first, second):
    assert (dvar_group(*first) == dvar_group(*second)) == (first == second)


def test_group_names_keep_apart_what_separators_would_merge():
    long = "é" * 499 + "$"
    pairs = [("a.b", "c"), ("a", "b.c"), ("a", "b"), ("a,b", ""), ("", "a,b"), ('"a', 'b"'), ("a\\", "b"),
             ("a", "\\b"), ("$", ""), ("", "$"), (long, ""), ("", long), ("db", "\ud800"), ("db", "\udc00")]
    stores = {store_group(*pair) for pair in pairs}
    assert len(stores) == len(pairs)
    triples = [("db", "s", key) for key in ["k", "k ", "K", "'k'", '"k"', "k\\", "$k", long, "ключ", "🔑", "\ud800"]]
    triples += [("db", "s.k", ""), ("db.s", "k", ""), ("db", "", "s.k")]
    dvars = {dvar_group(*triple) for triple in triples}
    assert len(dvars) == len(triples)
    assert not stores & dvars and store_group("db", "s") != dvar_group("db", "s", "")
    for name in stores | dvars:
        assert _checker.require_valid_group_name(name)


# ---- one process, in-memory layer ----------------------------------------------------------------


def test_in_memory_feed_delivers_what_it_publishes(feeds):
    feed, inbox, group = feeds(InMemoryChannelLayer()), _Inbox(), _group()
    feed.subscribe(group, inbox)
    feed.publish(group, {"origin": "me", "keys": ["a", "b"], "versions": [3, 4]})
    assert inbox.get() == {"type": MESSAGE_TYPE, "group": group, "origin": "me", "keys": ["a", "b"], "versions": [3, 4]}
    feed.publish(group, {"type": "custom.type", "n": 1})
    assert inbox.get()["type"] == "custom.type"


def test_unsubscribed_handlers_and_other_groups_get_nothing(feeds):
    feed, kept, dropped = feeds(InMemoryChannelLayer()), _Inbox(), _Inbox()
    first, second = _group(), _group()
    feed.subscribe(first, kept)
    feed.subscribe(first, dropped)
    feed.subscribe(second, kept)
    feed.unsubscribe(first, dropped)
    feed.unsubscribe(first, dropped)  # a second time is a no-op
    feed.publish(first, {"n": 1})
    feed.publish(second, {"n": 2})
    # One publisher, one loop: messages arrive in order, so once n=2 is in, n=1 has been dispatched.
    assert [kept.get()["n"], kept.get()["n"]] == [1, 2]
    assert dropped.messages.empty()


def test_a_failing_handler_is_logged_and_the_feed_goes_on(feeds, caplog):
    feed, inbox, group = feeds(InMemoryChannelLayer()), _Inbox(), _group()

    def broken(message):
        raise RuntimeError("handler bug")

    feed.subscribe(group, broken)
    feed.subscribe(group, inbox)
    feed.publish(group, {"n": 1})
    feed.publish(group, {"n": 2})
    assert [inbox.get()["n"], inbox.get()["n"]] == [1, 2]
    assert "handler bug" in caplog.text


def test_bad_groups_and_the_reserved_group_key_are_refused(feeds):
    feed = feeds(InMemoryChannelLayer())
    with pytest.raises(ValueError, match="group name"):
        feed.publish("not valid!", {})
    with pytest.raises(ValueError, match="group name"):
        feed.subscribe("x" * 100, print)
    with pytest.raises(ValueError, match="reserved"):
        feed.publish(_group(), {"group": "other"})


def test_close_is_bounded_and_a_closed_feed_drops_publishes(feeds):
    feed = feeds(InMemoryChannelLayer())
    started = time.monotonic()
    feed.close()
    assert time.monotonic() - started < 5 and feed.closed
    feed.publish(_group(), {"n": 1})  # dropped, no error
    with pytest.raises(RuntimeError, match="closed"):
        feed.subscribe(_group(), print)


def test_change_feed_is_one_per_process_and_alias():
    # tests.settings configures only an in-memory "default" layer.
    feed = change_feed()
    assert feed is change_feed("default") and feed.pid == os.getpid()
    assert change_feed("not-configured") is None
    inbox, group = _Inbox(), _group()
    feed.subscribe(group, inbox)
    feed.publish(group, {"n": 1})
    assert inbox.get()["n"] == 1
    feed.unsubscribe(group, inbox)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_feed_of_its_own():
    parent = change_feed()
    pid = os.fork()
    if pid == 0:  # child: the parent's feed thread does not exist here
        code = 1
        try:
            feed, inbox, group = change_feed(), queue.Queue(), _group()
            feed.subscribe(group, inbox.put)
            feed.publish(group, {"n": 1})
            if feed is not parent and feed.pid == os.getpid() and inbox.get(timeout=5)["n"] == 1:
                code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("forked child did not finish")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert change_feed() is parent


# ---- two processes, Redis ------------------------------------------------------------------------


class _Child:
    """A ``tests.notify.child`` process whose stdout lines are read with bounded waits."""

    def __init__(self, *args):
        env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.notify.child", *map(str, args)],
            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def line(self, timeout=20.0):
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            self.process.kill()
            pytest.fail(f"child printed nothing within {timeout}s; stderr: {self.process.stderr.read()[-2000:]}")

    def wait(self, timeout=30.0):
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"child still running after {timeout}s")
        assert code == 0, self.process.stderr.read()[-2000:]


@REDIS_LAYERS
def test_a_message_published_in_one_process_reaches_a_subscriber_in_another(backend):
    url, group, count = require_redis(), _group(), 5
    subscriber = _Child("subscribe", backend, url, group, count)
    assert subscriber.line() == "ready"
    publisher = _Child("publish", backend, url, group, count)
    publisher.wait()
    received = [json.loads(subscriber.line()) for _ in range(count)]
    subscriber.wait()
    assert [message["n"] for message in received] == list(range(count))
    assert {message["origin"] for message in received} == {publisher.process.pid}
    assert all(message["type"] == MESSAGE_TYPE and message["group"] == group for message in received)


def test_publishes_from_many_threads_all_arrive(feeds):
    url, group, inbox = require_redis(), _group(), _Inbox()
    receiver, sender = feeds(_layer(PUBSUB, url)), feeds(_layer(PUBSUB, url))
    receiver.subscribe(group, inbox)
    threads, each = 8, 200

    def publisher(thread):
        return lambda: [sender.publish(group, {"thread": thread, "n": n}) for n in range(each)]

    run_threads([publisher(thread) for thread in range(threads)])
    wait_until(lambda: inbox.messages.qsize() >= threads * each, timeout=30, what="all messages")
    got = [inbox.messages.get_nowait() for _ in range(threads * each)]
    assert sorted((m["thread"], m["n"]) for m in got) == [(t, n) for t in range(threads) for n in range(each)]
    assert inbox.messages.empty()
    for thread in range(threads):  # one publisher's messages leave in publish order
        assert [m["n"] for m in got if m["thread"] == thread] == list(range(each))


def _expired_membership_test(feeds, wait_past_expiry, **options):
    """Subscribe through a core layer whose memberships expire after 2 s; publish after that; return the inbox."""
    url, group, inbox = require_redis(), _group(), _Inbox()
    receiver = feeds(_layer(CORE, url, group_expiry=2), ping_interval=600, **options)  # no repair by the ping
    sender = feeds(_layer(CORE, url))
    receiver.subscribe(group, inbox)
    time.sleep(wait_past_expiry)  # the point of the test is time passing
    sender.publish(group, {"n": 1})
    return inbox


def test_core_layer_memberships_are_refreshed_before_they_expire(feeds):
    inbox = _expired_membership_test(feeds, 3.5)  # default refresh: min(group_expiry / 2, 300 s)
    assert inbox.get(timeout=5)["n"] == 1


def test_without_refresh_the_core_layer_membership_expires(feeds):
    # The control for the test above: it would fail if the feed did not refresh.
    inbox = _expired_membership_test(feeds, 3.5, refresh_interval=600)
    with pytest.raises(queue.Empty):
        inbox.messages.get(timeout=1.5)


# ---- Redis stopped and restarted -----------------------------------------------------------------


class _OwnRedis:
    """A redis-server of this test alone, on a free port, that the test may stop and restart."""

    def __init__(self):
        if shutil.which("redis-server") is None:
            if os.environ.get("DJSTM_REQUIRE_SERVICES") == "1":
                pytest.fail("redis-server is not on PATH")
            pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, timeout=10, what=f"redis-server on port {self.port}")

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis():
    server = _OwnRedis()
    server.start()
    yield server
    server.stop()


def _outage_warnings(caplog, name):
    return [r for r in caplog.records if r.name == "djstm.notify" and r.levelno == logging.WARNING
            and "unreachable" in r.getMessage() and repr(name) in r.getMessage()]


@REDIS_LAYERS
def test_the_feed_resubscribes_after_redis_restarts(backend, own_redis, feeds, caplog):
    caplog.set_level(logging.WARNING, logger="djstm.notify")
    group, inbox = _group(), _Inbox()
    receiver = feeds(_layer(backend, own_redis.url), name="receiver")
    sender = feeds(_layer(backend, own_redis.url), name="sender")
    receiver.subscribe(group, inbox)
    sender.publish(group, {"n": 0})
    assert inbox.get()["n"] == 0

    own_redis.stop()
    started = time.monotonic()
    for n in range(1, 51):
        sender.publish(group, {"n": n})  # dropped: no exception, no wait
    assert time.monotonic() - started < 1.0
    wait_until(lambda: _outage_warnings(caplog, "receiver") and _outage_warnings(caplog, "sender"),
               timeout=15, what="both feeds to notice the outage")

    own_redis.start()
    restarted, n = time.monotonic(), 100
    while True:  # publish until one gets through: a feed reconnects within a few seconds
        assert time.monotonic() - restarted < 12, "no message received within 12 s of the restart"
        sender.publish(group, {"n": n})
        n += 1
        try:
            message = inbox.messages.get(timeout=0.2)
        except queue.Empty:
            continue
        assert message["n"] >= 100, f"message {message['n']}, published while Redis was down, arrived"
        break
    assert len(_outage_warnings(caplog, "receiver")) == 1 and len(_outage_warnings(caplog, "sender")) == 1


def test_subscribe_while_redis_is_down_returns_and_subscribes_when_it_is_back(own_redis, feeds, caplog):
    own_redis.stop()
    group, inbox = _group(), _Inbox()
    receiver = feeds(_layer(PUBSUB, own_redis.url), timeout=1.0)
    started = time.monotonic()
    receiver.subscribe(group, inbox)
    assert time.monotonic() - started < 3
    assert "subscribing when it is back" in caplog.text

    own_redis.start()
    sender = feeds(_layer(PUBSUB, own_redis.url))
    deadline = time.monotonic() + 12
    while inbox.messages.empty():
        assert time.monotonic() < deadline, "the subscription made while Redis was down never became active"
        sender.publish(group, {"n": 1})
        time.sleep(0.2)
    assert inbox.get()["n"] == 1
