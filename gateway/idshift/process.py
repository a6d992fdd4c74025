"""The id-shifting layer as a process: start it, find it again, stop it (blocking; call from
worker threads, never from the thread serving the gateway's block view).

start() runs `python -m gateway.idshift SOURCE TARGET ...` through gateway.command with only the
capabilities a root passthrough needs (mount, chown, and reading and writing every file of the
source), waits until TARGET shows as its FUSE mount and returns a `Layer`. A layer left by a
dead gatewayd is trusted (`identify`) only when it runs as root, its executable is this
interpreter and its argv is `-m gateway.idshift`; an adopted handle is confined to a directory
(the run dir's rootfs root) and re-checks its pid before any signal, as fuse2fs handles do.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field

from gateway import command
from gateway.errors import BackendError, CommandError, Conflict, InvalidArgument
from gateway.host import mounts, procs
from gateway.idshift import FSNAME
from gateway.userns.slices import IdMap

__all__ = ["FSNAME", "IdshiftError", "Layer", "Process", "adopt", "build_argv", "identify",
           "processes_mounted_under", "start", "trusted_processes"]

MODULE = "gateway.idshift"
CAPABILITIES = ("sys_admin", "chown", "fowner", "fsetid", "dac_override", "dac_read_search")
STOP_GRACE = 5.0


class IdshiftError(BackendError):
    """The id-shifting layer failed to start, died, or would not stop."""


@functools.cache
def interpreter() -> str:
    return os.path.realpath(sys.executable)


def build_argv(source: str, target: str, ids: IdMap, *, read_only: bool, nosuid: bool,
               noexec: bool) -> list[str]:
    opts = [o for o, on in (("ro", read_only), ("noexec", noexec), ("suid", not nosuid)) if on]
    return [*command.with_capabilities(*CAPABILITIES), sys.executable, "-m", MODULE, source,
            target, "--uid-first", str(ids.uid_first), "--gid-first", str(ids.gid_first),
            "--count", str(ids.count), *(["-o", ",".join(opts)] if opts else [])]


@dataclass(frozen=True)
class Process:
    """A running layer the gateway may trust, and where it serves."""

    pid: int
    source: str
    target: str


def identify(pid: int) -> Process | None:
    """The trusted layer at `pid`, or None (another program or owner, or gone)."""
    if pid <= 1:
        return None
    try:
        if os.readlink(f"/proc/{pid}/exe") not in (interpreter(), interpreter() + " (deleted)"):
            return None
        if not procs.root_owned(pid):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if argv[1:3] != ["-m", MODULE] or len(argv) < 5 or not command.alive(pid):
        return None
    return Process(pid, procs.norm(os.path.join(cwd, argv[3])),
                   procs.norm(os.path.join(cwd, argv[4])))


def trusted_processes() -> list[Process]:
    return procs.scan(identify)


def processes_mounted_under(path: str | os.PathLike[str]) -> dict[int, Process]:
    """Trusted layers whose target is `path` or lies below it."""
    root = procs.norm(path)
    return {p.pid: p for p in trusted_processes() if procs.within(p.target, root, inclusive=True)}


def _is_layer_mount(target: str) -> bool:
    return any(m.fstype.startswith("fuse") and m.source == FSNAME
               for m in mounts.mounts_at(target))


@dataclass
class Layer:
    source: str
    target: str
    pid: int
    process: command.Child | None = field(default=None, repr=False)
    confine: str | None = None  # stop() unmounts only targets below it (set on adoption)

    def _ours(self) -> bool:
        found = identify(self.pid)
        return found is not None and found.target == self.target

    def alive(self) -> bool:
        if self.process is not None:
            return command.alive(self.process)
        return self._ours()

    def mounted(self) -> bool:
        return _is_layer_mount(self.target)

    def _end(self, timeout: float) -> command.Ended:
        if self.process is not None:
            return command.stop(self.process, exit_wait=timeout, grace=STOP_GRACE,
                                kill_wait=STOP_GRACE)
        pidfd = command.open_pidfd(self.pid)
        if pidfd is None:
            return command.Ended.EXITED
        try:
            if not self._ours():
                return command.Ended.EXITED
            return command.stop(self.pid, exit_wait=timeout, grace=STOP_GRACE,
                                kill_wait=STOP_GRACE, pidfd=pidfd)
        finally:
            os.close(pidfd)

    def stop(self, *, timeout: float = 10.0, force: bool = False) -> None:
        """Unmount (lazily only with force), then wait for the exit: the layer ends with its
        mount. It holds no data of its own, so a kill loses nothing but is still reported."""
        if self.confine is not None and not procs.within(self.target, self.confine):
            raise IdshiftError(f"idshift: refusing to stop pid {self.pid}: its target "
                               f"{self.target} is outside {self.confine}")
        if self.mounted():
            try:
                mounts.umount(self.target)
            except Conflict:
                if not force:
                    raise
                mounts.umount(self.target, lazy=True)
        ended = self._end(timeout)
        if ended is command.Ended.STUCK:
            raise IdshiftError(f"idshift: pid {self.pid} for {self.target} would not exit")


def start(source: str | os.PathLike[str], target: str | os.PathLike[str], ids: IdMap, *,
          read_only: bool = False, nosuid: bool = True, noexec: bool = False,
          timeout: float = 15.0, stderr_path: str | None = None,
          confine: str | os.PathLike[str] | None = None) -> Layer:
    """Serve `source` at `target` shifted by `ids`; returns once the mount is visible."""
    source_s, target_s = procs.norm(source), procs.norm(target)
    confine_s = procs.norm(confine) if confine is not None else None
    if confine_s is not None and not procs.within(target_s, confine_s):
        raise InvalidArgument(f"idshift: mount target {target_s} is outside {confine_s}")
    if not os.path.isdir(target_s):
        raise InvalidArgument(f"idshift: mount target {target_s} is not a directory")
    if mounts.is_mountpoint(target_s):
        raise Conflict(f"idshift: {target_s} is already a mount point")
    argv = build_argv(source_s, target_s, ids, read_only=read_only, nosuid=nosuid,
                      noexec=noexec)
    proc = command.spawn(argv, stderr_path=stderr_path, error=CommandError)
    layer = Layer(source_s, target_s, proc.pid, proc, confine=confine_s)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not layer.mounted():
        if not command.alive(proc):
            detail = command.stderr_tail(stderr_path)
            raise IdshiftError(f"idshift: exited with {proc.returncode} before mounting "
                               f"{target_s}{': ' + detail if detail else ''}")
        if time.monotonic() >= deadline:
            layer.stop(timeout=2.0, force=True)
            raise IdshiftError(f"idshift: {target_s} not mounted after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return layer


def adopt(pid: int, target: str | os.PathLike[str], *,
          confine: str | os.PathLike[str]) -> Layer | None:
    """A handle on a layer a dead gatewayd left, if `pid` still is a trusted layer serving
    `target` and `target` lies below `confine`."""
    target_s, confine_s = procs.norm(target), procs.norm(confine)
    if not procs.within(target_s, confine_s):
        return None
    found = identify(pid)
    if found is None or found.target != target_s:
        return None
    return Layer(found.source, target_s, pid, None, confine=confine_s)
