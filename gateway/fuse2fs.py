"""fuse2fs: an ext2/3/4 filesystem served in user space, so the host kernel never parses it.

start() runs `fuse2fs IMAGE TARGET -f -o ...` as a supervised child (we know its pid), waits until
the mount shows in /proc/self/mountinfo, and returns a Fuse2fs handle. stop() unmounts, waits for
the process to exit (fuse2fs writes its metadata back when it exits, so waiting matters) and kills
it if it does not. Options: allow_other (container processes must see files), default_permissions
(the kernel checks modes), nodev always, nosuid/noexec/ro per volume; fuse2fs's own defaults
(which include suid,dev when run by root) are disabled with no_default_opts.

fuse2fs 1.47 does not write the journal and failed on journal recovery combined with offset=, so
the gateway always hands it the rootfs window file (offset 0), never the whole disk.
Blocking calls: run them in worker threads, never on the trio thread serving the block view.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from gateway import command, mounts
from gateway.errors import BackendError, CommandError, Conflict, FormatError, InvalidArgument

PROGRAM = "fuse2fs"
SUPPORTED_FSTYPES = ("ext2", "ext3", "ext4")
FSNAME_PREFIX = "storage-gateway-fuse2fs"


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
    return [PROGRAM, image, target, "-f", "-o", ",".join(opts)]


def _is_fuse2fs_mount(target: str) -> bool:
    return any(m.fstype.startswith("fuse") for m in mounts.mounts_at(target))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


@dataclass
class Fuse2fs:
    image: str
    target: str
    pid: int
    read_only: bool
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _alive(self.pid)

    def mounted(self) -> bool:
        return _is_fuse2fs_mount(self.target)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None:
                try:
                    self.process.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
                    return True
                except subprocess.TimeoutExpired:
                    pass
            elif not _alive(self.pid):
                return True
            else:
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                return False

    def stop(self, *, timeout: float = 15.0, force: bool = False) -> None:
        """Unmount (lazily only with force), wait for exit (it writes back), kill if stuck."""
        if self.mounted():
            try:
                mounts.umount(self.target)
            except Conflict:
                if not force:
                    raise
                mounts.umount(self.target, lazy=True)
        if self._wait_exit(timeout):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if self._wait_exit(5.0):
                break
        if self.alive():
            raise Fuse2fsError(f"fuse2fs: pid {self.pid} for {self.target} would not exit")
        if not force:
            raise Fuse2fsError(f"fuse2fs: pid {self.pid} for {self.target} had to be killed; "
                               "its last writes may be lost")


def start(image: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str, *,
          read_only: bool = False, nosuid: bool = True, noexec: bool = False,
          timeout: float = 15.0, stderr_path: str | None = None) -> Fuse2fs:
    """Start fuse2fs over `image` mounted at `target`; returns once the mount is visible."""
    check_fstype(fstype)
    image_s = os.path.abspath(os.fspath(image))
    target_s = os.path.normpath(os.path.abspath(os.fspath(target)))
    if not os.path.isdir(target_s):
        raise InvalidArgument(f"fuse2fs: mount target {target_s} is not a directory")
    if mounts.is_mountpoint(target_s):
        raise Conflict(f"fuse2fs: {target_s} is already a mount point")
    argv = build_argv(image_s, target_s, read_only=read_only, nosuid=nosuid, noexec=noexec)
    proc = command.spawn(argv, stderr_path=stderr_path, error=CommandError)
    handle = Fuse2fs(image_s, target_s, proc.pid, read_only, proc)
    deadline = time.monotonic() + timeout
    delay = 0.001  # fuse2fs mounts in a few ms: poll fast first, then back off
    while not handle.mounted():
        if proc.poll() is not None:
            detail = _stderr_tail(stderr_path)
            raise Fuse2fsError(f"fuse2fs: exited with {proc.returncode} before mounting "
                               f"{target_s}{': ' + detail if detail else ''}")
        if time.monotonic() >= deadline:
            handle.stop(timeout=2.0, force=True)
            raise Fuse2fsError(f"fuse2fs: {target_s} not mounted after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return handle


def _stderr_tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def processes_under(path: str | os.PathLike[str]) -> dict[int, list[str]]:
    """fuse2fs processes whose image or mount target lies under `path`: {pid: argv}."""
    root = os.path.normpath(os.path.abspath(os.fspath(path))).rstrip("/") + "/"
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != PROGRAM or not _alive(int(entry)):
            continue
        if any(a.startswith(root) or a == root[:-1] for a in argv[1:]):
            found[int(entry)] = argv
    return found


def adopt(pid: int, target: str) -> Fuse2fs | None:
    """A handle on a fuse2fs left by a dead daemon, if `pid` still is that fuse2fs."""
    target_s = os.path.normpath(os.path.abspath(target))
    argv = processes_under(target_s).get(pid)
    if argv is None or target_s not in argv:
        return None
    opts = argv[argv.index("-o") + 1].split(",") if "-o" in argv[:-1] else []
    return Fuse2fs(argv[1] if len(argv) > 1 else "", target_s, pid, "ro" in opts, None)
