"""Channel-layer group names for change notifications.

Channels allows group names of ASCII letters, digits, ``-``, ``_`` and ``.``,
shorter than 100 characters; database identities and DVar names are arbitrary
text. So a group name is a fixed prefix plus a hash of an unambiguous encoding
of its parts: callers may rely on the name being valid for every layer, equal
for equal inputs in every process, and distinct for distinct inputs (160-bit
SHA-256 prefix; a collision would only cost a spurious wake-up).
"""

from __future__ import annotations

import hashlib
import json
import re

__all__ = ["store_group", "dvar_group"]

_VALID_GROUP = re.compile(r"[A-Za-z0-9._-]{1,99}")


def _group(kind: str, *parts: str) -> str:
    # A JSON array is an unambiguous encoding: ("a.b", "c") and ("a", "b.c")
    # differ, and ensure_ascii escapes every non-ASCII character (lone
    # surrogates included), so any str encodes without error.
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"group name parts must be str, got {type(part).__name__}: {part!r}")
    encoded = json.dumps([kind, *parts], ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return f"djstm.{kind}.{hashlib.sha256(encoded).hexdigest()[:40]}"


def store_group(database: str, store: str) -> str:
    """The group that carries every change of store ``store`` in database identity ``database``."""
    return _group("store", database, store)


def dvar_group(database: str, store: str, key: str) -> str:
    """The group that carries the changes of one DVar (``key`` is its canonical name text)."""
    return _group("dvar", database, store, key)


def _check_group(group: str) -> None:
    """Raise ``ValueError`` unless ``group`` is a name every channel layer accepts."""
    if not isinstance(group, str) or not _VALID_GROUP.fullmatch(group):
        raise ValueError(
            f"invalid channel-layer group name {group!r}: use store_group()/dvar_group(), or ASCII "
            "letters, digits, '-', '_' and '.' only, shorter than 100 characters"
        )
