"""DVar and store names: validation and the one canonical text of each name.

A DVar name is a non-empty ``str`` or a non-empty tuple of ``str``/``int``
parts. Its canonical text is what the store keeps in the ``name`` column, and
sorting canonical texts gives the global lock order. A plain name is kept
verbatim; a structured name is a compact JSON array (``["quota","uploads"]``),
which is why a plain name may not begin with ``[``. Two different names never
share a canonical text, and :func:`parse_name` inverts :func:`canonical_name`.
"""

from __future__ import annotations

import json
import unicodedata

from .errors import InvalidName

__all__ = ["MAX_NAME_CHARS", "MAX_STORE_NAME_CHARS", "Name", "canonical_name", "parse_name", "check_store_name"]

#: Longest canonical name, in characters; keeps every name indexable by PostgreSQL.
MAX_NAME_CHARS = 500
#: Longest store name, in characters. With the longest DVar name, four bytes a character, the pair still
#: fits in one entry of PostgreSQL's (store, name) index.
MAX_STORE_NAME_CHARS = 100

Name = str | tuple[str | int, ...]


def _reject_control_characters(text: str, what: str) -> None:
    for position, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidName(
                f"{what} {text!r} has a control character {char!r} at position {position}; "
                "names must be printable text"
            )


def canonical_name(name: Name) -> str:
    """Return the canonical text of ``name``, or raise :class:`InvalidName` saying what is wrong."""
    if isinstance(name, str):
        if not name:
            raise InvalidName("a DVar name must not be empty")
        if name.startswith("["):
            raise InvalidName(
                f"DVar name {name!r} begins with '[', which is reserved for structured names; "
                "pass a tuple such as ('quota', 'uploads') instead"
            )
        _reject_control_characters(name, "DVar name")
        text = name
    elif isinstance(name, tuple):
        if not name:
            raise InvalidName("a structured DVar name must have at least one part")
        for part in name:
            if isinstance(part, bool) or not isinstance(part, (str, int)):
                raise InvalidName(
                    f"DVar name {name!r} has a part {part!r} of type {type(part).__name__}; "
                    "the parts of a structured name must be str or int"
                )
            if isinstance(part, str):
                _reject_control_characters(part, "DVar name part")
        text = json.dumps(list(name), ensure_ascii=False, separators=(",", ":"))
    else:
        raise InvalidName(
            f"a DVar name must be a str or a tuple of str/int parts, not {type(name).__name__} {name!r}"
        )
    if len(text) > MAX_NAME_CHARS:
        raise InvalidName(
            f"DVar name {text[:40]!r}… is {len(text)} characters long; the limit is {MAX_NAME_CHARS}"
        )
    return text


def parse_name(canonical: str) -> Name:
    """Return the name whose canonical text is ``canonical`` (a ``str`` or a tuple)."""
    if canonical.startswith("["):
        return tuple(json.loads(canonical))
    return canonical


def check_store_name(name: str) -> str:
    """Return ``name`` if it can name a store, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"a store name must be a non-empty str, not {name!r}")
    _reject_control_characters(name, "store name")
    if len(name) > MAX_STORE_NAME_CHARS:
        raise InvalidName(
            f"store name {name[:40]!r}… is {len(name)} characters long; the limit is {MAX_STORE_NAME_CHARS}"
        )
    return name
