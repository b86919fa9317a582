"""Running tests/distributed/worker.py as child processes: bounded waits, JSON lines, no leftovers."""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Child:
    """A worker process; its stdout lines are parsed as JSON events, its stderr kept for reports."""

    def __init__(self, label: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.args = [sys.executable, str(WORKER), *map(str, args)]
        self.process = subprocess.Popen(
            self.args,
            env=env or child_env(),
            cwd=str(ROOT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.process.pid
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "noise", "line": line.rstrip("\n")}
            self.events.put(event)
        self.events.put(None)  # end of output

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def describe(self) -> str:
        text = self.stderr.strip()
        tail = text[-6000:] if text else "(empty)"
        return f"{self.label} (pid {self.pid}, exit {self.process.poll()}):\n--- stderr ---\n{tail}"

    def expect(self, event: str, timeout: float) -> dict:
        """The next ``event`` line (earlier lines of other kinds are kept in ``seen``); fail if none in time."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {event!r} from {self.describe()}", pytrace=False)
            try:
                got = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                self.process.wait(5)
                self._readers[1].join(2)
                pytest.fail(f"{self.label} ended before {event!r}: {self.describe()}", pytrace=False)
            self.seen.append(got)
            if got.get("event") == event:
                return got

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float) -> dict:
        """Wait for the ``done`` event and a zero exit; fail with the child's stderr otherwise."""
        done = self.expect("done", timeout)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.label} reported done but did not exit: {self.describe()}", pytrace=False)
        self._readers[1].join(2)
        if code != 0:
            pytest.fail(f"{self.label} failed: {self.describe()}", pytrace=False)
        return done

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except Exception:
                pass


class Children:
    """Context manager owning child processes: every one still running at exit is SIGKILLed."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, label: str, *args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(label, *args, env=env)
        self.children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        for child in self.children:
            child.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnRedis:
    """A redis-server of this test on its own port (never the shared one), stoppable and restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        import redis

        if shutil.which("redis-server") is None:
            message = "this test starts and stops a redis-server of its own, and none is on PATH"
            if os.environ.get("DJSTM_REQUIRE_SERVICES") == "1":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"could not start redis-server on port {self.port}", pytrace=False)
                time.sleep(0.05)

    def subscriptions(self) -> int:
        """How many channel subscriptions this Redis holds (every process's feed has some)."""
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=2)
        try:
            channels = client.pubsub_channels()
            return sum(count for _, count in client.pubsub_numsub(*channels)) if channels else 0
        finally:
            client.close()

    def wait_for_subscriptions(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.subscriptions()) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"only {now} of {count} subscriptions came back {timeout}s after Redis restarted",
                            pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]
