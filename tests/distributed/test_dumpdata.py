"""``dumpdata djstm`` then ``loaddata`` into an empty database: every DVar back, with its version, silently."""

import uuid

import psycopg
import pytest
from django.core.management import call_command
from django.db import connections

import djstm
from djstm.models import DVarRecord
from djstm.notify import change_feed
from tests.conftest import wait_until
from tests.services import require_postgres

from .conftest import ALIAS


@pytest.fixture
def empty_database():
    """A PostgreSQL database of this test's own, migrated, as a second alias; dropped afterwards."""
    name = f"djstm_load_{uuid.uuid4().hex[:8]}"
    alias = "loaded"
    with psycopg.connect(require_postgres(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    connections.settings[alias] = {**connections.settings[ALIAS], "NAME": name}
    try:
        call_command("migrate", "djstm", database=alias, verbosity=0)
        yield alias
    finally:
        connections[alias].close()
        del connections.settings[alias]
        with psycopg.connect(require_postgres(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_dumpdata_then_loaddata_restores_values_and_versions_without_notifications(
    open_store, store_name, tmp_path, empty_database
):
    store = open_store()
    price, tags = store.dvar("price", 12), store.dvar(("tags", "home"), ["a"], type=list[str])
    for _ in range(3):
        djstm.atomically(lambda: price.write(price.read() + 1))
    djstm.atomically(lambda: tags.write([*tags.read(), "b"]))
    dump = tmp_path / "djstm.json"
    ours = DVarRecord.objects.using(ALIAS).filter(store=store_name).values_list("pk", flat=True)
    with open(dump, "w") as out:  # this test's rows only: the database is shared with the other tests
        call_command("dumpdata", "djstm.DVarRecord", database=ALIAS, pks=",".join(map(str, ours)), stdout=out)

    loaded = djstm.with_store(database=empty_database, mode="distributed", name=store_name)
    heard = []
    feed = change_feed("djstm")
    feed.subscribe(loaded._group, heard.append)
    try:
        call_command("loaddata", str(dump), database=empty_database, verbosity=0)
        again_price, again_tags = loaded.dvar("price"), loaded.dvar(("tags", "home"), type=list[str])
        assert djstm.atomically(lambda: (again_price.read(), again_tags.read())) == (15, ["a", "b"])
        assert (again_price.row_version, again_tags.row_version) == (3, 1)
        djstm.atomically(lambda: again_price.write(again_price.read() + 1))
        assert again_price.row_version == 4  # later writes continue from the loaded version
        wait_until(lambda: heard, timeout=5, what="the notification of that later write")
        assert [change for message in heard for change in message["changes"]] == [["price", 4]]
    finally:
        feed.unsubscribe(loaded._group, heard.append)
        loaded.close()
