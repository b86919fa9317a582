"""``manage.py djstm``: list, get, set, watch, export, import, check, on a distributed and a durable store."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

import djstm
from tests.distributed.conftest import ALIAS, bump_by_hand, stored

PROJECT = Path(__file__).resolve().parents[1]
# The command works on the databases directly, as it does in a project; no test database.
pytestmark = pytest.mark.usefixtures("direct_database_access")


@pytest.fixture
def shop(distributed_schema):
    """A distributed store with a few DVars, closed after the test."""
    name = f"cmd-{uuid.uuid4().hex[:10]}"
    store = djstm.with_store(database=ALIAS, mode="distributed", name=name)
    store.dvar("price", 12)
    store.dvar(("quota", "uploads"), 100)
    store.dvar("title", "Shop")
    yield store
    store.close()


def run(*args):
    from io import StringIO

    out = StringIO()
    call_command("djstm", *args, stdout=out)
    return out.getvalue()


def test_list_shows_each_dvar_with_its_type_and_version(shop):
    listing = run("list", "--database", ALIAS, "--store", shop.name)
    lines = listing.splitlines()
    assert lines[0].split() == ["STORE", "NAME", "TYPE", "VERSION", "UPDATED"]
    assert [line.split()[1:4] for line in lines[1:]] == [
        ['["quota","uploads"]', "int", "0"],
        ["price", "int", "0"],
        ["title", "str", "0"],
    ]
    assert len(run("list", "--database", ALIAS, "--store", shop.name, "pr").splitlines()) == 2


def test_get_prints_the_value_and_names_what_is_missing(shop):
    assert json.loads(run("get", "--database", ALIAS, "--store", shop.name, "title")) == "Shop"
    with pytest.raises(CommandError, match="no DVar 'nope' in store"):
        run("get", "--database", ALIAS, "--store", shop.name, "nope")


def test_set_validates_and_commits_through_a_transaction(shop):
    price = shop.dvar("price")
    run("set", "--database", ALIAS, "--store", shop.name, "price", "15")
    assert stored(shop.name, "price") == ("15", 1)
    assert djstm.atomically(price.read) == 15
    with pytest.raises(CommandError, match="not valid JSON"):
        run("set", "--database", ALIAS, "--store", shop.name, "price", "fifteen")
    with pytest.raises(CommandError, match="type int"):
        run("set", "--database", ALIAS, "--store", shop.name, "price", '"15"')
    with pytest.raises(CommandError, match="no DVar"):
        run("set", "--database", ALIAS, "--store", shop.name, "nope", "1")
    run("set", "--database", ALIAS, "--store", shop.name, '["quota","uploads"]', "5")
    assert stored(shop.name, '["quota","uploads"]') == ("5", 1)
    assert stored(shop.name, "price") == ("15", 1)  # the refused writes changed nothing


def test_set_on_a_durable_store_held_by_another_process_is_refused(tmp_path):
    from django.db import connections

    path = tmp_path / "held.sqlite3"
    with djstm.with_store(path) as store:
        store.dvar("theme", "light")
    alias = "held"
    connections.settings[alias] = {**connections.settings["stores"], "NAME": str(path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, djstm, time; s = djstm.with_store(sys.argv[1]); print('held', flush=True); "
         "time.sleep(60)", str(path)],
        env={**os.environ, "PYTHONPATH": str(PROJECT), "DJANGO_SETTINGS_MODULE": ""},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CommandError, match="another process"):
            run("set", "--database", alias, "theme", '"dark"')
    finally:
        holder.kill()
        holder.wait(10)
        del connections.settings[alias]


def test_export_then_import_restores_values_and_versions_all_or_nothing(shop, tmp_path):
    run("set", "--database", ALIAS, "--store", shop.name, "price", "20")
    exported = tmp_path / "shop.jsonl"
    assert "exported 3 DVars" in run("export", "--database", ALIAS, "--store", shop.name, str(exported))
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert {line["name"]: (line["value"], line["version"]) for line in lines}["price"] == ("20", 1)

    run("set", "--database", ALIAS, "--store", shop.name, "price", "99")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(exported.read_text() + "{not json\n")
    with pytest.raises(CommandError, match="line 4.*nothing was imported"):
        run("import", "--database", ALIAS, str(broken))
    assert stored(shop.name, "price") == ("99", 2)

    assert "imported 3 DVars" in run("import", "--database", ALIAS, str(exported))
    assert stored(shop.name, "price") == ("20", 3)  # a write like any other: the version moves on
    assert djstm.atomically(shop.dvar("price").read) == 20


def test_check_reports_rows_that_do_not_decode(shop):
    assert "3 rows checked, 0 do not decode" in run("check", "--database", ALIAS, "--store", shop.name)
    bump_by_hand(shop.name, "title", "not json")
    with pytest.raises(CommandError, match="1 rows do not decode"):
        run("check", "--database", ALIAS, "--store", shop.name)


def test_watch_prints_each_change_and_stops_cleanly_on_ctrl_c(shop):
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "django", "djstm", "watch", "--database", ALIAS, "--store", shop.name, "price"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline().strip() == f"{shop.name}:price = 12"
        price = shop.dvar("price")
        djstm.atomically(lambda: price.write(13))
        assert watcher.stdout.readline().strip() == f"{shop.name}:price = 13"
        time.sleep(0.2)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    assert out.strip().endswith("stopped")


def test_set_and_get_on_a_durable_store(tmp_path):
    from django.db import connections

    path = tmp_path / "settings.sqlite3"
    with djstm.with_store(path, name="site") as store:
        store.dvar("theme", "light")
    alias = "durable-cmd"
    connections.settings[alias] = {**connections.settings["stores"], "NAME": str(path)}
    try:
        run("set", "--database", alias, "--store", "site", "theme", '"dark"')
        assert json.loads(run("get", "--database", alias, "--store", "site", "theme")) == "dark"
    finally:
        connections[alias].close()
        del connections.settings[alias]
    with djstm.with_store(path, name="site") as store:
        assert store.dvar("theme").peek() == "dark"


def test_import_refuses_a_value_that_does_not_fit_its_type(shop, tmp_path):
    exported = tmp_path / "shop.jsonl"
    run("export", "--database", ALIAS, "--store", shop.name, str(exported))
    bad = exported.read_text().replace('"value": "12"', '"value": "\\"twelve\\""')
    assert bad != exported.read_text()
    exported.write_text(bad)
    with pytest.raises(CommandError, match="nothing was imported"):
        run("import", "--database", ALIAS, str(exported))
    assert stored(shop.name, "price") == ("12", 0)


def test_set_repairs_a_row_that_does_not_decode(shop):
    bump_by_hand(shop.name, "price", '"not a number"')
    out = run("set", "--database", ALIAS, "--store", shop.name, "price", "21")
    assert "did not decode; replaced" in out
    assert stored(shop.name, "price") == ("21", 2)
    assert djstm.atomically(shop.dvar("price").read) == 21
