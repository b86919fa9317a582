"""Semantics 7 through a store: every supported value survives closing and reopening, exactly."""

import dataclasses
import enum
import math
import sqlite3
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

import djstm
from djstm import atomically


class Colour(enum.Enum):
    RED = "r"
    GREEN = "g"


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Booking:
    seat: tuple[int, str]
    at: datetime
    tags: frozenset[str]


def same(a, b):
    """Equal and of the same types all the way down (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, datetime):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and a.utcoffset() == b.utcoffset()
    return a == b


VALUES = {
    "int": (10**30, None),
    "huge int": (7**20000, None),
    "negative": (-(2**70), None),
    "float": (0.1, None),
    "nan": (float("nan"), None),
    "infinity": (float("-inf"), None),
    "str in any script": ("naïve 名前 имя 🎉 \\ ' \" $1", None),
    "empty str": ("", None),
    "bool": (False, None),
    "bytes": (bytes(range(256)), None),
    "decimal": (Decimal("-0.00100"), None),
    "aware datetime": (datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris")), None),
    "folded datetime": (datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")), None),
    "utc datetime": (datetime(2026, 1, 1, tzinfo=timezone.utc), None),
    "naive datetime": (datetime(2026, 1, 1, 12, 0, 0, 1), None),
    "date": (date(1999, 12, 31), None),
    "time with offset": (time(23, 59, tzinfo=timezone(timedelta(hours=-3, minutes=-30))), None),
    "timedelta": (timedelta(days=-1, microseconds=5), None),
    "uuid": (uuid.UUID("12345678-1234-5678-1234-567812345678"), None),
    "enum": (Colour.GREEN, None),
    "dataclass": (Point(1, 2.5, "p"), None),
    "frozen dataclass": (Booking((3, "B"), datetime(2026, 5, 1, tzinfo=timezone.utc), frozenset({"aisle"})), None),
    "tuple": ((1, "two", (3.0, None)), None),
    "list of dataclasses": ([Point(0, 0.0), Point(-1, 1e300)], list[Point]),
    "dict with non-str keys": ({1: "one", (2, 3): "pair", None: "none"}, None),
    "dict that looks like a tag": ({"$tuple": [1, 2], "$dict": "x"}, None),
    "set": ({3, 1, 2}, None),
    "frozenset of str": (frozenset({"a", "b"}), frozenset[str]),
    "optional none": (None, int | None),
    "nested containers": ({"k": [(1, {2}), (3, set())]}, dict[str, list[tuple[int, set[int]]]]),
    "5 MB str": ("x" * (5 * 1024 * 1024), None),
}


def test_every_value_reads_back_equal_and_of_the_same_type_after_reopening(store_path):
    with djstm.with_store(store_path) as store:
        for name, (value, declared) in VALUES.items():
            dvar = store.dvar(name, value, type=declared) if declared else store.dvar(name, value)
            atomically(dvar.write, value)  # a committed write, not only the creation
    with djstm.with_store(store_path) as store:
        for name, (value, declared) in VALUES.items():
            dvar = store.dvar(name, value, type=declared) if declared else store.dvar(name, value)
            assert same(dvar.peek(), value), name


def test_values_that_cannot_be_stored_are_refused_at_write_naming_the_dvar(store_path):
    class Opaque:
        pass

    with djstm.with_store(store_path) as store:
        anything = store.dvar("anything", type=list, default=[])
        stamp = store.dvar("stamp", datetime(2026, 1, 1))
        circular = []
        circular.append(circular)
        for bad, complaint in [
            ([Opaque()], "Opaque"),
            ([Point(1, 2.0)], "type="),  # a dataclass inside an untyped list needs a declared type
            (circular, "circular"),
        ]:
            with pytest.raises(djstm.DVarTypeError, match=rf"'anything'.*{complaint}"):
                atomically(anything.write, bad)
        with pytest.raises(djstm.DVarTypeError, match="'stamp'"):
            atomically(stamp.write, datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1))).date())
        assert anything.peek() == []
    with djstm.with_store(store_path) as store:
        assert store.dvar("anything", type=list, default=[]).peek() == []


def test_a_row_that_does_not_decode_names_its_dvar_and_the_rest_stays_usable(store_path):
    with djstm.with_store(store_path) as store:
        store.dvar("good", 1)
        store.dvar("broken", 2)
    connection = sqlite3.connect(store_path)
    connection.execute("UPDATE djstm_dvar SET value = '\"not a number\"' WHERE name = 'broken'")
    connection.commit()
    connection.close()
    with djstm.with_store(store_path) as store:
        with pytest.raises(djstm.DVarDecodeError, match=r"'broken'.*does not decode as int"):
            store.dvar("broken", 0)
        good = store.dvar("good", 0)
        atomically(good.write, 5)
        assert good.peek() == 5


def test_dvars_can_be_opened_inside_a_transaction(store_path):
    with djstm.with_store(store_path) as store:

        def open_and_bump():
            counter = store.dvar(("counters", "visits"), 0)
            counter.write(counter.read() + 1)
            return counter.read()

        assert atomically(open_and_bump) == 1
        assert atomically(open_and_bump) == 2
    with djstm.with_store(store_path) as store:
        assert store.dvar(("counters", "visits"), 0).peek() == 2
