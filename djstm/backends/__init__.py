"""Everything that speaks to a database: connections, schema, rows and locks.

The layers above never write SQL; they call these functions with a Django
database alias. Hot paths use ``connections[alias].cursor()`` directly.
"""
