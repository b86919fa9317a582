"""Only djstm's table goes into the board's store file; everything else lives in the default database."""


class BoardStoreRouter:
    def allow_migrate(self, db: str, app_label: str, **hints: object) -> bool | None:
        if db == "board":
            return app_label == "djstm"
        return None
