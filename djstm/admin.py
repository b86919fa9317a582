"""The admin of DVars: list, search and filter them, edit a value as JSON checked against its type.

A save goes through ``atomically`` on the DVar's store, and only if the DVar still has the version the
form was loaded with: otherwise the form shows the conflict and the current value, and saves nothing.
The admin works on the database ``settings.DJSTM["ADMIN_DATABASE"]`` (default "default").
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.utils.html import format_html

import djstm

from .codecs import codec_from_tag
from .conf import djstm_setting
from .errors import DVarDecodeError, STMError
from .models import DVarRecord
from .names import canonical_name, parse_name
from .stm._context import current
from .stores import open_store_in

__all__ = ["DVarAdmin", "DVarForm"]


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text  # a row that is not JSON: shown as stored


def _database() -> str:
    return djstm_setting("ADMIN_DATABASE")


class _EditConflict(Exception):
    def __init__(self, version: int, name: str = "", loaded: int = -1) -> None:
        super().__init__(version)
        self.version, self.name, self.loaded = version, name, loaded


def _version_seen(dvar: Any) -> int:
    """Inside a transaction that read ``dvar``: the row version it saw."""
    session = current.tx.remote
    if session is not None and session.store is dvar.store:
        return session.version_seen(dvar)
    return dvar.row_version


class DVarForm(forms.ModelForm):
    value = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 12, "cols": 90, "spellcheck": "false"}),
        help_text="JSON, as the DVar's type stores it (a tuple is a list, a Decimal a string, …).",
    )
    loaded_version = forms.IntegerField(widget=forms.HiddenInput, required=False)

    class Meta:
        model = DVarRecord
        fields = ("store", "name", "type_tag", "value")
        widgets = {"store": forms.TextInput, "name": forms.TextInput, "type_tag": forms.TextInput}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoded: Any = None
        if self.instance.pk:
            for field in ("store", "name", "type_tag"):
                if field in self.fields:  # absent when the user may only view
                    self.fields[field].disabled = True
            if "loaded_version" in self.fields:
                self.fields["loaded_version"].initial = self.instance.version
            self.initial["value"] = _pretty(self.instance.value)

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if self.instance.pk:
            return name
        try:
            return canonical_name(parse_name(name))
        except (STMError, ValueError) as error:
            raise forms.ValidationError(str(error)) from None

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        text, tag = cleaned.get("value"), cleaned.get("type_tag")
        if text is None or tag is None:
            return cleaned
        codec = codec_from_tag(tag)
        if codec is None:
            self.add_error("type_tag", f"{tag!r} is not a type the admin can check; use a built-in type such as "
                                       "int, str, list[str] or dict[str, int]")
            return cleaned
        try:
            json.loads(text)
            self.decoded = codec.loads(text)
        except ValueError as error:
            self.add_error("value", f"this is not JSON: {error}")
        except DVarDecodeError as error:
            self.add_error("value", f"expected a value of type {tag}: {error}")
        if self.instance.pk and not self.errors:
            self._check_version(cleaned.get("loaded_version"))
        return cleaned

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.errors and self.instance.pk:
            # The page shows the stored value beside the errors, not the one that was refused.
            stored = DVarRecord.objects.using(_database()).get(pk=self.instance.pk)
            self.instance.value, self.instance.version = stored.value, stored.version

    def _check_version(self, loaded: int | None) -> None:
        current = DVarRecord.objects.using(_database()).get(pk=self.instance.pk)
        if loaded is not None and current.version != loaded:
            self.add_error(None, conflict_message(self.instance.name, loaded, current))


def conflict_message(name: str, loaded: int, current: DVarRecord) -> str:
    return (
        f"DVar {name!r} was changed by someone else since this form was opened (version {loaded}, now "
        f"{current.version}); nothing was saved. Its value is now: {_pretty(current.value)}. "
        "Reload the page to edit the current value."
    )


@admin.register(DVarRecord)
class DVarAdmin(admin.ModelAdmin):
    form = DVarForm
    list_display = ("name", "store", "type_tag", "version", "updated_at", "short_value")
    list_filter = ("store", "type_tag")
    search_fields = ("name",)
    ordering = ("store", "name")
    readonly_fields = ("version", "updated_at", "pretty_value")

    def get_queryset(self, request: Any):
        return super().get_queryset(request).using(_database())

    def get_fields(self, request: Any, obj: Any = None) -> list[str]:
        if obj is None:
            return ["store", "name", "type_tag", "value"]
        return ["store", "name", "type_tag", "version", "updated_at", "pretty_value", "value", "loaded_version"]

    @admin.display(description="value")
    def short_value(self, obj: DVarRecord) -> str:
        return obj.value if len(obj.value) <= 60 else obj.value[:59] + "…"

    @admin.display(description="current value")
    def pretty_value(self, obj: DVarRecord) -> str:
        return format_html("<pre>{}</pre>", _pretty(obj.value))  # escaped: a value is text, never HTML

    def save_model(self, request: Any, obj: DVarRecord, form: DVarForm, change: bool) -> None:
        store = open_store_in(_database(), obj.store)
        try:
            if change:
                self._save_change(store, obj, form)
            else:
                codec = codec_from_tag(obj.type_tag)
                store.dvar(parse_name(obj.name), form.decoded, type=codec)
                obj.pk = DVarRecord.objects.using(_database()).get(store=obj.store, name=obj.name).pk
            obj.refresh_from_db(using=_database())
        finally:
            store.release()

    def _save_change(self, store: Any, obj: DVarRecord, form: DVarForm) -> None:
        loaded = form.cleaned_data["loaded_version"]

        def save() -> None:
            dvar = store.dvar(parse_name(obj.name))
            dvar.read()
            if _version_seen(dvar) != loaded:
                raise _EditConflict(_version_seen(dvar))
            dvar.write(form.decoded)

        try:
            djstm.atomically(save)
        except DVarDecodeError:
            # The stored value does not decode, so no store can load it: replace the row itself (the new
            # value was checked against the type by the form).
            text = codec_from_tag(obj.type_tag).dumps(form.decoded)
            if not obj.overwrite(text, using=_database(), expected_version=loaded):
                raise _EditConflict(-1, obj.name, loaded) from None

    def changeform_view(self, request: Any, object_id: str | None = None, form_url: str = "",
                        extra_context: Any = None) -> Any:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except _EditConflict:
            # Changed between the form's check and the save: nothing was saved; show the page again.
            from django.contrib import messages
            from django.http import HttpResponseRedirect

            current = DVarRecord.objects.using(_database()).get(pk=object_id)
            messages.error(request, conflict_message(current.name, int(request.POST.get("loaded_version", -1)),
                                                     current))
            return HttpResponseRedirect(request.path)

    actions = ["edit_together"]

    @admin.action(description="Edit the selected DVars together (one transaction)", permissions=["change"])
    def edit_together(self, request: Any, queryset: Any) -> Any:
        from django.http import HttpResponseRedirect

        ids = ",".join(str(pk) for pk in queryset.values_list("pk", flat=True))
        return HttpResponseRedirect(f"edit-together/?ids={ids}")

    def get_urls(self) -> list:
        from django.urls import path

        together = path("edit-together/", self.admin_site.admin_view(self.edit_together_view),
                        name="djstm_dvarrecord_edit_together")
        return [together, *super().get_urls()]

    def edit_together_view(self, request: Any) -> Any:
        """Several DVars of one store in one form, saved in one ``atomically``: all of them, or none."""
        from django.core.exceptions import PermissionDenied
        from django.http import HttpResponseRedirect
        from django.template.response import TemplateResponse

        if not self.has_change_permission(request):
            raise PermissionDenied
        ids_text = request.POST.get("ids") if request.method == "POST" else request.GET.get("ids", "")
        ids = [int(pk) for pk in (ids_text or "").split(",") if pk.isdigit()]
        records = list(DVarRecord.objects.using(_database()).filter(pk__in=ids).order_by("store", "name"))
        rows = [{"record": r, "text": _pretty(r.value), "version": r.version, "error": None} for r in records]
        context = {**self.admin_site.each_context(request), "rows": rows, "ids": ids_text, "conflict": None,
                   "opts": self.model._meta, "title": "Edit DVars together"}
        if request.method == "POST" and rows:
            if len({r.store for r in records}) > 1:
                context["conflict"] = "Select DVars of one store: one transaction serves one store here."
            elif self._validate_together(request, rows):
                try:
                    self._save_together(records[0].store, rows)
                except _EditConflict as conflict:
                    current = DVarRecord.objects.using(_database()).get(store=records[0].store, name=conflict.name)
                    context["conflict"] = conflict_message(conflict.name, conflict.loaded, current)
                else:
                    for row in rows:
                        self.log_change(request, row["record"], "Changed value (edited together).")
                    self.message_user(request, f"Saved {len(rows)} DVars in one transaction.")
                    return HttpResponseRedirect("../")
        return TemplateResponse(request, "admin/djstm/edit_together.html", context)

    def _validate_together(self, request: Any, rows: list[dict]) -> bool:
        valid = True
        for row in rows:
            record = row["record"]
            row["text"] = request.POST.get(f"value-{record.pk}", "")
            row["version"] = int(request.POST.get(f"version-{record.pk}", record.version))
            codec = codec_from_tag(record.type_tag)
            try:
                if codec is None:
                    raise ValueError(f"type {record.type_tag} cannot be checked here")
                json.loads(row["text"])
                row["decoded"] = codec.loads(row["text"])
            except (ValueError, DVarDecodeError) as error:
                row["error"] = f"expected a value of type {record.type_tag}: {error}"
                valid = False
        return valid

    def _save_together(self, store_name: str, rows: list[dict]) -> None:
        store = open_store_in(_database(), store_name)
        try:
            dvars = [(store.dvar(parse_name(row["record"].name)), row) for row in rows]

            def save_all() -> None:
                for dvar, row in dvars:
                    dvar.read()
                    if _version_seen(dvar) != row["version"]:
                        raise _EditConflict(_version_seen(dvar), row["record"].name, row["version"])
                    dvar.write(row["decoded"])

            djstm.atomically(save_all)
        finally:
            store.release()

    def delete_model(self, request: Any, obj: DVarRecord) -> None:
        obj.delete(using=_database())

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        queryset.using(_database()).delete()
