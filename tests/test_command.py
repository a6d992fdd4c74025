"""Process lifetime in gateway.command, on real processes: stop (blocking and on trio), alive,
stderr_tail, and a process group stopped as one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from gateway import command
from gateway.command import Ended

pytestmark = pytest.mark.timeout(60)

IGNORES_TERM = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
EXITS_ON_TERM = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"


def started(script: str, tmp_path: Path) -> command.Child:
    """A shell running `script`, once its traps are set (it printed "ready")."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    out.write_bytes(b"")
    child = command.spawn(["sh", "-c", script], stderr_path=str(out))
    deadline = time.monotonic() + 10
    while b"ready" not in out.read_bytes():
        assert time.monotonic() < deadline and command.alive(child), out.read_bytes()
        time.sleep(0.01)
    return child


def test_stop_reports_how_it_ended(tmp_path: Path) -> None:
    quick = command.spawn(["true"])
    while command.alive(quick.pid) and quick.poll() is None:
        time.sleep(0.01)
    assert command.stop(quick) is Ended.EXITED and quick.returncode == 0
    polite = started(EXITS_ON_TERM, tmp_path)
    assert command.stop(polite, grace=5) is Ended.TERMINATED
    assert polite.returncode == 0 and not command.alive(polite)
    stubborn = started(IGNORES_TERM, tmp_path)
    assert command.stop(stubborn, grace=0.2) is Ended.KILLED
    assert stubborn.returncode == -signal.SIGKILL
    at_once = started(IGNORES_TERM, tmp_path)
    t = time.monotonic()
    assert command.stop(at_once, grace=0) is Ended.KILLED  # no SIGTERM step at all
    assert time.monotonic() - t < 5
    assert command.stop(at_once) is Ended.EXITED  # stopping it again: already reaped


def test_exit_wait_lets_it_finish(tmp_path: Path) -> None:
    child = command.spawn(["sh", "-c", "sleep 0.2; exit 3"])
    assert command.stop(child, exit_wait=10) is Ended.EXITED and child.returncode == 3


def test_a_pid_we_did_not_start_is_stopped_through_its_pidfd(tmp_path: Path) -> None:
    child = started(EXITS_ON_TERM, tmp_path)
    assert command.alive(child.pid)
    pidfd = command.open_pidfd(child.pid)
    assert pidfd is not None
    try:
        assert command.stop(child.pid, pidfd=pidfd, grace=5) is Ended.TERMINATED
    finally:
        os.close(pidfd)
    assert not command.alive(child.pid)  # exited: a zombie until its parent reaps it
    child.wait()
    assert not command.alive(child.pid) and command.open_pidfd(child) is None


def test_a_group_is_stopped_as_one(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    child = command.spawn(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grandchild = int(pid_file.read_text())
    assert command.stop(child, grace=0, group=True) is Ended.KILLED
    deadline = time.monotonic() + 10
    while command.alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not command.alive(grandchild)


async def test_stop_async_never_blocks_the_trio_thread(tmp_path: Path) -> None:
    stubborn = started(IGNORES_TERM, tmp_path)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        assert await command.stop_async(stubborn, grace=0.5) is Ended.KILLED
        nursery.cancel_scope.cancel()
    assert ticks >= 10  # the other task ran while the stop waited out its grace period
    assert stubborn.returncode == -signal.SIGKILL
    assert await command.stop_async(stubborn) is Ended.EXITED


def test_alive_and_stderr_tail(tmp_path: Path) -> None:
    assert command.alive(os.getpid())
    assert not command.alive(2**22 + 12345)  # above pid_max: never a process
    log = tmp_path / "log"
    assert command.stderr_tail(log) == ""  # missing
    assert command.stderr_tail(None) == ""
    log.write_bytes(b"first\n  the last one  \n\n   \n")
    assert command.stderr_tail(log) == "the last one"
    log.write_bytes(b"x" * 100_000 + b"\nend\n")
    assert command.stderr_tail(log) == "end"
    assert command.last_line(b"a\nb\n\n") == "b"
