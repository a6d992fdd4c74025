"""The component supervisor (gateway.supervisor): a failing component is counted and restarted,
never the end of the nursery it runs in; a start-up failure is the caller's; cancellation passes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.supervisor import Supervisor, describe

pytestmark = pytest.mark.timeout(30)


class Flaky:
    """A component that fails `fails` times after becoming ready, then runs until cancelled."""

    def __init__(self, fails: int, *, in_group: bool = False) -> None:
        self.fails = fails
        self.in_group = in_group
        self.starts = 0
        self.running = trio.Event()

    async def __call__(self, *, task_status: trio.TaskStatus[None]
                       = trio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        task_status.started()
        if self.starts <= self.fails:
            await trio.sleep(0.01)
            if self.in_group:
                async with trio.open_nursery() as nursery:
                    async def poller() -> None:
                        raise trio.ClosedResourceError("another task closed this fd")
                    nursery.start_soon(poller)
            raise OSError(9, "Bad file descriptor")
        self.running.set()
        await trio.sleep_forever()


@pytest.mark.parametrize("in_group", [False, True])
async def test_a_failing_component_is_restarted_and_counted(in_group: bool) -> None:
    sup = Supervisor(backoff_min=0.01, backoff_max=0.02)
    seen: list[str] = []
    sup.on_failure.append(seen.append)
    flaky = Flaky(3, in_group=in_group)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.supervise, "poller", flaky)
            await flaky.running.wait()
            await trio.testing.wait_all_tasks_blocked()
            health = sup.health()["poller"]
            assert health["running"] is True and health["failures"] == 3
            expected = "ClosedResourceError" if in_group else "OSError"
            assert expected in health["last_error"]
            assert seen == ["poller"] * 3
            nursery.cancel_scope.cancel()  # cancellation passes through, not a failure
    assert flaky.starts == 4
    assert sup.health()["poller"]["failures"] == 3


async def test_a_component_that_fails_before_ready_fails_the_start() -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise OSError(2, "no such socket")

    sup = Supervisor()
    with pytest.raises(OSError, match="no such socket"):  # as raised, not in a group
        await sup.supervise("broken", broken)
    assert sup.health()["broken"] == {"running": False, "failures": 0, "last_error": None}


async def test_a_component_that_returns_has_ended() -> None:
    async def once(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()

    sup = Supervisor()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.supervise, "once", once)
    assert sup.health()["once"]["running"] is False


async def test_names_are_unique() -> None:
    sup = Supervisor()
    flaky = Flaky(0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.supervise, "x", flaky)
            with pytest.raises(ValueError, match="supervised twice"):
                await sup.supervise("x", flaky)
            nursery.cancel_scope.cancel()


async def test_backoff_doubles_up_to_its_cap() -> None:
    sup = Supervisor(backoff_min=0.05, backoff_max=0.2, stable_after=60.0)
    flaky = Flaky(5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(sup.supervise, "slow", flaky)
            await flaky.running.wait()
            elapsed = trio.current_time() - t0
            nursery.cancel_scope.cancel()
    # waits of 0.05, 0.1, 0.2, 0.2, 0.2 between the five failures and the last start
    assert elapsed >= 0.75


def test_describe_names_each_exception_of_a_group() -> None:
    group = ExceptionGroup("x", [OSError("a"), ValueError("b")])
    assert describe(group) == "OSError: a; ValueError: b"
