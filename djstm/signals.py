"""Django signals djstm sends.

``dvar_changed``: sent in the committing process once a transaction that wrote DVars of a
store has committed (for a distributed store, after the commit of the caller's
``transaction.atomic()`` when it joined one), outside any djstm lock, so receivers may run
transactions of their own. A durable store sends it only while it has receivers (connecting
one costs every later durable commit a little).
``sender`` is the store; keyword arguments: ``store`` (its name), ``database`` (its alias) and
``changes``, a list of ``(name, version)`` pairs (canonical names, new row versions). Other
processes learn of the change through the channel layer, not through this signal.
"""

from django.dispatch import Signal

__all__ = ["dvar_changed"]

dvar_changed = Signal()
