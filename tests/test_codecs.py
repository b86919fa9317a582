"""djstm.codecs: exact round trips, refusals that say where and what, canonical tags, copies."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import subprocess
import sys
import threading
import typing
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djstm.codecs import Codec, codec_for, codec_from_tag
from djstm.errors import DVarDecodeError, DVarTypeError

ANY = codec_for(typing.Any)


# -- user types ------------------------------------------------------------------------------------

@dataclass
class Point:
    x: int
    y: int


@dataclass(frozen=True)
class FrozenPoint:
    x: int
    y: float


@dataclass
class Shape:
    name: str
    points: list[Point]
    tags: set[str] = field(default_factory=set)
    anchor: Point | None = None


@dataclass
class Node:
    value: int
    next: Node | None = None


@dataclass(slots=True)
class Slotted:
    a: int
    b: tuple[int, ...]


@dataclass
class WithPostInit:
    a: int
    doubled: int = field(init=False)

    def __post_init__(self):
        self.doubled = self.a * 2


@dataclass
class Tree:  # built only by the threading test, so that test really races the first build
    label: str
    children: list[Tree]
    parent: Tree | None = None


@dataclass
class NeverBuilt:  # no codec is ever built for this class in the test process
    a: int


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


class Level(enum.IntEnum):
    LOW = 1


class MyStr(str):
    pass


class MyInt(int):
    pass


class LocalTZ(tzinfo):
    def utcoffset(self, dt):
        return timedelta(hours=2)

    def dst(self, dt):
        return timedelta(0)

    def tzname(self, dt):
        return "LOCAL"


# -- helpers ---------------------------------------------------------------------------------------

def _r(x) -> str:
    try:
        return repr(x)[:60]
    except ValueError:  # ints past the int/str digit limit
        return "<huge int>"


def same(a, b, where="value"):
    """Equal AND of identical types all the way down; NaN equals NaN; Decimal by exact text."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} became {type(b).__name__}"
    t = type(a)
    if t is float:
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{where}: {_r(a)} != {_r(b)}"
    elif t is Decimal:
        assert str(a) == str(b), f"{where}: {_r(a)} != {_r(b)}"
    elif t in (datetime, time):
        assert a.isoformat() == b.isoformat() and a.fold == b.fold, f"{where}: {_r(a)} != {_r(b)}"
        assert type(a.tzinfo) is type(b.tzinfo), where
        if isinstance(a.tzinfo, ZoneInfo):
            assert a.tzinfo.key == b.tzinfo.key, where
        elif a.tzinfo is not None:
            assert a.tzinfo == b.tzinfo and a.tzinfo.tzname(None) == b.tzinfo.tzname(None), where
    elif t in (list, tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif t is dict:
        assert len(a) == len(b), where
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):  # insertion order survives too
            same(ka, kb, f"{where} key {_r(ka)}")
            same(va, vb, f"{where}[{_r(ka)}]")
    elif t in (set, frozenset):
        assert a == b, where
        by_value = {y: y for y in b}
        for x in a:
            same(x, by_value[x], f"{where} element {_r(x)}")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, enum.Enum):
        assert a is b, where
    else:
        assert a == b, f"{where}: {_r(a)} != {_r(b)}"


def round_trip(codec, value):
    text = codec.dumps(value)
    assert isinstance(text, str)
    text.encode("utf-8")  # always storable text
    back = codec.loads(text)
    same(value, back)
    return text


def refusal(codec, value) -> str:
    with pytest.raises(DVarTypeError) as info:
        codec.dumps(value)
    return str(info.value)


# -- strategies ------------------------------------------------------------------------------------

fixed_offsets = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59))
)
named_offsets = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-12), max_value=timedelta(hours=12)),
                          st.text(min_size=1, max_size=8))
datetimes = st.builds(
    lambda d, fold: d.replace(fold=fold),
    st.datetimes(timezones=st.none() | st.just(timezone.utc) | fixed_offsets | named_offsets | st.timezones()),
    st.sampled_from([0, 1]),
)
times = st.builds(lambda t, fold: t.replace(fold=fold),
                  st.times(timezones=st.none() | fixed_offsets | named_offsets), st.sampled_from([0, 1]))
big_ints = st.builds(lambda bits, sign, low: sign * ((1 << bits) + low),
                     st.integers(1990, 20000), st.sampled_from([1, -1]), st.integers(0, 10**6))

hashable_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), big_ints, st.floats(allow_nan=False), st.text(), st.binary(),
    st.decimals(allow_nan=False), datetimes, st.dates(), times, st.timedeltas(), st.uuids(),
)
scalars = hashable_scalars | st.floats() | st.decimals(allow_nan=True, allow_infinity=True)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
tag_like_keys = st.sampled_from(["$tuple", "$set", "$dict", "$int", "$", "$$", "a"]) | st.text(max_size=4)
any_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(tag_like_keys, inner, max_size=3),
        st.dictionaries(hashables, inner, max_size=3),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=20,
)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- round trips -----------------------------------------------------------------------------------

@SLOW
@given(any_values)
def test_any_codec_round_trips_every_supported_value_with_its_types(value):
    round_trip(ANY, value)


@SLOW
@given(any_values)
def test_untyped_containers_round_trip_their_contents(value):
    round_trip(codec_for(list), [value])
    round_trip(codec_for(dict), {"k": value, ("t", 1): value})
    round_trip(codec_for(tuple), (value,))


@settings(deadline=None)
@given(st.lists(st.integers() | big_ints), st.dictionaries(st.text(), st.floats()), st.sets(st.text()),
       st.lists(st.integers()).map(tuple))
def test_typed_containers_round_trip(ints, floats, strs, int_tuple):
    round_trip(codec_for(list[int]), ints)
    round_trip(codec_for(dict[str, float]), floats)
    round_trip(codec_for(set[str]), strs)
    round_trip(codec_for(frozenset[str]), frozenset(strs))
    round_trip(codec_for(tuple[int, ...]), int_tuple)


@settings(deadline=None)
@given(st.dictionaries(st.tuples(st.integers(), st.text()), st.lists(st.binary(), max_size=3), max_size=4),
       st.lists(st.none() | st.integers() | st.text() | st.booleans(), max_size=6),
       st.lists(datetimes, max_size=3), st.lists(st.decimals(), max_size=3))
def test_typed_nested_and_union_values_round_trip(pairs, mixed, whens, decimals):
    round_trip(codec_for(dict[tuple[int, str], list[bytes]]), pairs)
    round_trip(codec_for(list[int | str | bool | None]), mixed)
    round_trip(codec_for(list[datetime]), whens)
    round_trip(codec_for(tuple[Decimal, ...]), tuple(decimals))


@pytest.mark.parametrize(
    "type_, value",
    [
        (int, 0), (int, -(10**18)), (int, 10**5000), (int, -(1 << 20000) + 3),
        (float, -0.0), (float, 5e-324), (float, 1.7976931348623157e308), (float, float("inf")),
        (float, float("-inf")), (float, float("nan")),
        (str, ""), (str, "ünïcødé ✓ 漢字 \U0001f600 \u2028 \x00 \"'\\"), (bool, False), (bytes, b"\x00\xff" * 9),
        (Decimal, Decimal("1.10")), (Decimal, Decimal("-0")), (Decimal, Decimal("1E+3")),
        (Decimal, Decimal("0E-7")), (Decimal, Decimal("-Infinity")), (Decimal, Decimal("NaN")),
        (Decimal, Decimal("sNaN")), (Decimal, Decimal("3.14159265358979323846264338327950288419716939937510")),
        (datetime, datetime(2024, 2, 29, 23, 59, 59, 999999)),
        (datetime, datetime(2024, 1, 1, tzinfo=timezone.utc)),
        (datetime, datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))),
        (datetime, datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1), "CET"))),
        (datetime, datetime(2024, 1, 1, tzinfo=timezone(timedelta(seconds=30, microseconds=1)))),
        (datetime, datetime(2024, 7, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))),
        (datetime, datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York"))),
        (datetime, datetime(2021, 11, 7, 1, 30, fold=0, tzinfo=ZoneInfo("America/New_York"))),
        (datetime, datetime(2021, 3, 14, 2, 30, tzinfo=ZoneInfo("America/New_York"))),  # in the gap
        (datetime, datetime(2020, 1, 1, fold=1)),
        (date, date(9999, 12, 31)), (time, time(0)), (time, time(23, 59, 59, 1, tzinfo=timezone.utc, fold=1)),
        (time, time(1, 2, tzinfo=timezone(timedelta(hours=3), "X]y[z"))),
        (timedelta, timedelta(days=-999999999)), (timedelta, timedelta(microseconds=-1)),
        (uuid.UUID, uuid.UUID(int=0)), (uuid.UUID, uuid.uuid4()),
        (Color, Color.GREEN), (Perm, Perm.R | Perm.X), (Perm, Perm(0)), (Perm, Perm.W), (Level, Level.LOW),
        (Point, Point(1, -2)), (FrozenPoint, FrozenPoint(1, 2.5)),
        (Shape, Shape("s", [Point(0, 0), Point(1, 1)], {"b", "a"}, Point(5, 5))),
        (Slotted, Slotted(1, (2, 3))),
        (list[Point], [Point(1, 2), Point(3, 4)]), (dict[str, FrozenPoint], {"a": FrozenPoint(0, -0.0)}),
        (dict[Color, list[Perm]], {Color.RED: [Perm.R], Color.GREEN: []}),
        (set[FrozenPoint], {FrozenPoint(1, 1.0), FrozenPoint(2, 2.0)}),
        (tuple[int, str, None], (1, "a", None)), (tuple[()], ()), (tuple[int, ...], ()),
        (dict[str, list[tuple[int, ...]]], {"a": [(1, 2), ()], "b": []}),
        (int | None, None), (int | None, 3), (list[int] | None, [1]), (bool | int, True), (bool | int, 1),
        (int | str, "1"), (int | str | None, None), (dict[str | None, int], {None: 1, "a": 2}),
        (list, [1, (2, 3), {4}, frozenset({5}), {"$tuple": [6]}, {7: 8}, b"9", Decimal("10.0")]),
        (dict, {"$set": [1], "x": (1,)}), (dict, {1: "a", (2, 3): "b", None: "c", False: "d"}),
        (typing.Optional[typing.Any], {"nested": [[], {}, ()]}),
    ],
    ids=lambda v: "huge-int" if type(v) is int and abs(v) > 10**100 else None,  # pytest would str() it
)
def test_round_trip_keeps_value_and_types(type_, value):
    round_trip(codec_for(type_), value)


def test_recursive_dataclass_round_trips():
    chain = None
    for i in range(50):
        chain = Node(i, chain)
    codec = codec_for(Node)
    round_trip(codec, chain)
    assert codec_for(list[Node]).loads('[{"value":1,"next":{"value":2,"next":null}}]') == [Node(1, Node(2))]


def test_dataclass_decoding_restores_fields_without_running_post_init():
    value = WithPostInit(3)
    value.doubled = 99
    back = round_trip(codec_for(WithPostInit), value)
    assert codec_for(WithPostInit).loads(back).doubled == 99


def test_int_size_limit_does_not_break_round_trips():
    codec = codec_for(int)
    assert codec.dumps((1 << 2000) - 1).isdigit()
    assert codec.dumps(1 << 2000).startswith('"0x')
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # the lowest a process may set
    try:
        for v in ((1 << 2000) - 1, -(1 << 2000), 10**700):
            round_trip(codec, v)
            round_trip(ANY, [v])
    finally:
        sys.set_int_max_str_digits(previous)


def test_five_megabyte_strings_and_bytes_round_trip():
    text = ("abc€漢\U0001f600" * 1_000_000)[:5_000_000]
    blob = os.urandom(5 * 1024 * 1024)
    for codec, value in ((codec_for(str), text), (codec_for(bytes), blob), (ANY, [text, blob])):
        round_trip(codec, value)


# -- encoded form ----------------------------------------------------------------------------------

def test_typed_text_is_compact_and_readable():
    assert codec_for(list[int]).dumps([1, 2, 3]) == "[1,2,3]"
    assert codec_for(dict[str, str]).dumps({"k": "é"}) == '{"k":"é"}'
    assert codec_for(float).dumps(float("nan")) == '"nan"'
    assert codec_for(int | None).dumps(None) == "null"
    assert codec_for(Color).dumps(Color.RED) == '"RED"'
    assert codec_for(Point).dumps(Point(1, 2)) == '{"x":1,"y":2}'
    assert codec_for(dict[int, str]).dumps({1: "a"}) == '[[1,"a"]]'


def test_any_text_is_plain_json_where_possible_and_tags_the_rest():
    assert ANY.dumps({"a": [1, 2.5, None, True, "s"]}) == '{"a":[1,2.5,null,true,"s"]}'
    assert ANY.dumps((1,)) == '{"$tuple":[1]}'
    assert ANY.dumps(b"hi") == '{"$bytes":"aGk="}'
    assert ANY.dumps(Decimal("1.10")) == '{"$decimal":"1.10"}'
    assert ANY.dumps(float("-inf")) == '{"$float":"-inf"}'
    assert ANY.dumps({1: 2}) == '{"$dict":[[1,2]]}'


def test_user_dicts_that_look_like_tags_stay_dicts():
    for value in ({"$tuple": [1]}, {"$set": []}, {"$dict": [[1, 2]]}, {"$": 1, "x": 2}, {"$bytes": "aGk="}):
        text = round_trip(ANY, value)
        assert text.startswith('{"$dict":')


def test_sets_are_written_in_sorted_order():
    assert codec_for(set[int]).dumps({3, 1, 2}) == "[1,2,3]"
    assert ANY.dumps(frozenset({"b", "a"})) == '{"$frozenset":["a","b"]}'
    round_trip(ANY, {1, "a", (2,)})  # not sortable: still round trips


# -- refusals --------------------------------------------------------------------------------------

def test_bool_is_not_an_int_and_int_is_not_a_float():
    assert "is bool True, expected int" in refusal(codec_for(int), True)
    message = refusal(codec_for(float), 3)
    assert "is int 3, expected float" in message and "3.0" in message
    assert "item [1] is int 2, expected float" in refusal(codec_for(list[float]), [1.0, 2])
    assert "item [1] is bool True, expected int" in refusal(codec_for(list[int]), [1, True])
    assert "an element is bool False, expected int" in refusal(codec_for(set[int]), {2, False})
    assert "item [0] is float 1.0, expected bool" in refusal(codec_for(tuple[bool, ...]), (1.0,))


def test_subclasses_of_builtins_are_refused_not_coerced():
    assert "MyStr" in refusal(codec_for(str), MyStr("x"))
    assert "MyInt" in refusal(codec_for(int), MyInt(1))
    assert "Level" in refusal(codec_for(int), Level.LOW)
    assert "MyStr" in refusal(ANY, [MyStr("x")])
    assert "bytearray" in refusal(ANY, bytearray(b"x"))
    assert "datetime.datetime" in refusal(codec_for(date), datetime(2020, 1, 1))
    assert "expected tuple[int, ...]" in refusal(codec_for(tuple[int, ...]), [1])


def test_wrong_item_names_where_and_what():
    assert "item [2] is int 5, expected str" in refusal(codec_for(list[str]), ["a", "b", 5])
    message = refusal(codec_for(dict[str, Point]), {"ok": Point(1, 1), "a": Point("hi", 2)})
    assert "key 'a' → field 'x' is str 'hi', expected int" in message
    assert "a key is int 1, expected str" in refusal(codec_for(dict[str, int]), {1: 1})
    assert "item [1] → item [0]" in refusal(codec_for(list[tuple[int, str]]), [(1, "a"), ("b", "c")])
    assert "an element is str 'x', expected int" in refusal(codec_for(set[int]), {1, "x"})
    assert "tuple of 3 items" in refusal(codec_for(tuple[int, str]), (1, "a", "b"))
    assert "expected int | None" in refusal(codec_for(int | None), "x")
    assert "expected int | str" in refusal(codec_for(int | str), 1.5)
    message = refusal(codec_for(Point), FrozenPoint(1, 1.0))
    assert f"is {__name__}.FrozenPoint FrozenPoint(x=1, y=1.0), expected {__name__}.Point" in message


def test_unsupported_tzinfo_is_refused_with_the_fix():
    message = refusal(codec_for(datetime), datetime(2020, 1, 1, tzinfo=LocalTZ()))
    assert "zoneinfo.ZoneInfo" in message and "datetime.timezone" in message
    assert "datetime.timezone" in refusal(codec_for(time), time(1, tzinfo=ZoneInfo("Europe/Paris")))
    assert "LocalTZ" in refusal(ANY, [datetime(2020, 1, 1, tzinfo=LocalTZ())])


def test_dataclasses_and_enums_inside_any_ask_for_a_declared_type():
    assert "type=list[Point]" in refusal(codec_for(list), [Point(1, 2)])
    assert "declare the type" in refusal(ANY, {"c": Color.RED})


def test_circular_values_are_refused_not_recursed():
    loop: list = [1]
    loop.append([2, loop])
    message = refusal(ANY, loop)
    assert "circular" in message and "item [1] → item [1]" in message
    cyclic_dict: dict = {}
    cyclic_dict["self"] = cyclic_dict
    assert "circular" in refusal(codec_for(dict[str, typing.Any]), cyclic_dict)
    node = Node(1)
    node.next = node
    assert "field 'next'" in refusal(codec_for(Node), node)


def test_too_deep_but_acyclic_is_a_type_error_not_a_crash():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert "nested too deeply" in refusal(ANY, deep)


def test_lone_surrogates_are_refused_at_dumps():
    assert "surrogate" in refusal(codec_for(str), "ok\ud800")
    assert "item [1]" in refusal(codec_for(list[str]), ["a", "\udfff"])
    assert "a key" in refusal(ANY, {"\ud800": 1})
    assert "surrogate" in refusal(ANY, ("\ud83d",))


def test_codec_for_refuses_unsupported_types_and_lists_what_is_supported():
    for bad in (complex, object, typing.Callable[[int], int], list[complex], MyStr, bytearray):
        with pytest.raises(DVarTypeError, match="supported: int, float, str"):
            codec_for(bad)


def test_codec_for_without_type_or_default_asks_for_one():
    with pytest.raises(DVarTypeError, match="type="):
        codec_for()
    with pytest.raises(DVarTypeError) as info:
        codec_for(default=None)
    assert str(info.value) == "a default of None does not tell the type; pass type=, e.g. type=int | None"
    with pytest.raises(DVarTypeError):
        codec_for(default=1j)


def test_default_must_fit_the_declared_type():
    with pytest.raises(DVarTypeError, match=r"default does not fit list\[str\]: item \[1\] is int 2"):
        codec_for(list[str], default=["a", 2])
    assert codec_for(int | None, default=None).tag == "int | None"


def test_type_is_inferred_from_the_default():
    assert codec_for(default=True).tag == "bool"
    assert codec_for(default=0).tag == "int"
    assert codec_for(default=0.0).tag == "float"
    assert codec_for(default=[1]).tag == "list[any]"
    assert codec_for(default={}).tag == "dict[any, any]"
    assert codec_for(default=()).tag == "tuple[any, ...]"
    assert codec_for(default=set()).tag == "set[any]"
    assert codec_for(default=frozenset()).tag == "frozenset[any]"
    assert codec_for(default=Decimal(1)).tag == "decimal.Decimal"
    assert codec_for(default=Color.RED) == codec_for(Color)
    assert codec_for(default=Point(1, 2)) == codec_for(Point)
    with pytest.raises(DVarTypeError, match="declare the type"):
        codec_for(default=[Point(1, 2)])


# -- decoding errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "type_, text",
    [
        (int, '"x"'), (int, "1.5"), (int, "true"), (int, ""), (float, "[]"), (str, "5"), (str, '"abc'),
        (bool, "1"), (type(None), "0"), (list[int], '{"a":1}'), (list[int], '[1,"a"]'), (list[int], "[1,"),
        (dict[str, int], "[]"), (dict[int, int], "[[1]]"), (tuple[int, str], "[1]"), (set[int], "[[1]]"),
        (bytes, '"not base64!"'), (Decimal, '"one"'), (datetime, '"yesterday"'),
        (datetime, '"2020-01-01T00:00:00+01:00[No/Such_Zone]"'), (time, '"01:00:00+01:00[Europe/Paris]"'),
        (timedelta, "[1,2]"), (uuid.UUID, '"xyz"'), (Color, '"BLUE"'), (Color, "1"),
        (Point, '{"x":1}'), (Point, '{"x":1,"y":2,"z":3}'), (Point, '{"x":1,"y":"2"}'),
        (int | str, "1"), (int | None, '"a"'), (typing.Any, '{"$nope":1}'), (typing.Any, '{"$tuple":1}'),
        (typing.Any, '{"$set":[[1]]}'), (typing.Any, '{"$x":1,"y":2}'), (typing.Any, "NaN"),
        (typing.Any, '{"$int":"12"}'), (float, '"nan!"'), (list[float], "[1" + "0" * 400 + "]"),
    ],
)
def test_text_that_does_not_decode_raises_decode_error_naming_the_type(type_, text):
    codec = codec_for(type_)
    with pytest.raises(DVarDecodeError, match=f"expected {codec.tag}".replace("[", r"\[").replace("|", r"\|")):
        codec.loads(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    | st.sampled_from(["nan", "0x1f", "-0x", "2020-01-01T00:00:00+01:00[Europe/Paris]", "RED", "aGk="]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3) | st.sampled_from(["$tuple", "$set", "$dict", "$int", "$float",
                                                               "$bytes", "$datetime", "$timedelta", "x", "y"]),
                      inner, max_size=2),
    max_leaves=10,
)
FUZZED_TYPES = [int, float, str, bool, bytes, Decimal, datetime, time, timedelta, uuid.UUID, Color, Perm, Point,
                Node, typing.Any, list[int], set[float], dict[str, int], dict[int, str], tuple[int, str],
                int | None, int | str, frozenset[tuple[int, ...]]]


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_text_decodes_or_raises_decode_error(obj):
    text = json.dumps(obj)
    for type_ in FUZZED_TYPES:
        codec = codec_for(type_)
        try:
            value = codec.loads(text)
        except DVarDecodeError:
            continue
        round_trip(codec, value)  # whatever decodes is a valid value of the type


def test_decode_error_says_where():
    with pytest.raises(DVarDecodeError, match=r"item \[1\] → field 'y'"):
        codec_for(list[Point]).loads('[{"x":1,"y":2},{"x":1,"y":"no"}]')


def test_missing_field_with_a_default_decodes_to_the_default():
    assert codec_for(Shape).loads('{"name":"s","points":[]}') == Shape("s", [])


# -- tags ------------------------------------------------------------------------------------------

def test_tags_are_canonical():
    assert codec_for(typing.Optional[int]).tag == codec_for(int | None).tag == "int | None"
    assert codec_for(typing.Optional[int]) == codec_for(int | None)
    assert codec_for(list[int]).tag == codec_for(typing.List[int]).tag == "list[int]"
    assert codec_for(typing.Union[str, int, None]).tag == codec_for(None | int | str).tag == "int | str | None"
    assert codec_for(dict[str, list[int | None]]).tag == "dict[str, list[int | None]]"
    assert codec_for(tuple[int, ...]).tag == "tuple[int, ...]"
    assert codec_for(tuple[int, str]).tag == "tuple[int, str]"
    assert codec_for(tuple[()]).tag == "tuple[()]"
    assert codec_for(list).tag == codec_for(list[typing.Any]).tag == "list[any]"
    assert codec_for(typing.Any | None).tag == "any"
    assert codec_for(Decimal).tag == "decimal.Decimal"
    assert codec_for(Point).tag == f"{__name__}.Point"


def test_codecs_are_cached_immutable_and_equal_by_tag():
    codec = codec_for(list[int])
    assert codec is codec_for(list[int])
    assert codec == codec_for(typing.List[int]) and hash(codec) == hash(codec_for(typing.List[int]))
    assert codec != codec_for(list[str])
    assert isinstance(codec, Codec)
    with pytest.raises(AttributeError):
        codec.tag = "list[str]"


def test_mutable_flag():
    for type_ in (list[int], dict[str, int], set[int], Point, typing.Any, tuple[list[int], ...], int | list[int],
                  FrozenPoint | list[int]):
        assert codec_for(type_).mutable, type_
    for type_ in (int, str, float, bool, bytes, Decimal, datetime, tuple[int, ...], frozenset[str], FrozenPoint,
                  Color, int | None, tuple[()], tuple[int, FrozenPoint]):
        assert not codec_for(type_).mutable, type_


@pytest.mark.parametrize(
    "type_",
    [int, float, str, bool, bytes, type(None), Decimal, datetime, date, time, timedelta, uuid.UUID, typing.Any,
     list[dict[str, Decimal]], int | None, tuple[()], tuple[int, ...], tuple[int, str | None], set[uuid.UUID],
     frozenset[bytes], dict[tuple[int, ...], list[int | str | None]], list, dict, dict[str, typing.Any]],
)
def test_codec_from_tag_rebuilds_builtin_codecs(type_):
    codec = codec_for(type_)
    rebuilt = codec_from_tag(codec.tag)
    assert rebuilt == codec and rebuilt.tag == codec.tag


def test_codec_from_tag_knows_only_classes_built_in_this_process():
    assert codec_from_tag(f"{NeverBuilt.__module__}.NeverBuilt") is None
    assert codec_from_tag(f"list[{NeverBuilt.__module__}.NeverBuilt]") is None
    codec = codec_for(dict[str, Point])
    assert codec_from_tag(codec.tag) == codec
    assert codec_from_tag(codec_for(Color).tag) == codec_for(Color)


def test_codec_from_tag_imports_nothing():
    assert "this" not in sys.modules  # importing `this` would print the Zen of Python
    assert codec_from_tag("this.Thing") is None
    assert codec_from_tag("list[this.s]") is None
    assert "this" not in sys.modules


@pytest.mark.parametrize("tag", ["", "list[", "list[int", "list[int, str]", "dict[str]", "tuple[...]",
                                 "tuple[int, ..., str]", "int |", "int]", "complex", "int[str]", "list[int] x"])
def test_codec_from_tag_rejects_malformed_tags(tag):
    assert codec_from_tag(tag) is None


# -- copies ----------------------------------------------------------------------------------------

def test_copies_are_deep_and_independent():
    nested = [[1, 2], [3]]
    copied = codec_for(list[list[int]]).copy(nested)
    copied[0].append(99)
    assert nested == [[1, 2], [3]]

    table = {"a": [1], "b": [2]}
    copied = codec_for(dict[str, list[int]]).copy(table)
    copied["a"].append(5)
    copied["c"] = []
    assert table == {"a": [1], "b": [2]}

    shape = Shape("s", [Point(1, 1)], {"t"}, Point(0, 0))
    copied = codec_for(Shape).copy(shape)
    same(shape, copied)
    copied.points[0].x = 7
    copied.tags.add("u")
    copied.anchor.y = 9
    assert shape == Shape("s", [Point(1, 1)], {"t"}, Point(0, 0))

    blob = {"k": [{"x": (1, [2])}], (1, 2): {3}}
    copied = ANY.copy(blob)
    same(blob, copied)
    copied["k"][0]["x"][1].append(3)
    copied[(1, 2)].add(4)
    assert blob == {"k": [{"x": (1, [2])}], (1, 2): {3}}


def test_immutable_values_are_shared_not_copied():
    value = (1, "a", FrozenPoint(1, 2.0))
    assert codec_for(tuple[int, str, FrozenPoint]).copy(value) is value
    frozen = FrozenPoint(1, 2.0)
    assert codec_for(FrozenPoint).copy(frozen) is frozen


def test_concurrent_first_builds_of_a_recursive_type_all_get_a_complete_codec():
    value = {"t": Tree("root", [Tree("leaf", []), Tree("b", [])])}
    start = threading.Barrier(16)
    results, errors = [], []

    def build():
        try:
            start.wait(timeout=10)
            codec = codec_for(dict[str, Tree])
            results.append(codec.loads(codec.dumps(value)))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(results) == 16
    for result in results:
        same(value, result)


# -- dependencies ----------------------------------------------------------------------------------

def test_importing_codecs_pulls_in_no_django():
    root = Path(__file__).resolve().parent.parent
    code = "import djstm.codecs, sys; assert not [m for m in sys.modules if m.split('.')[0] == 'django']"
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
