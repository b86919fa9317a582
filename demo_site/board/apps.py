from django.apps import AppConfig


class BoardConfig(AppConfig):
    name = "demo_site.board"
    verbose_name = "Shared board"
