"""System checks of djstm's settings: each problem gets its id and a hint."""

import pytest
from django.test.utils import override_settings

from djstm.checks import check_settings

# The checks read settings.DATABASES; overriding it here is what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

PG = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "shop"}}
REDIS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}


def ids(**settings):
    with override_settings(**settings):
        return [message.id for message in check_settings()]


def test_the_test_settings_pass():
    assert ids() == []


@pytest.mark.parametrize(
    ("djstm", "expected"),
    [
        ({"POLL_INTERVALL": 2}, "djstm.E002"),
        ({"LOCK": "eager"}, "djstm.E003"),
        ({"POLL_INTERVAL": 0}, "djstm.E004"),
        ({"LOCK_TIMEOUT": "5"}, "djstm.E004"),
        ({"DATABASE_RETRIES": -1}, "djstm.E005"),
        (["LOCK", "auto"], "djstm.E001"),
        ({"ADMIN_DATABASE": "nope"}, "djstm.E006"),
        ({"DISTRIBUTED_DATABASES": "default"}, "djstm.E007"),
        ({"DISTRIBUTED_DATABASES": ["nope"]}, "djstm.E007"),
    ],
)
def test_bad_settings_are_reported_with_their_id(djstm, expected):
    assert ids(DJSTM=djstm, DATABASES=PG, CHANNEL_LAYERS=REDIS) == [expected]


def test_a_distributed_database_without_a_channel_layer_is_a_warning():
    assert ids(DJSTM={}, DATABASES=PG, CHANNEL_LAYERS={}) == ["djstm.W001"]
    assert ids(DJSTM={"CHANNEL_LAYER": "other"}, DATABASES=PG, CHANNEL_LAYERS=REDIS) == ["djstm.W001"]


def test_the_in_memory_layer_with_a_distributed_database_is_a_warning():
    memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    assert ids(DJSTM={}, DATABASES=PG, CHANNEL_LAYERS=memory) == ["djstm.W002"]
    sqlite_only = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x"}}
    assert ids(DJSTM={}, DATABASES=sqlite_only, CHANNEL_LAYERS=memory) == []  # nothing to notify across


def test_manage_py_check_runs_them():
    from io import StringIO

    from django.core.management import CommandError, call_command

    with override_settings(DJSTM={"LOCK": "eager"}), pytest.raises(CommandError, match="djstm.E003"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


def test_a_distributed_store_on_a_database_that_cannot_serve_it_is_an_error():
    sqlite = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x"}}
    assert ids(DJSTM={"DISTRIBUTED_DATABASES": ["default"]}, DATABASES=sqlite, CHANNEL_LAYERS=REDIS) == ["djstm.E008"]
    bound = {"default": {**PG["default"], "OPTIONS": {"server_side_binding": True}}}
    assert ids(DJSTM={"DISTRIBUTED_DATABASES": ["default"]}, DATABASES=bound, CHANNEL_LAYERS=REDIS) == ["djstm.E008"]
    assert ids(DJSTM={"DISTRIBUTED_DATABASES": ["default"]}, DATABASES=PG, CHANNEL_LAYERS=REDIS) == []
