"""Settings for the test suite: a Django project that uses djstm as its users would."""

import os
import tempfile

from djstm.conf import postgresql_database

SECRET_KEY = "djstm-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "djstm",
    "demo_site.board",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_scratch = tempfile.mkdtemp(prefix="djstm-tests-")

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(_scratch, "default.sqlite3")},
    # A second SQLite database that durable stores open by alias (database="stores").
    "stores": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_scratch, "stores.sqlite3"),
        "TEST": {"NAME": os.path.join(_scratch, "test-stores.sqlite3")},
    },
}

# Distributed stores: the PostgreSQL server and Redis that .ci/run starts (tests skip without them,
# unless DJSTM_REQUIRE_SERVICES=1). Tests use store names of their own, so they share the database.
DATABASES["distributed"] = postgresql_database(
    os.environ.get("DJSTM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    # Never the shared database itself: a test that asks pytest-django for this alias gets (and later drops)
    # a database of its own.
    TEST={"NAME": "djstm_pytest_scratch"},
)

STATIC_URL = "/static/"
CHANNEL_LAYERS = {
    "default": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    "djstm": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("DJSTM_REDIS_URL", "redis://127.0.0.1:6379/0")]},
    },
    # channels-redis's default layer, whose group memberships expire: here after 2 s.
    "djstm-core": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("DJSTM_REDIS_URL", "redis://127.0.0.1:6379/0")], "group_expiry": 2},
    },
}
DJSTM = {"CHANNEL_LAYER": "djstm"}
BOARD_STORE_PATH = os.path.join(_scratch, "board.sqlite3")
BOARD_STORE = {"path": BOARD_STORE_PATH, "name": "board"}
BOARD_WORKER = False  # the test of the demo's background worker starts it itself
