"""The one place external programs are started.

Each program the gateway uses has its own thin wrapper module that calls `run` (or `spawn` for a
long-lived child) and maps failures to a typed error; nothing else calls subprocess directly.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import CommandError


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def _last_line(data: bytes) -> str:
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
        detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit {proc.returncode}"
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
) -> subprocess.Popen[bytes]:
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
