"""The one table every store keeps its DVars in.

The model owns the schema, the migrations and the admin; the hot paths
(commit, flush, load) use hand-written SQL in ``djstm.backends`` instead of
querysets, which are an order of magnitude slower for this job.
"""

from django.db import models


class DVarRecord(models.Model):
    """One DVar of one store: its type tag, its encoded value and how often it was written."""

    store = models.TextField(help_text="Name of the store this DVar belongs to.")
    name = models.TextField(help_text="Canonical name; sorting names gives the global lock order.")
    type_tag = models.TextField(help_text="The DVar's type, as recorded when it was created.")
    value = models.TextField(help_text="The value, encoded as JSON by the DVar's type.")
    version = models.BigIntegerField(default=0, help_text="Number of committed writes.")
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "djstm_dvar"
        verbose_name = "DVar"
        verbose_name_plural = "DVars"
        constraints = [models.UniqueConstraint(fields=["store", "name"], name="djstm_dvar_store_name_unique")]

    def __str__(self) -> str:
        return f"{self.store}:{self.name}"

    def overwrite(self, value: str, *, using: str, expected_version: int | None = None) -> bool:
        """Store ``value`` (already checked against the type) as this row's next version, past the stores.

        For djstm's tools: importing, and repairing a row that does not decode (which no store can load).
        With ``expected_version``, only if the row still has it. Returns whether the row was written.
        Processes caching the row see the new version at their next commit check.
        """
        from django.utils import timezone

        rows = DVarRecord.objects.using(using).filter(pk=self.pk)
        if expected_version is not None:
            rows = rows.filter(version=expected_version)
        return bool(rows.update(value=value, version=models.F("version") + 1, updated_at=timezone.now()))
