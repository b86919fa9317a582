"""Semantics 8: after a SIGKILL at any instant, reopening shows a prefix of the committed transactions."""

import random
import signal
import subprocess
import sys
import time

import djstm
from tests.stores.conftest import PROJECT, plain_env

KILLS = 24


def _start_child(path):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.stores.crash_child", str(path)],
        cwd=PROJECT,
        env=plain_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_at_random_instants_leaves_a_prefix_including_everything_synced(store_path):
    rng = random.Random(20261203)
    last_seen = 0
    progressed = 0
    for kill in range(KILLS):
        child = _start_child(store_path)
        try:
            first = child.stdout.readline()
            assert first.startswith("started"), first + child.stderr.read()
            early = child.stdout.readline()  # the first confirmed sync: the child is well under way
            assert early.startswith("synced"), early + child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGKILL)
            output, _ = child.communicate(timeout=30)
            output = early + output
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert child.returncode == -signal.SIGKILL
        # Only whole lines count: the kill may cut the child's last line short.
        lines = [line for line in output.splitlines(keepends=True) if line.endswith("\n")]
        synced = [int(line.split()[1]) for line in lines if line.startswith("synced")]
        confirmed = max(synced, default=0)

        with djstm.with_store(store_path) as store:
            n, a, b = store.dvar("n", 0).peek(), store.dvar("a", 0).peek(), store.dvar("b", 0).peek()
            blob = store.dvar("blob", "").peek()
        assert a == n and b == -n, f"torn transaction after kill {kill}: n={n} a={a} b={b}"
        assert blob == (str(n) * 20000 if n else ""), f"torn blob after kill {kill}"
        assert n >= confirmed, f"kill {kill}: sync() confirmed {confirmed} but the store shows {n}"
        assert n >= last_seen, f"kill {kill}: the store went back from {last_seen} to {n}"
        progressed += n > last_seen
        last_seen = n
    assert progressed == KILLS  # every run committed (and synced) something new before being killed
