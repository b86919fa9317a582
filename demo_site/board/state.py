"""The board's shared state: DVars in a durable store, changed only inside ``atomically``.

Every change bumps ``revision``; a page that wants to follow the board blocks
in ``retry`` until the revision differs from the one it has (``next_snapshot``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timezone

from django.conf import settings

import djstm

MAX_NOTES = 20
MAX_NOTE_LENGTH = 280


@dataclass(frozen=True)
class Note:
    text: str
    posted_at: datetime


@functools.cache
def _store():
    # Opened on first use and kept open: djstm flushes it when the server process exits.
    return djstm.with_store(**settings.BOARD_STORE)


def _clicks() -> djstm.DVar[int]:
    return _store().dvar("clicks", 0)


def _notes() -> djstm.DVar[tuple[Note, ...]]:
    return _store().dvar("notes", type=tuple[Note, ...], default=())


def _revision() -> djstm.DVar[int]:
    return _store().dvar("revision", 0)


def _banner() -> djstm.DVar[str]:
    # Staff change it in the admin; every open page follows it live (djstm/static/djstm/live.js).
    return _store().dvar("banner", "Welcome to the shared board.")


#: The DVars of the board that anyone may follow live; the rest is for staff (DJSTM["CAN_READ"]).
PUBLIC = {"banner", "clicks"}


def may_read(user, store: str, name: str) -> bool:
    """Who may follow which DVar over /ws/djstm/: everyone the public ones, staff everything."""
    return name in PUBLIC or bool(getattr(user, "is_staff", False))


def _bump_revision() -> None:
    _revision().modify(lambda r: r + 1)


def click() -> None:
    """Add one to the shared counter."""
    _clicks().modify(lambda n: n + 1)
    _bump_revision()


def post_note(text: str) -> None:
    """Pin a note on top of the board, keeping the newest ``MAX_NOTES``; ValueError if the text is unfit."""
    text = text.strip()
    if not text:
        raise ValueError("A note needs some text.")
    if len(text) > MAX_NOTE_LENGTH:
        raise ValueError(f"A note holds at most {MAX_NOTE_LENGTH} characters; this one has {len(text)}.")
    note = Note(text=text, posted_at=datetime.now(timezone.utc))
    _notes().write(((note,) + _notes().read())[:MAX_NOTES])
    _bump_revision()


def snapshot() -> dict:
    """The whole board as plain JSON-able data, from one consistent view."""
    return {
        "revision": _revision().read(),
        "banner": _banner().read(),
        "clicks": _clicks().read(),
        "notes": [{"text": n.text, "posted_at": n.posted_at.isoformat()} for n in _notes().read()],
    }


def next_snapshot(seen_revision: int | None) -> dict:
    """The board once its revision differs from ``seen_revision``; blocks (retry) until then."""
    djstm.check(_revision().read() != seen_revision)
    return snapshot()
