from django.apps import AppConfig


class DjstmConfig(AppConfig):
    name = "djstm"
    verbose_name = "Transactional variables"
    default_auto_field = "django.db.models.BigAutoField"
