"""The demo board: its state lives in a durable store, survives a restart, and follows changes live."""

import asyncio
import http.cookiejar
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
from channels.testing import WebsocketCommunicator

import djstm
from demo_site.board import state
from demo_site.board.consumers import BoardConsumer
from tests.stores.conftest import PROJECT


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DemoServer:
    """``manage.py runserver`` of the demo site, as ``make demo`` starts it, in a scratch directory."""

    def __init__(self, var_dir, databases=("default", "board"), **extra_env):
        self.port = _free_port()
        self.var_dir = var_dir
        env = {**os.environ, "DJSTM_DEMO_VAR": str(var_dir), "PYTHONPATH": str(PROJECT), **extra_env}
        if "DJANGO_SETTINGS_MODULE" not in extra_env:
            env.pop("DJANGO_SETTINGS_MODULE", None)
        for database in databases:  # as `make demo` does
            subprocess.run([sys.executable, "manage.py", "migrate", "--database", database, "--noinput"],
                           cwd=PROJECT, env=env, check=True, capture_output=True, timeout=120)
        self.env = env
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self._serve()

    def restart(self):
        """Stop the server and start it again on the same port and files."""
        self.stop()
        self._serve()

    def _serve(self):
        env = self.env
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{self.port}", "--noreload"],
            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.page = self.get("/")
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    pytest.fail("the demo server did not start:\n" + self.process.stdout.read())
                time.sleep(0.1)

    def get(self, path):
        with self.opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return response.read().decode()

    def post(self, path, **fields):
        token = self._csrf()
        data = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": token}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data,
            headers={"Accept": "application/json", "Referer": f"http://127.0.0.1:{self.port}/"},
        )
        with self.opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def _csrf(self):
        for handler in self.opener.handlers:
            if isinstance(handler, urllib.request.HTTPCookieProcessor):
                return next(c.value for c in handler.cookiejar if c.name == "csrftoken")
        raise AssertionError("no cookie handler")

    def stop(self):
        self.process.send_signal(signal.SIGINT)  # what Ctrl-C does to `make demo`
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def test_the_board_survives_restarting_the_server(tmp_path):
    server = DemoServer(tmp_path)
    try:
        for _ in range(3):
            board = server.post("/click")
        board = server.post("/notes", text="<b>bold</b> & brave")
        assert board["clicks"] == 3
        assert board["notes"][0]["text"] == "<b>bold</b> & brave"
    finally:
        server.stop()

    server = DemoServer(tmp_path)
    try:
        assert "&lt;b&gt;bold&lt;/b&gt; &amp; brave" in server.page  # shown as text, escaped
        board = server.post("/click")
        assert board["clicks"] == 4
        assert [note["text"] for note in board["notes"]] == ["<b>bold</b> & brave"]
    finally:
        server.stop()


@pytest.fixture
def board_store(settings, tmp_path, django_db_blocker):
    settings.BOARD_STORE = {"path": tmp_path / "board.sqlite3", "name": "board"}
    state._store.cache_clear()
    with django_db_blocker.unblock():
        yield
        state._store().close()
    state._store.cache_clear()


def test_a_note_that_does_not_fit_is_refused_and_nothing_changes(board_store):
    before = djstm.atomically(state.snapshot)
    for text in ("   ", "x" * (state.MAX_NOTE_LENGTH + 1)):
        with pytest.raises(ValueError):
            djstm.atomically(state.post_note, text)
    assert djstm.atomically(state.snapshot) == before


def test_an_open_socket_receives_each_change_as_it_commits(board_store):
    async def follow():
        communicator = WebsocketCommunicator(BoardConsumer.as_asgi(), "/ws/board/")
        connected, _ = await communicator.connect()
        assert connected
        first = await communicator.receive_json_from(timeout=5)
        threading.Thread(target=lambda: djstm.atomically(state.click)).start()
        second = await communicator.receive_json_from(timeout=5)
        threading.Thread(target=lambda: djstm.atomically(state.post_note, "hello")).start()
        third = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return first, second, third

    first, second, third = asyncio.run(follow())
    assert second["clicks"] == first["clicks"] + 1
    assert second["revision"] > first["revision"]
    assert third["notes"][0]["text"] == "hello"


def test_the_background_worker_pins_a_note_for_every_ten_clicks_once(board_store):
    import threading

    from tests.conftest import wait_until

    worker = threading.Thread(target=state._celebrate_until_closed, daemon=True)
    worker.start()
    for _ in range(state.CELEBRATE_EVERY):
        djstm.atomically(state.click)
    first_note = lambda: [note["text"] for note in djstm.atomically(state.snapshot)["notes"]][:1]  # noqa: E731
    wait_until(lambda: first_note() == ["🎉 10 clicks!"], timeout=5, what="the worker's note")
    with pytest.raises(djstm.Timeout):  # nothing more to celebrate until 20
        djstm.atomically(state.celebrate_next_milestone, timeout=0.3)
    state._store().close()  # the worker, blocked in retry, ends with the store
    worker.join(5)
    assert not worker.is_alive()


def test_staff_tune_how_many_notes_the_board_keeps(board_store):
    djstm.atomically(lambda: state._note_limit().write(2))
    for text in ("one", "two", "three"):
        djstm.atomically(state.post_note, text)
    assert [note["text"] for note in djstm.atomically(state.snapshot)["notes"]] == ["three", "two"]
