"""How a DVar's declared type turns values into stored JSON text and back.

What callers may rely on
------------------------
* ``codec_for(type_, default)`` returns a :class:`Codec`. Equal types give equal codecs (equal
  means same ``tag``), and repeated calls are cheap: results are cached per type.
* ``codec.tag`` is the one canonical spelling of the type (grammar below); it is what the store
  records. ``codec_from_tag(tag)`` rebuilds the codec from it without importing anything.
* ``codec.loads(codec.dumps(v)) == v`` with the same types all the way down (a tuple inside a
  dict stays a tuple, a NaN stays a NaN, a ``Decimal`` keeps its exponent, an aware datetime
  keeps its tzinfo and ``fold``) for every supported value.
* ``dumps`` never coerces: a value that does not fit raises ``DVarTypeError`` saying where and
  what (``"item [2] is int 5, expected str"``). Circular values are refused, not recursed into.
* ``loads`` raises ``DVarDecodeError`` (with ``expected <tag>`` in the message) for text that
  does not decode as the codec's type.
* ``codec.copy(v)`` shares no mutable part with ``v``; ``codec.mutable`` says whether values can
  change in place at all (if not, ``copy`` returns ``v`` itself).
* Decoding never imports a module or runs code named by the stored data: dataclasses and Enums
  come only from the type the program declared. No pickle anywhere.

Tag grammar (``" | "`` and ``", "`` spelled with exactly those spaces)
----------------------------------------------------------------------
::

    tag  := term (" | " term)*        members sorted by tag, "None" last; "any" absorbs a union
    term := "int" | "float" | "str" | "bool" | "bytes" | "None" | "any"
          | "decimal.Decimal" | "datetime.datetime" | "datetime.date" | "datetime.time"
          | "datetime.timedelta" | "uuid.UUID" | <module>.<QualName of a dataclass or Enum>
          | "list[" tag "]" | "set[" tag "]" | "frozenset[" tag "]" | "dict[" tag ", " tag "]"
          | "tuple[" tag ", ...]" | "tuple[" tag (", " tag)* "]" | "tuple[()]"

JSON forms
----------
Typed values are compact: ``list[int]`` is a plain JSON list of numbers. Scalars that JSON lacks
are strings: ints of 2000+ bits as ``"0x…"`` hex (decimal text that long is refused by Python's
int/str limit), non-finite floats as ``"nan"``/``"inf"``/``"-inf"``, bytes as base64, Decimal as
its exact ``str``, dates and times as ISO 8601 with suffixes ``[Zone/Key]``, ``[fold=1]`` and
``[tzname=…]`` where the ISO text alone would lose them, timedelta as ``[days, seconds, µs]``,
UUID as its hex form, Enum members by name (a nameless Flag combination as a list of names),
dataclasses as an object of fields, ``dict[str, V]`` as an object and other dicts as a list of
``[key, value]`` pairs, unions other than ``X | None`` as ``{"<member tag>": value}``.

The ``any`` codec is self-describing: JSON-native values are plain JSON and everything else is a
one-key object whose key starts with ``$`` (``{"$tuple": […]}``, ``{"$set": …}``,
``{"$bytes": …}``, ``{"$dict": [[k, v], …]}``…). A dict whose keys are not all plain strings, or
any of whose keys starts with ``$``, is stored in the ``$dict`` pair form so it can never be
mistaken for a tag.
"""

from __future__ import annotations

import base64
import copy as _copymod
import dataclasses
import enum
import functools
import json
import math
import operator
import re
import reprlib
import threading
import types
import typing
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Context, Decimal
from zoneinfo import ZoneInfo

from djstm.errors import DVarDecodeError, DVarTypeError

__all__ = ["Codec", "codec_for", "codec_from_tag"]

_MISSING: typing.Any = object()
_NoneType = type(None)
# Below 640 decimal digits (the lowest int/str limit Python allows) every int is plain JSON; past
# that hex keeps the text parseable whatever sys.set_int_max_str_digits says.
_BIG = 1 << 2000
_FLOAT_SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
_DECIMAL_CONTEXT = Context()  # private, so a caller's context cannot turn bad text into NaN
_ZONE_KEY = r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*"
_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)(?::(\d\d)(?:\.(\d{6}))?)?$")
_WHEN = re.compile(r"([^\[]+)(?:\[(" + _ZONE_KEY + r")\])?(\[fold=1\])?(?:\[tzname=(.*)\])?", re.S)
_SUPPORTED = (
    "supported: int, float, str, bool, bytes, None, decimal.Decimal, datetime.datetime, "
    "datetime.date, datetime.time, datetime.timedelta, uuid.UUID, Enum subclasses, dataclasses, "
    "list[T], tuple[T, ...], tuple[A, B], dict[K, V], set[T], frozenset[T], X | None, typing.Any"
)

_encode_str = json.encoder.encode_basestring  # the C version: the str codec's whole dumps
_scan_str = json.decoder.scanstring


def _json_encoder() -> typing.Callable[[typing.Any], str]:
    slow = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                            check_circular=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return slow

    def refuse(o: typing.Any) -> typing.NoReturn:
        raise TypeError(f"{type(o).__name__} is not JSON")

    # JSONEncoder.encode builds a new C encoder per call, which costs more than encoding a short
    # list; one built here is reused (it holds no state). Checked against the slow path once.
    chunks = make(None, refuse, _encode_str, None, ":", ",", False, False, False)

    def encode(obj: typing.Any) -> str:
        return "".join(chunks(obj, 0))

    sample = [1, -2.5e-07, "é\n\"", {"a": None, "b": True}, (), 10**30]
    try:
        return encode if encode(sample) == slow(sample) else slow
    except Exception:
        return slow


_encode_json = _json_encoder()


def _reject_constant(name: str) -> typing.NoReturn:
    raise ValueError(f"{name} is not JSON")


_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 4


def _short(v: typing.Any) -> str:
    if type(v) is int and not -_BIG < v < _BIG:
        return f"<{v.bit_length()}-bit int>"  # repr() itself refuses ints this long
    try:
        return _repr.repr(v)
    except Exception:
        return f"<{_type_name(type(v))} object>"


def _type_name(t: type) -> str:
    if t is _NoneType:
        return "None"
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


_JSON_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", int: "a JSON number",
               float: "a JSON number", bool: "a JSON boolean", _NoneType: "JSON null"}


class _Bad(Exception):
    """Internal: a value (or stored item) does not fit. Containers add where, innermost first."""

    def __init__(self, detail: str, plain: bool = False) -> None:
        self.detail = detail
        self.plain = plain  # a bare type mismatch, which a union may restate with its own tag
        self.path: list[str] = []

    def at(self, where: str) -> _Bad:
        self.path.append(where)
        return self

    def message(self) -> str:
        return f"{' → '.join(reversed(self.path)) or 'value'} {self.detail}"


def _mismatch(v: typing.Any, tag: str) -> _Bad:
    hint = ""
    if type(v) is int and "float" in tag.split(" | "):
        hint = f" (write {v}.0 for a float)"
    elif isinstance(v, enum.Enum):
        hint = f" (declare the type as {_type_name(type(v))}, or store its .value)"
    return _Bad(f"is {_type_name(type(v))} {_short(v)}, expected {tag}{hint}", plain=True)


def _not_json(o: typing.Any, tag: str) -> _Bad:
    return _Bad(f"is {_JSON_KINDS.get(type(o), type(o).__name__)} {_short(o)}, expected {tag}", plain=True)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _lone_surrogate(s: str) -> _Bad:
    m = re.search("[\ud800-\udfff]", s)
    at = f" {m.group()!r} at index {m.start()}" if m else ""
    return _Bad(f"is a str holding a lone surrogate{at}, which is not valid UTF-8 text and cannot be stored")


def _map_items(fn: typing.Callable, items: typing.Iterable, label: str | None = None) -> list:
    try:
        return [fn(x) for x in items]
    except _Bad as first:
        # Only on failure: run again one by one to say which item it was.
        for i, x in enumerate(items):
            try:
                fn(x)
            except _Bad as e:
                raise e.at(label or f"item [{i}]") from None
        raise first


# Whether a sequence of items is already JSON of one scalar type, checked at C speed, so a
# list[int] etc. goes to the JSON encoder as is instead of item by item through _enc.
def _native_ints(items: typing.Sequence) -> bool:
    return set(map(type, items)) <= {int} and (not items or (-_BIG < min(items) and max(items) < _BIG))


def _native_strs(items: typing.Sequence) -> bool:
    return set(map(type, items)) <= {str} and all(map(str.isascii, items))  # ASCII: no surrogates


def _native_floats(items: typing.Sequence) -> bool:
    return set(map(type, items)) <= {float} and all(map(math.isfinite, items))


def _native_bools(items: typing.Sequence) -> bool:
    return set(map(type, items)) <= {bool}


def _ordered(s: set | frozenset) -> list:
    try:
        return sorted(s)
    except (TypeError, ArithmeticError):  # mixed types, Decimal NaN: keep iteration order
        return list(s)


# -- leaf types that JSON lacks: encoder to a JSON-able value, decoder back ---------------------

def _tz_suffixes(tz: typing.Any, zone_ok: bool) -> tuple[str, str]:
    """The ``[Zone/Key]`` and ``[tzname=…]`` parts that the ISO offset alone would lose."""
    if type(tz) is timezone:
        name = tz.tzname(None)
        default = timezone(tz.utcoffset(None)).tzname(None)
        return "", ("" if name == default else f"[tzname={name}]")
    if zone_ok and type(tz) is ZoneInfo and tz.key is not None and re.fullmatch(_ZONE_KEY, tz.key):
        return f"[{tz.key}]", ""
    need = "zoneinfo.ZoneInfo (by key) or datetime.timezone"
    if not zone_ok:
        need = "datetime.timezone (a time of day needs a fixed offset)"
    raise _Bad(f"has tzinfo {_type_name(type(tz))} {_short(tz)}, which cannot be stored: use {need}")


def _enc_when(v: datetime | time) -> str:
    zone, name = ("", "") if v.tzinfo is None else _tz_suffixes(v.tzinfo, type(v) is datetime)
    return v.isoformat() + zone + ("[fold=1]" if v.fold else "") + name


def _dec_when(o: typing.Any, cls: type) -> typing.Any:
    m = _WHEN.fullmatch(o) if type(o) is str else None
    if m is None:
        raise ValueError("not an ISO 8601 text")
    iso, zone, fold, name = m.groups()
    # The offset is parsed here, not by fromisoformat: Python 3.11 reads "+00:00:00.000001" as UTC.
    offset = _OFFSET.search(iso)
    v = cls.fromisoformat(iso[:offset.start()] if offset else iso)
    if v.tzinfo is not None or ((zone or name is not None) and offset is None):
        raise ValueError("a malformed UTC offset")
    if zone:
        if cls is not datetime:
            raise ValueError("a time of day cannot carry a zone")
        v = v.replace(tzinfo=ZoneInfo(zone))  # reads tz data for this key; imports nothing it names
    elif offset:
        sign, h, mi, sec, us = offset.groups()
        delta = timedelta(hours=int(h), minutes=int(mi), seconds=int(sec or 0), microseconds=int(us or 0))
        delta = -delta if sign == "-" else delta
        v = v.replace(tzinfo=timezone(delta) if name is None else timezone(delta, name))
    return v.replace(fold=1) if fold else v


def _dec_str_as(conv: typing.Callable) -> typing.Callable:
    def dec(o: typing.Any) -> typing.Any:
        if type(o) is not str:
            raise ValueError("not a JSON string")
        return conv(o)
    return dec


def _dec_timedelta(o: typing.Any) -> timedelta:
    if type(o) is not list or len(o) != 3 or any(type(x) is not int for x in o):
        raise ValueError("not [days, seconds, microseconds]")
    return timedelta(days=o[0], seconds=o[1], microseconds=o[2])


# tag, type, key in `any` values, encoder, decoder
_LEAF_SPECS: list[tuple[str, type, str, typing.Callable, typing.Callable]] = [
    ("bytes", bytes, "$bytes", lambda v: base64.b64encode(v).decode("ascii"),
     _dec_str_as(lambda s: base64.b64decode(s.encode("ascii"), validate=True))),
    ("decimal.Decimal", Decimal, "$decimal", str, _dec_str_as(lambda s: Decimal(s, _DECIMAL_CONTEXT))),
    ("datetime.datetime", datetime, "$datetime", _enc_when, lambda o: _dec_when(o, datetime)),
    ("datetime.date", date, "$date", date.isoformat, _dec_str_as(date.fromisoformat)),
    ("datetime.time", time, "$time", _enc_when, lambda o: _dec_when(o, time)),
    ("datetime.timedelta", timedelta, "$timedelta", lambda v: [v.days, v.seconds, v.microseconds],
     _dec_timedelta),
    ("uuid.UUID", uuid.UUID, "$uuid", str, _dec_str_as(uuid.UUID)),
]
_DECODE_FAILURES = (ValueError, TypeError, KeyError, ArithmeticError, UnicodeError)


def _leaf_dec(dec: typing.Callable, o: typing.Any, tag: str) -> typing.Any:
    try:
        return dec(o)
    except _DECODE_FAILURES as e:
        raise _Bad(f"is {_JSON_KINDS.get(type(o), 'JSON')} {_short(o)}, expected {tag} ({e})") from None


def _dec_int(o: typing.Any) -> int:
    if type(o) is int:
        return o
    if type(o) is str and o.startswith(("0x", "-0x")):
        try:
            return int(o, 16)
        except ValueError:
            pass
    raise _not_json(o, "int")


def _dec_float(o: typing.Any) -> float:
    if type(o) is float:
        return o
    if type(o) is int:  # JSON writers elsewhere may drop the ".0"
        try:
            return float(o)
        except OverflowError:
            pass
    if type(o) is str and o in _FLOAT_SPECIAL:
        return _FLOAT_SPECIAL[o]
    raise _not_json(o, "float")


def _float_special(v: float) -> str:
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


# -- the untyped ("any") codec's walkers ---------------------------------------------------------

_ANY_ENCODERS = {t: (key, enc) for _, t, key, enc, _ in _LEAF_SPECS}
_ANY_DECODERS = {key: (tag, dec) for tag, _, key, _, dec in _LEAF_SPECS}


def _any_enc(v: typing.Any) -> typing.Any:
    t = type(v)
    if t is str:
        if v.isascii() or _utf8_ok(v):
            return v
        raise _lone_surrogate(v)
    if t is int:
        return v if -_BIG < v < _BIG else {"$int": hex(v)}
    if t is float:
        return v if v - v == 0.0 else {"$float": _float_special(v)}
    if v is None or t is bool:
        return v
    if t is list:
        return _map_items(_any_enc, v)
    if t is dict:
        return _any_enc_dict(v)
    if t is tuple:
        return {"$tuple": _map_items(_any_enc, v)}
    if t is set or t is frozenset:
        return {"$" + t.__name__: _map_items(_any_enc, _ordered(v), "an element")}
    leaf = _ANY_ENCODERS.get(t)
    if leaf is not None:
        return {leaf[0]: leaf[1](v)}
    if isinstance(v, enum.Enum) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
        kind = "Enum members" if isinstance(v, enum.Enum) else "dataclass instances"
        raise _Bad(f"is {_type_name(t)} {_short(v)}; an untyped (any) value cannot hold {kind}, which "
                   f"cannot be decoded without their class: declare the type, e.g. type=list[{t.__name__}]")
    raise _Bad(f"is {_type_name(t)} {_short(v)}, which cannot be stored; {_SUPPORTED}")


def _any_enc_dict(v: dict) -> typing.Any:
    if all(type(k) is str and not k.startswith("$") for k in v):
        out = {}
        for k, x in v.items():
            if not (k.isascii() or _utf8_ok(k)):
                raise _lone_surrogate(k).at("a key")
            try:
                out[k] = _any_enc(x)
            except _Bad as e:
                raise e.at(f"key {_short(k)}")
        return out
    pairs = []
    for k, x in v.items():
        try:
            ek = _any_enc(k)
        except _Bad as e:
            raise e.at("a key")
        try:
            pairs.append([ek, _any_enc(x)])
        except _Bad as e:
            raise e.at(f"key {_short(k)}")
    return {"$dict": pairs}


def _any_dec(o: typing.Any) -> typing.Any:
    t = type(o)
    if t is list:
        return _map_items(_any_dec, o)
    if t is dict:
        if len(o) == 1:
            key = next(iter(o))
            if key.startswith("$"):
                return _any_dec_tagged(key, o[key])
        out = {}
        for k, x in o.items():
            if k.startswith("$"):
                raise _Bad(f"is a JSON object mixing the tag key {k!r} with other keys")
            try:
                out[k] = _any_dec(x)
            except _Bad as e:
                raise e.at(f"key {_short(k)}")
        return out
    return o


def _any_dec_tagged(key: str, p: typing.Any) -> typing.Any:
    try:
        if key in ("$tuple", "$set", "$frozenset"):
            if type(p) is not list:
                raise _not_json(p, "a list under " + key)
            items = _map_items(_any_dec, p)
            return {"$tuple": tuple, "$set": set, "$frozenset": frozenset}[key](items)
        if key == "$dict":
            if type(p) is not list or any(type(kv) is not list or len(kv) != 2 for kv in p):
                raise _not_json(p, "a list of [key, value] pairs under $dict")
            return {_any_dec(k): _any_dec(x) for k, x in p}
        if key == "$int":
            return _dec_int(p)
        if key == "$float":
            if type(p) is str and p in _FLOAT_SPECIAL:
                return _FLOAT_SPECIAL[p]
            raise _not_json(p, '"nan", "inf" or "-inf" under $float')
    except TypeError as e:  # a list or dict where a set element or dict key must be hashable
        raise _Bad(f"holds an unhashable item under {key} ({e})") from None
    leaf = _ANY_DECODERS.get(key)
    if leaf is None:
        raise _Bad(f"is a JSON object with the unknown tag key {key!r}")
    return _leaf_dec(leaf[1], p, leaf[0])


def _any_copy(v: typing.Any) -> typing.Any:
    t = type(v)
    if t is list:
        return [_any_copy(x) for x in v]
    if t is dict:
        return {k: _any_copy(x) for k, x in v.items()}  # keys are hashable, hence not mutable
    if t is set:
        return set(v)
    if t is tuple:
        return tuple(_any_copy(x) for x in v)
    if t in _IMMUTABLE_TYPES or t is frozenset:
        return v
    return _copymod.deepcopy(v)  # not storable anyway; still give an independent copy


def _find_cycle(root: typing.Any) -> str | None:
    """Where ``root`` contains one of its own enclosing containers, e.g. ``item [0] → key 'a'``."""

    def children(v: typing.Any) -> list[tuple[str, typing.Any]]:
        t = type(v)
        if t is list or t is tuple:
            return [(f"item [{i}]", x) for i, x in enumerate(v)]
        if t is dict:
            return [p for k, x in v.items() for p in (("a key", k), (f"key {_short(k)}", x))]
        if t is set or t is frozenset:
            return [("an element", x) for x in v]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return [(f"field {f.name!r}", getattr(v, f.name, None)) for f in dataclasses.fields(v)]
        return []

    on_path, labels, done = [id(root)], [], set()
    stack = [iter(children(root))]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            done.add(on_path.pop())
            if labels:
                labels.pop()
            continue
        label, child = step
        if id(child) in on_path:
            return " → ".join(labels + [label])
        kids = children(child) if id(child) not in done else []
        if kids:
            stack.append(iter(kids))
            on_path.append(id(child))
            labels.append(label)
    return None


def _too_deep(value: typing.Any) -> DVarTypeError:
    where = _find_cycle(value)
    if where is not None:
        return DVarTypeError(f"{where} refers back to a container that encloses it (a circular "
                             "structure); stored values must be trees")
    return DVarTypeError("value is nested too deeply to store")


# -- codecs --------------------------------------------------------------------------------------

class Codec:
    """Validates, encodes, decodes and copies the values of one type; see the module docstring."""

    __slots__ = ("tag", "mutable")
    tag: str
    mutable: bool
    _native: typing.Callable[[typing.Sequence], bool] | None = None

    def __init__(self, tag: str, mutable: bool, **extra: typing.Any) -> None:
        object.__setattr__(self, "tag", tag)
        object.__setattr__(self, "mutable", mutable)
        for name, value in extra.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: typing.Any) -> None:
        raise AttributeError("Codec objects are immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.tag == self.tag

    def __hash__(self) -> int:
        return hash(self.tag)

    def __repr__(self) -> str:
        return f"<Codec {self.tag}>"

    def dumps(self, value: typing.Any) -> str:
        """Compact JSON text for ``value``; ``DVarTypeError`` if it does not fit this type."""
        try:
            obj = self._enc(value)
        except _Bad as e:
            context = f" (in a value of type {self.tag})" if e.path else ""
            raise DVarTypeError(e.message() + context) from None
        except RecursionError:
            raise _too_deep(value) from None
        try:
            return _encode_json(obj)
        except RecursionError:
            raise DVarTypeError("value is nested too deeply to store") from None

    def loads(self, text: str) -> typing.Any:
        """The value stored as ``text``; ``DVarDecodeError`` if it is not a ``tag`` value."""
        try:
            obj = _decode_json(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise DVarDecodeError(f"stored text {_short(text)} is not valid JSON "
                                  f"(expected {self.tag}): {e}") from None
        try:
            return self._dec(obj)
        except _Bad as e:
            raise DVarDecodeError(f"stored text {_short(text)} does not decode (expected "
                                  f"{self.tag}): {e.message()}") from None
        except RecursionError:
            raise DVarDecodeError(f"stored text {_short(text)} is nested too deeply "
                                  f"(expected {self.tag})") from None

    def copy(self, value: typing.Any) -> typing.Any:
        """An independent deep copy (``value`` itself when values of this type cannot change)."""
        return value

    def _enc(self, v: typing.Any) -> typing.Any:  # value -> JSON-able object, or raise _Bad
        raise NotImplementedError

    def _dec(self, o: typing.Any) -> typing.Any:  # JSON-decoded object -> value, or raise _Bad
        raise NotImplementedError


class _NoneCodec(Codec):
    __slots__ = ()

    def _enc(self, v: typing.Any) -> None:
        if v is not None:
            raise _mismatch(v, "None")

    def _dec(self, o: typing.Any) -> None:
        if o is not None:
            raise _not_json(o, "None")


class _BoolCodec(Codec):
    __slots__ = ()
    _native = staticmethod(_native_bools)

    def dumps(self, value: typing.Any) -> str:
        if value is True:
            return "true"
        if value is False:
            return "false"
        return Codec.dumps(self, value)

    def loads(self, text: str) -> bool:
        if text == "true":
            return True
        if text == "false":
            return False
        return Codec.loads(self, text)

    def _enc(self, v: typing.Any) -> bool:
        if type(v) is not bool:
            raise _mismatch(v, "bool")
        return v

    def _dec(self, o: typing.Any) -> bool:
        if type(o) is not bool:
            raise _not_json(o, "bool")
        return o


class _IntCodec(Codec):
    __slots__ = ()
    _native = staticmethod(_native_ints)

    def dumps(self, value: typing.Any) -> str:
        if type(value) is int and -_BIG < value < _BIG:
            return str(value)
        return Codec.dumps(self, value)  # huge (hex) or wrong type

    def loads(self, text: str) -> int:
        try:
            return int(text)
        except (ValueError, TypeError):
            return Codec.loads(self, text)  # the hex form, or an error naming the tag

    def _enc(self, v: typing.Any) -> int | str:
        if type(v) is not int:
            raise _mismatch(v, "int")
        return v if -_BIG < v < _BIG else hex(v)

    _dec = staticmethod(_dec_int)


class _FloatCodec(Codec):
    __slots__ = ()
    _native = staticmethod(_native_floats)

    def dumps(self, value: typing.Any) -> str:
        if type(value) is float:
            text = repr(value)
            if text[-1] not in "nf":  # "nan", "inf", "-inf" are not JSON
                return text
        return Codec.dumps(self, value)

    def loads(self, text: str) -> float:
        if not text.startswith('"'):
            try:
                return float(text)
            except (ValueError, TypeError):
                pass
        return Codec.loads(self, text)

    def _enc(self, v: typing.Any) -> float | str:
        if type(v) is not float:
            raise _mismatch(v, "float")
        return v if v - v == 0.0 else _float_special(v)

    _dec = staticmethod(_dec_float)


class _StrCodec(Codec):
    __slots__ = ()
    _native = staticmethod(_native_strs)

    def dumps(self, value: typing.Any) -> str:
        if type(value) is str and (value.isascii() or _utf8_ok(value)):
            return _encode_str(value)
        return Codec.dumps(self, value)

    def loads(self, text: str) -> str:
        if text.startswith('"'):
            try:
                s, end = _scan_str(text, 1)
                if end == len(text):
                    return s
            except ValueError:
                pass
        return Codec.loads(self, text)

    def _enc(self, v: typing.Any) -> str:
        if type(v) is not str:
            raise _mismatch(v, "str")
        if not (v.isascii() or _utf8_ok(v)):
            raise _lone_surrogate(v)
        return v

    def _dec(self, o: typing.Any) -> str:
        if type(o) is not str:
            raise _not_json(o, "str")
        return o


class _LeafCodec(Codec):
    __slots__ = ("_type", "_to", "_from")

    def _enc(self, v: typing.Any) -> typing.Any:
        if type(v) is not self._type:
            raise _mismatch(v, self.tag)
        return self._to(v)

    def _dec(self, o: typing.Any) -> typing.Any:
        return _leaf_dec(self._from, o, self.tag)


class _AnyCodec(Codec):
    __slots__ = ()
    _enc = staticmethod(_any_enc)
    _dec = staticmethod(_any_dec)

    def copy(self, value: typing.Any) -> typing.Any:
        return _any_copy(value)


class _SeqCodec(Codec):
    """list[T], set[T], frozenset[T] and tuple[T, ...]: a JSON list of T."""

    __slots__ = ("_kind", "_item")

    def _enc(self, v: typing.Any) -> typing.Any:
        if type(v) is not self._kind:
            raise _mismatch(v, self.tag)
        unordered = self._kind is set or self._kind is frozenset
        items = _ordered(v) if unordered else v
        native = self._item._native
        if native is not None and native(items):
            return items  # the encoder only reads it
        return _map_items(self._item._enc, items, "an element" if unordered else None)

    def _dec(self, o: typing.Any) -> typing.Any:
        if type(o) is not list:
            raise _not_json(o, self.tag)
        native = self._item._native
        items = o if native is not None and native(o) else _map_items(self._item._dec, o)
        if self._kind is list:
            return items
        try:
            return self._kind(items)
        except TypeError as e:
            raise _Bad(f"holds an unhashable element ({e})") from None

    def copy(self, value: typing.Any) -> typing.Any:
        if not self._item.mutable:
            return value if self._kind in (tuple, frozenset) else self._kind(value)
        return self._kind([self._item.copy(x) for x in value])


class _TupleCodec(Codec):
    """tuple[A, B, …] of a fixed length: a JSON list."""

    __slots__ = ("_items",)

    def _enc(self, v: typing.Any) -> list:
        if type(v) is not tuple:
            raise _mismatch(v, self.tag)
        if len(v) != len(self._items):
            raise _Bad(f"is a tuple of {len(v)} items {_short(v)}, expected {self.tag}", plain=True)
        out = []
        for i, (codec, x) in enumerate(zip(self._items, v)):
            try:
                out.append(codec._enc(x))
            except _Bad as e:
                raise e.at(f"item [{i}]")
        return out

    def _dec(self, o: typing.Any) -> tuple:
        if type(o) is not list or len(o) != len(self._items):
            raise _not_json(o, self.tag)
        out = []
        for i, (codec, x) in enumerate(zip(self._items, o)):
            try:
                out.append(codec._dec(x))
            except _Bad as e:
                raise e.at(f"item [{i}]")
        return tuple(out)

    def copy(self, value: typing.Any) -> typing.Any:
        if not self.mutable:
            return value
        return tuple(c.copy(x) for c, x in zip(self._items, value))


class _DictCodec(Codec):
    """dict[str, V] as a JSON object; dict[K, V] for other K as a list of [key, value] pairs."""

    __slots__ = ("_key", "_val", "_str_keys")

    def _enc(self, v: typing.Any) -> typing.Any:
        if type(v) is not dict:
            raise _mismatch(v, self.tag)
        kenc, venc = self._key._enc, self._val._enc
        out: typing.Any = {} if self._str_keys else []
        for k, x in v.items():
            try:
                ek = kenc(k)
            except _Bad as e:
                raise e.at("a key")
            try:
                ex = venc(x)
            except _Bad as e:
                raise e.at(f"key {_short(k)}")
            if self._str_keys:
                out[ek] = ex
            else:
                out.append([ek, ex])
        return out

    def _dec(self, o: typing.Any) -> dict:
        kdec, vdec = self._key._dec, self._val._dec
        if self._str_keys:
            if type(o) is not dict:
                raise _not_json(o, self.tag)
            pairs: typing.Iterable = o.items()
        else:
            if type(o) is not list or any(type(kv) is not list or len(kv) != 2 for kv in o):
                raise _not_json(o, self.tag + " (a list of [key, value] pairs)")
            pairs = o
        out = {}
        for k, x in pairs:
            try:
                k = kdec(k)
            except _Bad as e:
                raise e.at("a key")
            try:
                out[k] = vdec(x)
            except _Bad as e:
                raise e.at(f"key {_short(k)}")
            except TypeError as e:
                raise _Bad(f"is an unhashable key ({e})").at("a key") from None
        return out

    def copy(self, value: typing.Any) -> typing.Any:
        if not self._val.mutable:
            return dict(value)
        vcopy = self._val.copy
        return {k: vcopy(x) for k, x in value.items()}


class _OptionalCodec(Codec):
    """X | None: null, or X's own form (which is never null)."""

    __slots__ = ("_inner",)

    def _enc(self, v: typing.Any) -> typing.Any:
        if v is None:
            return None
        try:
            return self._inner._enc(v)
        except _Bad as e:
            if e.plain and not e.path:
                raise _mismatch(v, self.tag) from None
            raise

    def _dec(self, o: typing.Any) -> typing.Any:
        return None if o is None else self._inner._dec(o)

    def copy(self, value: typing.Any) -> typing.Any:
        return None if value is None else self._inner.copy(value)


class _UnionCodec(Codec):
    """A | B (| None): ``{"<member tag>": value}`` so decoding never has to guess; None is null."""

    __slots__ = ("_members", "_by_tag", "_none")

    def _enc(self, v: typing.Any) -> typing.Any:
        if v is None and self._none:
            return None
        specific = None  # the first error about v's insides rather than its type
        for m in self._members:
            try:
                return {m.tag: m._enc(v)}
            except _Bad as e:
                if specific is None and not (e.plain and not e.path):
                    specific = e
        raise specific or _mismatch(v, self.tag)

    def _dec(self, o: typing.Any) -> typing.Any:
        if o is None and self._none:
            return None
        if type(o) is dict and len(o) == 1:
            key = next(iter(o))
            if key in self._by_tag:
                return self._by_tag[key]._dec(o[key])
        raise _not_json(o, self.tag)

    def copy(self, value: typing.Any) -> typing.Any:
        for m in self._members:
            try:
                m._enc(value)  # only picks the member; copies are of stored values, which fit
            except _Bad:
                continue
            return m.copy(value)
        return _copymod.deepcopy(value)


class _EnumCodec(Codec):
    __slots__ = ("_cls",)

    def _enc(self, v: typing.Any) -> typing.Any:
        if type(v) is not self._cls:
            raise _mismatch(v, self.tag)
        if self._cls.__members__.get(v._name_) is v:
            return v._name_
        return [m._name_ for m in self._cls if m in v]  # a Flag combination without a name

    def _dec(self, o: typing.Any) -> typing.Any:
        members = self._cls.__members__
        try:
            if type(o) is str:
                return members[o]
            if type(o) is list and issubclass(self._cls, enum.Flag):
                return functools.reduce(operator.or_, (members[n] for n in o), self._cls(0))
        except (KeyError, TypeError):
            pass
        raise _Bad(f"is {_JSON_KINDS.get(type(o), 'JSON')} {_short(o)}, which names no member of {self.tag}")


class _DataclassCodec(Codec):
    """A JSON object of fields. Decoding restores the fields without calling __init__ or
    __post_init__, as copy and pickle do, so the instance is exactly the one that was stored."""

    __slots__ = ("_cls", "_fields", "_defaults")

    def _enc(self, v: typing.Any) -> dict:
        if type(v) is not self._cls:
            raise _mismatch(v, self.tag)
        out = {}
        for name, codec in self._fields:
            try:
                out[name] = codec._enc(getattr(v, name))
            except _Bad as e:
                raise e.at(f"field {name!r}")
        return out

    def _dec(self, o: typing.Any) -> typing.Any:
        if type(o) is not dict:
            raise _not_json(o, self.tag)
        extra = o.keys() - {name for name, _ in self._fields}
        if extra:
            raise _Bad(f"has fields {sorted(extra)} that {self.tag} does not declare")
        inst = object.__new__(self._cls)
        for name, codec in self._fields:
            if name in o:
                try:
                    val = codec._dec(o[name])
                except _Bad as e:
                    raise e.at(f"field {name!r}")
            elif name in self._defaults:  # a field added since the row was written
                val = self._defaults[name]()
            else:
                raise _Bad(f"lacks the field {name!r} of {self.tag}")
            object.__setattr__(inst, name, val)
        return inst

    def copy(self, value: typing.Any) -> typing.Any:
        if not self.mutable:
            return value
        inst = object.__new__(self._cls)
        for name, codec in self._fields:
            object.__setattr__(inst, name, codec.copy(getattr(value, name)))
        return inst


# -- resolving a type to a codec -----------------------------------------------------------------

_NONE = _NoneCodec("None", False)
_ANY = _AnyCodec("any", True)
_LEAVES: dict[typing.Any, Codec] = {
    _NoneType: _NONE,
    bool: _BoolCodec("bool", False),
    int: _IntCodec("int", False),
    float: _FloatCodec("float", False),
    str: _StrCodec("str", False),
    **{t: _LeafCodec(tag, False, _type=t, _to=enc, _from=dec) for tag, t, _, enc, dec in _LEAF_SPECS},
}
_IMMUTABLE_TYPES = frozenset(_LEAVES)
_BARE_TYPING = {typing.List: list, typing.Dict: dict, typing.Tuple: tuple, typing.Set: set,
                typing.FrozenSet: frozenset}
_CONTAINERS = (list, dict, tuple, set, frozenset)

_CACHE: dict[typing.Any, Codec] = {}  # type -> codec; only complete codecs, so lookups need no lock
_CLASSES: dict[str, type] = {}  # tag -> dataclass/Enum class whose codec was built here
_TAG_CACHE: dict[str, Codec] = {}
_LOCK = threading.RLock()


def _unsupported(tp: typing.Any) -> DVarTypeError:
    return DVarTypeError(f"type {tp!r} is not supported; {_SUPPORTED}")


def _lookup(table: dict, tp: typing.Any) -> Codec | None:
    try:
        return table.get(tp)
    except TypeError:  # an unhashable type form: build it each time
        return None


def _resolve(tp: typing.Any, local: dict) -> Codec:
    """The codec for ``tp``; ``local`` holds codecs built (or being built) in this call."""
    found = _lookup(_CACHE, tp) or _lookup(local, tp)
    if found is not None:
        return found
    codec = _build(tp, local)
    try:
        local[tp] = codec
    except TypeError:
        pass
    return codec


def _build(tp: typing.Any, local: dict) -> Codec:
    if tp is typing.Any:
        return _ANY
    if tp is None:  # as typing writes NoneType inside tuple[int, None]
        return _NONE
    leaf = _lookup(_LEAVES, tp)
    if leaf is not None:
        return leaf
    try:
        tp = _BARE_TYPING.get(tp, tp)
    except TypeError:
        pass
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_resolve(a, local) for a in args])
    if tp in _CONTAINERS:
        origin, args = tp, ()
    if origin in _CONTAINERS:
        if origin is tuple:
            if tp is tuple:
                args = (typing.Any, ...)
            elif not args:  # tuple[()]: only the empty tuple
                return _TupleCodec("tuple[()]", False, _items=())
            if len(args) == 2 and args[1] is Ellipsis:
                item = _resolve(args[0], local)
                return _SeqCodec(f"tuple[{item.tag}, ...]", item.mutable, _kind=tuple, _item=item)
            items = tuple(_resolve(a, local) for a in args)
            return _TupleCodec(f"tuple[{', '.join(c.tag for c in items)}]",
                               any(c.mutable for c in items), _items=items)
        if origin is dict:
            key, val = (_resolve(a, local) for a in (args or (typing.Any, typing.Any)))
            return _DictCodec(f"dict[{key.tag}, {val.tag}]", True, _key=key, _val=val,
                              _str_keys=key.tag == "str")
        (item,) = (_resolve(a, local) for a in (args or (typing.Any,)))
        mutable = origin is not frozenset or item.mutable
        return _SeqCodec(f"{origin.__name__}[{item.tag}]", mutable, _kind=origin, _item=item)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _EnumCodec(_type_name(tp), False, _cls=tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, local)
    raise _unsupported(tp)


def _union(members: list[Codec]) -> Codec:
    if _ANY in members:
        return _ANY  # any already holds every member, None included
    none = _NONE in members
    rest = sorted({m.tag: m for m in members if m is not _NONE}.values(), key=lambda m: m.tag)
    if not rest:
        return _NONE
    if len(rest) == 1 and none:
        return _OptionalCodec(f"{rest[0].tag} | None", rest[0].mutable, _inner=rest[0])
    tag = " | ".join([m.tag for m in rest] + (["None"] if none else []))
    return _UnionCodec(tag, any(m.mutable for m in rest), _members=tuple(rest),
                       _by_tag={m.tag: m for m in rest}, _none=none)


def _dataclass(cls: type, local: dict) -> Codec:
    codec = _DataclassCodec(_type_name(cls), True, _cls=cls, _fields=(), _defaults={})
    local[cls] = codec  # registered before its fields so a recursive field finds it
    try:
        hints = typing.get_type_hints(cls, localns={cls.__name__: cls})
    except Exception as e:
        raise DVarTypeError(f"cannot resolve the field annotations of {codec.tag}: {e!r}") from None
    fields, defaults = [], {}
    for f in dataclasses.fields(cls):
        try:
            fields.append((f.name, _resolve(hints[f.name], local)))
        except DVarTypeError as e:
            raise DVarTypeError(f"field {f.name!r} of {codec.tag}: {e}") from None
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = functools.partial(lambda d: d, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory
    frozen = cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    mutable = not frozen or any(c.mutable for _, c in fields)
    for name, value in (("_fields", tuple(fields)), ("_defaults", defaults), ("mutable", mutable)):
        object.__setattr__(codec, name, value)  # still private to this call: safe to finish
    return codec


def _commit(local: dict) -> None:
    for tp, codec in local.items():
        _CACHE[tp] = codec
        if isinstance(codec, (_EnumCodec, _DataclassCodec)):
            _CLASSES[codec.tag] = codec._cls


def _codec_for_type(tp: typing.Any) -> Codec:
    found = _lookup(_CACHE, tp)
    if found is not None:
        return found
    with _LOCK:
        local: dict = {}
        codec = _resolve(tp, local)
        _commit(local)  # only after everything resolved, so no one sees a half-built codec
    return codec


def _infer(default: typing.Any) -> type:
    t = type(default)
    if t in _LEAVES or t in _CONTAINERS or isinstance(default, enum.Enum):
        return t
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return t
    raise DVarTypeError(f"cannot store a default of type {_type_name(t)} ({_short(default)}); "
                        f"{_SUPPORTED}")


def codec_for(type_: typing.Any = None, default: typing.Any = _MISSING) -> Codec:
    """The codec for ``type_``, or for the type of ``default`` if no type is given.

    A default given with a type must fit it. Raises ``DVarTypeError`` for unsupported types,
    for a default that does not fit, and when neither a type nor a usable default is given.
    """
    if type_ is None:
        if default is _MISSING:
            raise DVarTypeError("cannot tell the type of the DVar: pass a default or type=, "
                                "e.g. type=list[int]")
        if default is None:
            raise DVarTypeError("a default of None does not tell the type; pass type=, "
                                "e.g. type=int | None")
        type_ = _infer(default)
    codec = _codec_for_type(type_)
    if default is not _MISSING:
        try:
            codec._enc(default)
        except _Bad as e:
            raise DVarTypeError(f"the default does not fit {codec.tag}: {e.message()}") from None
        except RecursionError:
            raise _too_deep(default) from None
    return codec


# -- tags back to codecs ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(\.\.\.|\(\)|[\[\],|]|[^\s\[\],|]+)")
_NAMED: dict[str, typing.Any] = {
    "any": typing.Any, "None": _NoneType, "list": list, "set": set, "frozenset": frozenset,
    "dict": dict, "tuple": tuple, **{c.tag: t for t, c in _LEAVES.items() if t is not _NoneType},
}


class _NoTag(Exception):
    """Internal: the text is not a tag, or names a class this process does not know."""


def _parse_tag(tag: str) -> typing.Any:
    tokens, pos, end = [], 0, len(tag.rstrip())
    while pos < end:
        m = _TOKEN.match(tag, pos)
        if m is None:
            raise _NoTag
        tokens.append(m.group(1))
        pos = m.end()
    tokens.append("")  # end marker
    at = 0

    def take(expected: str | None = None) -> str:
        nonlocal at
        tok = tokens[at]
        if tok == "" or (expected is not None and tok != expected):
            raise _NoTag
        at += 1
        return tok

    def union() -> typing.Any:
        terms = [term()]
        while tokens[at] == "|":
            take("|")
            terms.append(term())
        return typing.Union[tuple(terms)] if len(terms) > 1 else terms[0]

    def term() -> typing.Any:
        name = take()
        if name in ("[", "]", ",", "|", "...", "()"):
            raise _NoTag
        tp = _NAMED.get(name) or _CLASSES.get(name)
        if tp is None:
            raise _NoTag  # a class not built in this process: never import it
        if tokens[at] != "[":
            return tp
        if tp not in _CONTAINERS:
            raise _NoTag
        take("[")
        if tp is tuple and tokens[at] == "()":
            take("()")
            take("]")
            return tuple[()]
        args = [union()]
        while tokens[at] == ",":
            take(",")
            args.append(Ellipsis if tokens[at] == "..." and take("...") else union())
        take("]")
        if Ellipsis in args[:-1] or (Ellipsis in args and (tp is not tuple or len(args) != 2)):
            raise _NoTag
        if len(args) != {list: 1, set: 1, frozenset: 1, dict: 2}.get(tp, len(args)):
            raise _NoTag
        return tp[tuple(args)] if len(args) > 1 else tp[args[0]]

    result = union()
    if tokens[at] != "":
        raise _NoTag
    return result


def codec_from_tag(tag: str) -> Codec | None:
    """The codec a stored ``tag`` names, or None if it names a class no ``codec_for`` call has
    built in this process (or is not a tag at all). Imports nothing. The result's ``tag`` is the
    canonical spelling, which equals ``tag`` for every tag this module wrote."""
    found = _TAG_CACHE.get(tag)
    if found is not None:
        return found
    try:
        codec = _codec_for_type(_parse_tag(tag))
    except (_NoTag, DVarTypeError, TypeError, RecursionError):
        return None
    _TAG_CACHE[tag] = codec
    return codec
