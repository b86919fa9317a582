"""The demo project: a shared board kept in a durable djstm store, served over ASGI with Channels."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
# Everything the demo writes lives here (ignored by git); override to run several copies side by side.
VAR_DIR = Path(os.environ.get("DJSTM_DEMO_VAR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJSTM_DEMO_SECRET_KEY", "djstm-demo-only-not-secret")
DEBUG = os.environ.get("DJSTM_DEMO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "daphne",  # makes `runserver` serve ASGI, websockets included
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
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_site.urls"
ASGI_APPLICATION = "demo_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "demo.sqlite3"},
    # The board's store file, as a database too: the admin edits its DVars, live pages follow them.
    "board": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "board.sqlite3", "OPTIONS": {"timeout": 30}},
}
DATABASE_ROUTERS = ["demo_site.routers.BoardStoreRouter"]

# One process, so the in-memory layer is enough; `make demo-distributed` (settings_distributed.py) uses Redis.
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# The board's durable store: a SQLite file of its own, opened with djstm.with_store(**BOARD_STORE).
BOARD_STORE_PATH = VAR_DIR / "board.sqlite3"
BOARD_STORE = {"path": BOARD_STORE_PATH, "name": "board"}

DJSTM = {
    "ADMIN_DATABASE": "board",
    "CAN_READ": "demo_site.board.state.may_read",
    # A durable store's commits reach live pages when the consumer re-reads them: often, here.
    "POLL_INTERVAL": 0.5,
}

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
