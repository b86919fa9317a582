"""The board's shared state: DVars in a durable store, changed only inside ``atomically``.

Every change bumps ``revision``; a page that wants to follow the board blocks
in ``retry`` until the revision differs from the one it has (``next_snapshot``).
"""

from __future__ import annotations

import functools
import threading
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
    store = djstm.with_store(**settings.BOARD_STORE)
    if getattr(settings, "BOARD_WORKER", True):
        threading.Thread(target=_celebrate_until_closed, name="board worker", daemon=True).start()
    return store


def _celebrate_until_closed() -> None:
    try:
        celebrate_forever()
    except djstm.StoreClosed:
        pass  # the server is stopping


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
PUBLIC = {"banner", "clicks", "note_limit"}


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
    """Pin a note on top of the board, keeping the newest ``note_limit``; ValueError if the text is unfit."""
    text = text.strip()
    if not text:
        raise ValueError("A note needs some text.")
    if len(text) > MAX_NOTE_LENGTH:
        raise ValueError(f"A note holds at most {MAX_NOTE_LENGTH} characters; this one has {len(text)}.")
    _pin(text)


def _pin(text: str) -> None:
    note = Note(text=text, posted_at=datetime.now(timezone.utc))
    limit = max(1, _note_limit().read())
    _notes().write(((note,) + _notes().read())[:limit])
    _bump_revision()


def _note_limit() -> djstm.DVar[int]:
    # How many notes the board keeps: a setting staff tune in the admin.
    return _store().dvar("note_limit", MAX_NOTES)


def _celebrated() -> djstm.DVar[int]:
    return _store().dvar("celebrated", 0)


CELEBRATE_EVERY = 10


def celebrate_next_milestone() -> int:
    """Pin a note for the next multiple of ``CELEBRATE_EVERY`` clicks; blocks (retry) until there is one.

    The milestone celebrated is a DVar, so with several workers each milestone is pinned exactly once.
    """
    milestone = _clicks().read() // CELEBRATE_EVERY * CELEBRATE_EVERY
    djstm.check(milestone > _celebrated().read())
    _celebrated().write(milestone)
    _pin(f"🎉 {milestone} clicks!")
    return milestone


def celebrate_forever() -> None:
    """The board's background worker: sleeps in retry until there is a milestone to celebrate."""
    while True:
        djstm.atomically(celebrate_next_milestone)


def snapshot() -> dict:
    """The whole board as plain JSON-able data, from one consistent view."""
    return {
        "revision": _revision().read(),
        "banner": _banner().read(),
        "note_limit": _note_limit().read(),
        "clicks": _clicks().read(),
        "notes": [{"text": n.text, "posted_at": n.posted_at.isoformat()} for n in _notes().read()],
    }


def next_snapshot(seen_revision: int | None) -> dict:
    """The board once its revision differs from ``seen_revision``; blocks (retry) until then."""
    djstm.check(_revision().read() != seen_revision)
    return snapshot()
