"""Distributed stores against the real PostgreSQL and Redis (see tests/services.py for when they skip)."""

import uuid

import pytest
from django.db import connections

import djstm
from tests.conftest import DISTRIBUTED_ALIAS as ALIAS


@pytest.fixture(autouse=True)
def _database_allowed(distributed_schema, direct_database_access):
    """These tests use the database as a program would, with stores of names of their own."""
    yield
    connections[ALIAS].close()


@pytest.fixture
def store_name():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_store(store_name):
    """Open distributed stores in this test (``open_store(**kwargs)``); all are closed afterwards."""
    opened = []

    def open_(name=None, **kwargs):
        store = djstm.with_store(database=ALIAS, mode="distributed", name=name or store_name, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def run_sql(sql, params=()):
    """Run ``sql`` on its own connection, as another program (or a person at psql) would."""
    import psycopg

    from tests.services import require_postgres

    with psycopg.connect(require_postgres(), autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def bump_by_hand(store_name, name, value_text):
    """Change a row the way another program would: new value, version + 1, no notification."""
    run_sql(
        "UPDATE djstm_dvar SET value = %s, version = version + 1 WHERE store = %s AND name = %s",
        [value_text, store_name, name],
    )


def stored(store_name, name):
    """The row's (value text, version) as the database has it, or None."""
    rows = run_sql("SELECT value, version FROM djstm_dvar WHERE store = %s AND name = %s", [store_name, name])
    return rows[0] if rows else None
