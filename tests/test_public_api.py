"""The façade: every public name exported exactly once; the engine usable with no Django at all."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import djstm
import djstm.errors

PROJECT = Path(__file__).resolve().parents[1]


def test_every_public_name_is_exported_once_and_exists():
    assert len(djstm.__all__) == len(set(djstm.__all__))
    for name in djstm.__all__:
        assert hasattr(djstm, name), name
    public = {name for name in vars(djstm) if not name.startswith("_") and not inspect.ismodule(getattr(djstm, name))}
    assert public == set(djstm.__all__)


def test_the_design_names_are_all_there():
    for name in ["TVar", "atomically", "aatomically", "retry", "check", "or_else", "after_commit", "transactional", "with_store"]:
        assert name in djstm.__all__
    for name in ["STMError", "NoTransaction", "Timeout", "DVarTypeError", "InvalidName", "StoreLocked", "StoreCorrupt"]:
        assert getattr(djstm, name) is getattr(djstm.errors, name)


def test_every_error_is_an_stm_error_and_timeout_is_a_timeout_error():
    for name in djstm.errors.__all__:
        assert issubclass(getattr(djstm.errors, name), djstm.STMError), name
    assert issubclass(djstm.Timeout, TimeoutError)


def test_the_engine_imports_and_runs_without_django():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(PROJECT)
    code = (
        "import sys, djstm.stm as stm, djstm\n"
        "v = stm.TVar(1)\n"
        "assert stm.atomically(lambda: v.modify(lambda n: n + 1) or v.read()) == 2\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'django')\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_engine_package_has_no_django_import_in_its_source():
    for path in (PROJECT / "djstm" / "stm").glob("*.py"):
        text = path.read_text()
        assert "import django" not in text and "from django" not in text, path
