"""Live services for tests: the URL of Redis and the DSN of PostgreSQL, or a skip saying how to start them.

Set ``DJSTM_REQUIRE_SERVICES=1`` (as CI does) to turn a missing service into a failure.
"""

import os

import pytest

__all__ = ["require_redis", "require_postgres", "unavailable"]


def unavailable(message: str) -> None:
    """Skip the test with ``message``, or fail it under ``DJSTM_REQUIRE_SERVICES=1``."""
    if os.environ.get("DJSTM_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (DJSTM_REQUIRE_SERVICES=1 forbids skipping)", pytrace=False)
    pytest.skip(message)


def _missing(what: str, error: BaseException, how: str) -> None:
    unavailable(f"{what} is unreachable ({error}); start it with: {how}")


def require_redis() -> str:
    """The shared Redis URL (``DJSTM_REDIS_URL``, default ``redis://127.0.0.1:6379/0``), answering PING."""
    url = os.environ.get("DJSTM_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as error:  # redis.ConnectionError, or redis-py missing
        _missing(f"Redis at {url}", error, 'redis-server --daemonize yes --port 6379 --save "" --appendonly no')
    return url


def require_postgres() -> str:
    """The PostgreSQL DSN (``DJSTM_PG_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``), accepting a query."""
    dsn = os.environ.get("DJSTM_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except Exception as error:  # psycopg.OperationalError, or psycopg missing
        _missing(
            f"PostgreSQL at {dsn}",
            error,
            "a PostgreSQL server with that database (e.g. `createdb -U postgres test`), or set DJSTM_PG_DSN",
        )
    return dsn
