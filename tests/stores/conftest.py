import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _databases_allowed(direct_database_access):
    """Store tests open their own SQLite files, as a program would; no test database is involved."""


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "project.sqlite3"


def plain_env():
    """The environment of a plain script: this project importable, no Django settings."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(PROJECT)
    return env


def plain_python(code, *args, timeout=60, **popen):
    """Run ``code`` in a fresh interpreter with no Django settings, as a plain script would be."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=plain_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
