import sys
import threading
import time

import pytest


@pytest.fixture
def busy_switching():
    """Switch threads every few microseconds so races show up in a short run."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def wait_until(condition, timeout=5.0, what="condition"):
    """Poll ``condition`` until true; fail the test (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def run_threads(targets, timeout=30.0):
    """Start one thread per callable, join them all within ``timeout``, re-raise the first error."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # reported in the test thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread for thread in threads if thread.is_alive()]
    if alive:
        pytest.fail(f"{len(alive)} threads still running after {timeout}s")
    if errors:
        raise errors[0]


#: The tests' PostgreSQL alias (tests/settings.py), used by distributed stores.
DISTRIBUTED_ALIAS = "distributed"


@pytest.fixture
def direct_database_access(django_db_blocker):
    """The project's databases used as a program uses them: no test database, no wrapping transaction."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="session")
def distributed_schema(django_db_blocker):
    """The djstm table in the tests' PostgreSQL database; a skip (or, in CI, a failure) without PostgreSQL."""
    from django.core.management import call_command

    from tests.services import require_postgres

    require_postgres()
    with django_db_blocker.unblock():
        call_command("migrate", "djstm", database=DISTRIBUTED_ALIAS, verbosity=0)
