"""The one place external programs are started and stopped.

Each program the gateway uses has its own thin wrapper module that calls `run` (or `spawn` for a
long-lived child) and maps failures to a typed error; nothing else imports subprocess.

Lifetime, one implementation each: `alive` (a child we started, or any pid through /proc),
`stop` (wait for a voluntary exit, SIGTERM, wait out the grace period, SIGKILL, wait; returns how
it ended) and its trio twin `stop_async`, which waits on a pidfd and never blocks the trio thread,
and `stderr_tail` (the last non-empty line of a log). Signals go through a pidfd, so a pid that
was reused after the exit is never hit; a pid we did not start (adopted) may be handed in with a
pidfd the caller opened and checked.
"""

from __future__ import annotations

import enum
import os
import select
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import CommandError

# A long-lived child started by `spawn`; other modules name the type through this alias.
Child = subprocess.Popen[bytes]


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def last_line(data: bytes) -> str:
    """The last non-empty line of a program's output, stripped, or ""."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    timeout: float = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    error: type[CommandError] = CommandError,
) -> Result:
    """Run a program to completion. Blocking: call it from a worker thread in async code."""
    args = tuple(os.fspath(a) for a in argv)
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(args, input=input, capture_output=True, timeout=timeout,
                              env=full_env, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise error(f"{args[0]}: not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{args[0]}: timed out after {timeout:g}s") from exc
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        detail = last_line(proc.stderr) or last_line(proc.stdout) or f"exit {proc.returncode}"
        raise error(f"{os.path.basename(args[0])} failed: {detail}")
    return result


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stderr_path: str | None = None,
    pass_fds: Sequence[int] = (),
    error: type[CommandError] = CommandError,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    new_session: bool = True,
) -> Child:
    """Start a long-lived child in its own session, stdin closed, stderr to a file or discarded.

    `stdin`, `stdout` and `stderr` may name open descriptors to use instead (stdout otherwise goes
    where stderr goes); `cwd` is its working directory; `new_session=False` keeps it in the
    caller's process group (killed with it)."""
    args = [os.fspath(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    err_target = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                stdout=err_target if stdout is None else stdout,
                                stderr=err_target if stderr is None else stderr,
                                env=full_env, start_new_session=new_session,
                                pass_fds=tuple(pass_fds), cwd=cwd)
    except FileNotFoundError as exc:
        raise error(f"{args[0]}: not installed") from exc
    finally:
        if stderr_path and not isinstance(err_target, int):
            err_target.close()


# A prefix for tools that parse tenant bytes but need no privilege beyond owning the file they
# work on (as uid 0): setpriv empties the capability bounding set, so the exec'd program runs as
# uid 0 with no capabilities at all, and no_new_privs keeps it from regaining any.
WITHOUT_CAPABILITIES = ("setpriv", "--no-new-privs", "--bounding-set", "-all", "--inh-caps",
                        "-all", "--")


def with_capabilities(*keep: str) -> tuple[str, ...]:
    """Like WITHOUT_CAPABILITIES, keeping the named capabilities (e.g. "sys_admin")."""
    bounding = ",".join(["-all", *(f"+{cap}" for cap in keep)])
    return ("setpriv", "--no-new-privs", "--bounding-set", bounding, "--inh-caps", "-all", "--")


# ---- process lifetime ----------------------------------------------------------------------------


class Ended(enum.Enum):
    """How `stop` ended a process."""

    EXITED = "exited"          # on its own (before or during the first wait)
    TERMINATED = "terminated"  # after SIGTERM
    KILLED = "killed"          # after SIGKILL
    STUCK = "stuck"            # still there after SIGKILL (uninterruptible sleep)


def alive(target: Child | int) -> bool:
    """Whether a process still runs: a child of ours (reaped here once it exited) or any pid
    (from /proc: a zombie or a vanished pid is not alive)."""
    if not isinstance(target, int):
        return target.poll() is None
    try:
        with open(f"/proc/{target}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X", b"x")


def stderr_tail(path: str | os.PathLike[str] | None, *, limit: int = 8192) -> str:
    """The last non-empty line of a log file (read from its last `limit` bytes), or ""."""
    if path is None or not os.fspath(path):
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            data = f.read()
    except OSError:
        return ""
    return last_line(data)


def wait(child: Child, timeout: float) -> int | None:
    """A child's exit status once it exits within `timeout` seconds, else None (blocking)."""
    try:
        return child.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        return None


def open_pidfd(target: Child | int) -> int | None:
    """A pidfd for the process, or None when it is gone (a child already reaped included)."""
    if not isinstance(target, int) and target.returncode is not None:
        return None
    pid = target if isinstance(target, int) else target.pid
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _plan(exit_wait: float, grace: float, kill_wait: float, term: signal.Signals
          ) -> list[tuple[signal.Signals | None, float, Ended]]:
    """The steps of a stop: (signal to send first, seconds to wait, outcome if it exits then).
    No `term` step when `grace` is 0: SIGKILL at once."""
    steps: list[tuple[signal.Signals | None, float, Ended]] = [(None, exit_wait, Ended.EXITED)]
    if grace > 0 and term != signal.SIGKILL:
        steps.append((term, grace, Ended.TERMINATED))
    steps.append((signal.SIGKILL, kill_wait, Ended.KILLED))
    return steps


def _send(target: Child | int, pidfd: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:  # a session leader we started: its pid is the group's id until it is reaped
            os.killpg(target if isinstance(target, int) else target.pid, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile; the wait that follows sees it


def _finish(target: Child | int, ended: Ended, group: bool) -> Ended:
    """After the process exited: kill what is left of its group, reap a child of ours."""
    if group:
        pid = target if isinstance(target, int) else target.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if ended is not Ended.STUCK and not isinstance(target, int):
        target.wait()  # it has exited: this only reaps it
    return ended


def _readable(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def stop(target: Child | int, *, exit_wait: float = 0.0, grace: float = 5.0,
         kill_wait: float = 5.0, group: bool = False, pidfd: int | None = None,
         term: signal.Signals = signal.SIGTERM) -> Ended:
    """Stop a process: wait up to `exit_wait` seconds for it to exit by itself, then SIGTERM (or
    `term`) and wait `grace` seconds, then SIGKILL and wait `kill_wait`. Blocking: a worker
    thread in async code.

    `group` signals the child's whole process group (it was spawned in a new session) and kills
    what is left of it at the end. `pidfd` (kept open: the caller closes it) is for a process we
    did not start, opened and checked by the caller before anything is signalled."""
    fd = pidfd if pidfd is not None else open_pidfd(target)
    if fd is None:
        return _finish(target, Ended.EXITED, group)
    try:
        for sig, seconds, outcome in _plan(exit_wait, grace, kill_wait, term):
            if sig is not None:
                _send(target, fd, sig, group)
            if _readable(fd, seconds):
                return _finish(target, outcome, group)
        return _finish(target, Ended.STUCK, group)
    finally:
        if pidfd is None:
            os.close(fd)


async def wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process behind `pidfd` has exited within `timeout` seconds (trio; the trio
    thread never blocks)."""
    import trio  # here, not at the top: the import worker uses this module without trio

    if _readable(pidfd, 0):
        return True
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


async def stop_async(target: Child | int, *, exit_wait: float = 0.0, grace: float = 5.0,
                     kill_wait: float = 5.0, group: bool = False, pidfd: int | None = None,
                     term: signal.Signals = signal.SIGTERM) -> Ended:
    """`stop` for trio callers: the waits are on the pidfd, so the trio thread never blocks."""
    import trio

    fd = pidfd if pidfd is not None else open_pidfd(target)
    if fd is None:
        return _finish(target, Ended.EXITED, group)
    try:
        for sig, seconds, outcome in _plan(exit_wait, grace, kill_wait, term):
            if sig is not None:
                _send(target, fd, sig, group)
            if await wait_pidfd(fd, seconds):
                return _finish(target, outcome, group)
        return _finish(target, Ended.STUCK, group)
    finally:
        if pidfd is None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
