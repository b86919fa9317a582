"""``manage.py djstm``: inspect and change DVars from the shell.

Sub-commands: ``list``, ``get``, ``set``, ``watch``, ``export``, ``import``, ``check``. Each works on
one database alias (``--database``, default "default"); those that open a store (``set``, ``watch``,
``import``) open it as a distributed store on PostgreSQL and as a durable one on SQLite, so a durable
store that a running process holds gives ``StoreLocked`` rather than writing under its feet. Names
are given as stored: ``theme``, or ``'["quota","uploads"]'`` for a structured name.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, transaction

import djstm
from djstm.codecs import codec_from_tag
from djstm.errors import DVarDecodeError, STMError
from djstm.models import DVarRecord
from djstm.names import parse_name
from djstm.stores import open_store_in

_EXPORT_FIELDS = ("store", "name", "type", "version", "value")


class Command(BaseCommand):
    help = "Inspect and change djstm DVars: list, get, set, watch, export, import, check."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        def action(name: str, help: str, store_option: bool = True) -> CommandParser:
            sub = commands.add_parser(name, help=help)
            sub.add_argument("--database", default="default", help="database alias (default: default)")
            if store_option:
                sub.add_argument("--store", default="default", help="store name (default: default)")
            return sub

        listing = action("list", "DVars with their type, version and last change", store_option=False)
        listing.add_argument("--store", help="only this store (default: all)")
        listing.add_argument("prefix", nargs="?", default="", help="only names starting with this")
        action("get", "print a DVar's value as JSON").add_argument("name")
        setting = action("set", "write a DVar (validated by its type) in one transaction")
        setting.add_argument("name")
        setting.add_argument("value_json", metavar="JSON", help="the new value, as JSON in the DVar's stored form")
        action("watch", "print each change of the DVars as it commits (Ctrl-C stops)").add_argument(
            "names", nargs="+"
        )
        exporting = action("export", "write every DVar to FILE as JSON lines (one snapshot)", store_option=False)
        exporting.add_argument("--store", help="only this store (default: all)")
        exporting.add_argument("file")
        action("import", "write the DVars of FILE (from export), all or nothing", store_option=False).add_argument(
            "file"
        )
        checking = action("check", "report rows that do not decode as their type", store_option=False)
        checking.add_argument("--store", help="only this store (default: all)")

    def handle(self, *args: Any, action: str, database: str, **options: Any) -> None:
        if database not in connections.settings:
            raise CommandError(f"no database alias {database!r} in settings.DATABASES")
        try:
            getattr(self, f"_{action}")(database, **options)
        except STMError as error:
            raise CommandError(str(error)) from None

    # -- reading -------------------------------------------------------------------------------------

    def _records(self, database: str, store: str | None, prefix: str = ""):
        records = DVarRecord.objects.using(database).order_by("store", "name")
        if store is not None:
            records = records.filter(store=store)
        if prefix:
            records = records.filter(name__startswith=prefix)
        return records

    def _list(self, database: str, store: str | None, prefix: str, **_: Any) -> None:
        rows = [(_short(r.store), _short(r.name), _short(r.type_tag), str(r.version),
                 r.updated_at.isoformat(timespec="seconds")) for r in self._records(database, store, prefix)]
        header = ("STORE", "NAME", "TYPE", "VERSION", "UPDATED")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

    def _get(self, database: str, store: str, name: str, **_: Any) -> None:
        record = self._record(database, store, name)
        self.stdout.write(json.dumps(json.loads(record.value), indent=2, ensure_ascii=False))

    def _record(self, database: str, store: str, name: str) -> DVarRecord:
        try:
            return DVarRecord.objects.using(database).get(store=store, name=name)
        except DVarRecord.DoesNotExist:
            raise CommandError(
                f"no DVar {name!r} in store {store!r} of database {database!r}; "
                f"`manage.py djstm list --database {database}` shows what there is"
            ) from None

    def _check(self, database: str, store: str | None, **_: Any) -> None:
        bad = unknown = checked = 0
        for record in self._records(database, store).iterator():
            codec = codec_from_tag(record.type_tag)
            if codec is None:
                unknown += 1
                self.stdout.write(f"{record.store}:{record.name}: type {record.type_tag} is not known to this "
                                  "process (a class of the application); not checked")
                continue
            checked += 1
            try:
                codec.loads(record.value)
            except DVarDecodeError as error:
                bad += 1
                self.stdout.write(f"{record.store}:{record.name}: does not decode as {record.type_tag}: {error}")
        self.stdout.write(f"{checked} rows checked, {bad} do not decode, {unknown} of unknown type")
        if bad:
            raise CommandError(f"{bad} rows do not decode")

    # -- writing -----------------------------------------------------------------------------------------

    def _open(self, database: str, store: str):
        return open_store_in(database, store)

    def _dvar(self, opened, database: str, store: str, name: str):
        self._record(database, store, name)  # a clear error for an unknown name
        try:
            return opened.dvar(parse_name(name))
        except djstm.DVarTypeError as error:
            raise CommandError(f"{error}; this command can only handle DVars of built-in types") from None

    def _set(self, database: str, store: str, name: str, value_json: str, **_: Any) -> None:
        try:
            json.loads(value_json)
        except ValueError as error:
            raise CommandError(f"the value is not valid JSON ({error}): {value_json!r}") from None
        with self._open(database, store) as opened:
            record = self._record(database, store, name)
            codec = codec_from_tag(record.type_tag)
            if codec is not None and not _decodes(codec, record.value):
                # No store can load this row: check the new value, then replace the row itself.
                record.overwrite(codec.dumps(self._decode_argument(codec, value_json, name)), using=database)
                self.stdout.write(f"{store}:{name} = {value_json} (the stored value did not decode; replaced)")
                return
            dvar = self._dvar(opened, database, store, name)
            value = self._decode_argument(dvar.codec, value_json, name)
            djstm.atomically(dvar.write, value)
        self.stdout.write(f"{store}:{name} = {value_json}")

    def _decode_argument(self, codec: Any, value_json: str, name: str) -> Any:
        try:
            return codec.loads(value_json)
        except DVarDecodeError as error:
            raise CommandError(f"{value_json!r} is not a value of DVar {name!r}'s type {codec.tag}: {error}") from None

    def _watch(self, database: str, store: str, names: list[str], **_: Any) -> None:
        with self._open(database, store) as opened:
            dvars = [self._dvar(opened, database, store, name) for name in names]

            def changes(seen: dict) -> dict:
                now = {dvar: dvar.read() for dvar in dvars}
                djstm.check(now != seen)
                return now

            seen: dict = {}
            try:
                while True:
                    now = djstm.atomically(changes, seen)
                    for dvar, value in now.items():
                        if dvar not in seen or seen[dvar] != value:
                            self.stdout.write(f"{store}:{dvar.key} = {dvar.codec.dumps(value)}")
                    self.stdout.flush()
                    seen = now
            except KeyboardInterrupt:
                self.stdout.write("stopped")

    def _export(self, database: str, store: str | None, file: str, **_: Any) -> None:
        records = list(self._records(database, store))  # one query: one snapshot
        with open(file, "w", encoding="utf-8") as out:
            for r in records:
                line = dict(zip(_EXPORT_FIELDS, (r.store, r.name, r.type_tag, r.version, r.value)))
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.stdout.write(f"exported {len(records)} DVars to {file}")

    def _import(self, database: str, file: str, **_: Any) -> None:
        rows = self._read_export(file)
        stores = sorted({row["store"] for row in rows})
        opened = [self._open(database, store) for store in stores]  # durable stores: refused while held elsewhere
        try:
            with transaction.atomic(using=database):
                for row in rows:
                    self._import_row(database, row)
        finally:
            for store in opened:
                store.release()
        self.stdout.write(f"imported {len(rows)} DVars from {file}")

    def _read_export(self, file: str) -> list[dict]:
        rows = []
        try:
            with open(file, encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        missing = [field for field in _EXPORT_FIELDS if field not in row]
                        if missing or not isinstance(row["version"], int) or not isinstance(row["value"], str):
                            raise ValueError(f"expected the fields {', '.join(_EXPORT_FIELDS)} of an export")
                        json.loads(row["value"])
                        codec = codec_from_tag(row["type"])
                        if codec is not None:  # a class of the application's cannot be checked here
                            codec.loads(row["value"])
                    except (ValueError, DVarDecodeError) as error:
                        raise CommandError(f"{file}, line {number}: {error}; nothing was imported") from None
                    rows.append(row)
        except OSError as error:
            raise CommandError(f"cannot read {file}: {error}") from None
        return rows

    def _import_row(self, database: str, row: dict) -> None:
        records = DVarRecord.objects.using(database)
        existing = records.select_for_update().filter(store=row["store"], name=row["name"]).first()
        if existing is None:
            records.create(store=row["store"], name=row["name"], type_tag=row["type"], value=row["value"],
                           version=row["version"], updated_at=_now())
            return
        if existing.type_tag != row["type"]:
            raise CommandError(
                f"{row['store']}:{row['name']} has type {existing.type_tag} here and {row['type']} in the file; "
                "nothing was imported"
            )
        # A write like any other: the version moves on, so caches in running processes see the change.
        existing.overwrite(row["value"], using=database)
        if row["version"] > existing.version + 1:
            records.filter(pk=existing.pk).update(version=row["version"])


def _decodes(codec: Any, text: str) -> bool:
    try:
        codec.loads(text)
    except DVarDecodeError:
        return False
    return True


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _now():
    from django.utils import timezone

    return timezone.now()
