"""fuse2fs: an ext2/3/4 filesystem served in user space, so the host kernel never parses it.

start() runs `fuse2fs IMAGE TARGET -f -o ...` as a supervised child (we know its pid), waits until
the mount shows in /proc/self/mountinfo, and returns a Fuse2fs handle. stop() unmounts, waits for
the process to exit (fuse2fs writes its metadata back when it exits, so waiting matters) and kills
it if it does not. Options: allow_other (container processes must see files), default_permissions
(the kernel checks modes), nodev always, nosuid/noexec/ro per volume; fuse2fs's own defaults
(which include suid,dev when run by root) are disabled with no_default_opts.

fuse2fs 1.47 does not write the journal and failed on journal recovery combined with offset=, so
the gateway always hands it the rootfs window file (offset 0), never the whole disk.

Finding fuse2fs processes (after a crash): argv is whatever a process says it is, so only a
process whose real and effective uid are 0 and whose executable (/proc/PID/exe) is the real
fuse2fs binary is trusted (`identify`). An adopted handle is confined to a directory (the run
dir's rootfs root, or its mnt root where fuse2fs serves the id-shifting layer of a user-namespace
rootfs): it never unmounts a target outside it, and re-checks the pid before a signal.
Blocking calls: run them in worker threads, never on the trio thread serving the block view.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass, field

from gateway import command
from gateway.errors import BackendError, CommandError, Conflict, FormatError, InvalidArgument
from gateway.host import mounts, procs

PROGRAM = "fuse2fs"
SUPPORTED_FSTYPES = ("ext2", "ext3", "ext4")
FSNAME_PREFIX = "storage-gateway-fuse2fs"
STOP_GRACE = 5.0  # seconds to wait after SIGTERM, and after SIGKILL


class Fuse2fsError(BackendError):
    """fuse2fs failed to start, died, or would not stop."""


def check_fstype(fstype: str) -> None:
    if fstype not in SUPPORTED_FSTYPES:
        raise FormatError(f"fuse2fs: filesystem type {fstype!r} is not supported in fuse mode "
                          f"(only {', '.join(SUPPORTED_FSTYPES)})")


def build_argv(image: str, target: str, *, read_only: bool, nosuid: bool = True,
               noexec: bool = False, fsname: str = FSNAME_PREFIX) -> list[str]:
    opts = ["no_default_opts", "allow_other", "default_permissions", "nodev",
            f"fsname={fsname}"]
    if nosuid:
        opts.append("nosuid")
    if noexec:
        opts.append("noexec")
    if read_only:
        opts.append("ro")
    # fuse2fs parses tenant bytes as uid 0: it keeps only CAP_SYS_ADMIN, which it needs to mount
    # (libfuse 2 cannot take a prepared /dev/fuse fd), and can never gain more (no_new_privs).
    return [*command.with_capabilities("sys_admin"), PROGRAM, image, target, "-f", "-o",
            ",".join(opts)]


def _is_fuse2fs_mount(target: str) -> bool:
    return any(m.fstype.startswith("fuse") for m in mounts.mounts_at(target))


@functools.cache
def real_program() -> str | None:
    """The real path of the fuse2fs on $PATH (looked up once), or None when none is installed."""
    found = shutil.which(PROGRAM)
    return os.path.realpath(found) if found else None


def _positional(argv: list[str]) -> list[str]:
    """fuse2fs's positional arguments (image, mount point), skipping options and their values."""
    found: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "-o":
            next(args, None)
        elif not arg.startswith("-"):
            found.append(arg)
    return found


@dataclass(frozen=True)
class Process:
    """A running fuse2fs the gateway may trust: root's, and the real binary."""

    pid: int
    argv: tuple[str, ...]
    image: str | None
    target: str | None

    @property
    def read_only(self) -> bool:
        opts = [o for i, a in enumerate(self.argv[:-1]) if a == "-o"
                for o in self.argv[i + 1].split(",")]
        return "ro" in opts


def identify(pid: int) -> Process | None:
    """The trusted fuse2fs at `pid`, or None: another program, another owner, or gone.

    Trusted means real and effective uid 0 and /proc/PID/exe being the real fuse2fs binary (or
    that binary replaced by an upgrade since it started). Relative paths in its argv are read
    against its own working directory."""
    program = real_program()
    if program is None or pid <= 0:
        return None
    try:
        if os.readlink(f"/proc/{pid}/exe") not in (program, program + " (deleted)"):
            return None
        if not procs.root_owned(pid):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if not argv or not command.alive(pid):
        return None
    paths = [procs.norm(os.path.join(cwd, a)) for a in _positional(argv)]
    return Process(pid, tuple(argv), paths[0] if paths else None,
                   paths[1] if len(paths) > 1 else None)


def trusted_processes() -> list[Process]:
    """Every trusted fuse2fs on the host (see `identify`)."""
    return procs.scan(identify)


@dataclass
class Fuse2fs:
    image: str
    target: str
    pid: int
    read_only: bool
    process: command.Child | None = field(default=None, repr=False)
    # The directory the target must lie in for stop() to unmount it (always set on adoption).
    confine: str | None = None

    def _ours(self) -> bool:
        """For an adopted handle: `pid` still is the trusted fuse2fs mounted at `target`."""
        found = identify(self.pid)
        return found is not None and found.target == self.target

    def alive(self) -> bool:
        if self.process is not None:
            return command.alive(self.process)
        return self._ours()

    def mounted(self) -> bool:
        return _is_fuse2fs_mount(self.target)

    def _end(self, timeout: float) -> command.Ended:
        """Wait `timeout` for the exit, then SIGTERM, then SIGKILL (command.stop). An adopted
        pid is pinned by a pidfd and checked once through it, so no signal reaches a process
        that took over the pid after fuse2fs exited."""
        if self.process is not None:
            return command.stop(self.process, exit_wait=timeout, grace=STOP_GRACE,
                                kill_wait=STOP_GRACE)
        pidfd = command.open_pidfd(self.pid)
        if pidfd is None:
            return command.Ended.EXITED
        try:
            if not self._ours():
                return command.Ended.EXITED  # exited, and the pid may be someone else's by now
            return command.stop(self.pid, exit_wait=timeout, grace=STOP_GRACE,
                                kill_wait=STOP_GRACE, pidfd=pidfd)
        finally:
            os.close(pidfd)

    def stop(self, *, timeout: float = 15.0, force: bool = False) -> None:
        """Unmount (lazily only with force), wait for exit (it writes back), kill if stuck.

        An adopted handle refuses a target outside its confining directory, and signals its pid
        only while that still is the trusted fuse2fs at its target."""
        if self.confine is not None and not procs.within(self.target, self.confine):
            raise Fuse2fsError(f"fuse2fs: refusing to stop pid {self.pid}: its target "
                               f"{self.target} is outside {self.confine}")
        if self.mounted():
            try:
                mounts.umount(self.target)
            except Conflict:
                if not force:
                    raise
                mounts.umount(self.target, lazy=True)
        ended = self._end(timeout)
        if ended is command.Ended.EXITED:
            return
        if ended is command.Ended.STUCK:
            raise Fuse2fsError(f"fuse2fs: pid {self.pid} for {self.target} would not exit")
        if not force:
            raise Fuse2fsError(f"fuse2fs: pid {self.pid} for {self.target} had to be killed; "
                               "its last writes may be lost")


def start(image: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str, *,
          read_only: bool = False, nosuid: bool = True, noexec: bool = False,
          timeout: float = 15.0, stderr_path: str | None = None,
          confine: str | os.PathLike[str] | None = None) -> Fuse2fs:
    """Start fuse2fs over `image` mounted at `target`; returns once the mount is visible.
    `confine` (the run dir's rootfs root) refuses a target outside it, now and at stop()."""
    check_fstype(fstype)
    image_s = os.path.abspath(os.fspath(image))
    target_s = os.path.normpath(os.path.abspath(os.fspath(target)))
    confine_s = procs.norm(confine) if confine is not None else None
    if confine_s is not None and not procs.within(target_s, confine_s):
        raise InvalidArgument(f"fuse2fs: mount target {target_s} is outside {confine_s}")
    if not os.path.isdir(target_s):
        raise InvalidArgument(f"fuse2fs: mount target {target_s} is not a directory")
    if mounts.is_mountpoint(target_s):
        raise Conflict(f"fuse2fs: {target_s} is already a mount point")
    argv = build_argv(image_s, target_s, read_only=read_only, nosuid=nosuid, noexec=noexec)
    proc = command.spawn(argv, stderr_path=stderr_path, error=CommandError)
    handle = Fuse2fs(image_s, target_s, proc.pid, read_only, proc, confine=confine_s)
    deadline = time.monotonic() + timeout
    delay = 0.001  # fuse2fs mounts in a few ms: poll fast first, then back off
    while not handle.mounted():
        if not command.alive(proc):
            detail = command.stderr_tail(stderr_path)
            raise Fuse2fsError(f"fuse2fs: exited with {proc.returncode} before mounting "
                               f"{target_s}{': ' + detail if detail else ''}")
        if time.monotonic() >= deadline:
            handle.stop(timeout=2.0, force=True)
            raise Fuse2fsError(f"fuse2fs: {target_s} not mounted after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return handle


def processes_under(path: str | os.PathLike[str]) -> dict[int, list[str]]:
    """Trusted fuse2fs processes whose image or mount target lies under `path`: {pid: argv}."""
    root = procs.norm(path)
    return {p.pid: list(p.argv) for p in trusted_processes()
            if any(a is not None and procs.within(a, root, inclusive=True)
                   for a in (p.image, p.target))}


def processes_mounted_under(path: str | os.PathLike[str]) -> dict[int, Process]:
    """Trusted fuse2fs processes whose mount target is `path` or lies below it."""
    root = procs.norm(path)
    return {p.pid: p for p in trusted_processes()
            if p.target is not None and procs.within(p.target, root, inclusive=True)}


def adopt(pid: int, target: str | os.PathLike[str], *,
          confine: str | os.PathLike[str]) -> Fuse2fs | None:
    """A handle on a fuse2fs left by a dead daemon, if `pid` still is a trusted fuse2fs mounted
    at `target` and `target` lies below `confine` (the run dir's rootfs root)."""
    target_s, confine_s = procs.norm(target), procs.norm(confine)
    if not procs.within(target_s, confine_s):
        return None
    found = identify(pid)
    if found is None or found.target != target_s:
        return None
    return Fuse2fs(found.image or "", target_s, pid, found.read_only, None, confine=confine_s)
