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
