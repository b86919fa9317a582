"""aatomically: never blocks the event loop; wakes on commits from threads; cancellation leaves nothing behind."""

import asyncio
import threading

import pytest

import djstm
from djstm import TVar, aatomically, atomically, check


def test_a_task_blocked_in_retry_leaves_the_loop_running_and_wakes_on_a_thread_commit():
    gate = TVar(0)

    async def main():
        blocked = asyncio.create_task(aatomically(lambda: check(gate.read() == 3) or "open"))
        ticks = 0
        while not gate._waiters:  # the task has registered and is now suspended
            await asyncio.sleep(0.001)
        for _ in range(20):
            await asyncio.sleep(0.001)
            ticks += 1
        assert not blocked.done()

        def committer():
            for _ in range(3):
                atomically(lambda: gate.modify(lambda n: n + 1))

        threading.Thread(target=committer).start()
        return ticks, await asyncio.wait_for(blocked, 10)

    ticks, result = asyncio.run(main())
    assert ticks == 20
    assert result == "open"
    assert not gate._waiters


def test_aatomically_timeout_raises_timeout():
    gate = TVar(False, label="gate")

    async def main():
        await aatomically(lambda: check(gate.read()), timeout=0.1)

    with pytest.raises(djstm.Timeout):
        asyncio.run(main())
    assert not gate._waiters


def test_a_thousand_tasks_woken_and_cancelled_at_once_finish_commit_nothing_and_leave_no_registration():
    flag = TVar(False)
    committed = TVar(0)

    def wait_then_count():
        check(flag.read())
        committed.write(committed.read() + 1)

    async def main():
        tasks = [asyncio.create_task(aatomically(wait_then_count)) for _ in range(1000)]
        while len(flag._waiters) < 1000:
            await asyncio.sleep(0.01)
        atomically(lambda: flag.write(True))  # wakes them all…
        for task in tasks:  # …and, in the same instant, cancels them all
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=10)
        return done, pending

    done, pending = asyncio.run(main())
    assert not pending
    assert all(task.cancelled() for task in done)
    assert committed.peek() == 0
    assert not flag._waiters and not committed._waiters


def test_aatomically_inside_a_transaction_is_refused():
    async def nested():
        return await aatomically(lambda: None)

    def body():
        coroutine = nested()
        try:
            coroutine.send(None)
        finally:
            coroutine.close()

    with pytest.raises(djstm.STMError, match="atomically"):
        atomically(body)


def test_durable_atomically_called_directly_in_a_coroutine_is_refused_before_committing():
    v = TVar(0)

    async def main():
        atomically(lambda: v.write(1), durable=True)

    with pytest.raises(djstm.STMError, match="aatomically"):
        asyncio.run(main())
    assert v.peek() == 0
