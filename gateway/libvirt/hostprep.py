"""Host preparation libvirtd needs: its users, groups and directories, and shared mount points.

Mounts made after libvirtd started reach its private mount namespace only below a directory that
was a shared mount before it started; `ensure_shared` makes a directory such a mount point.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from gateway import command
from gateway.errors import CommandError

GROUPS = ("kvm", "libvirt-qemu")
USER = "libvirt-qemu"
DIRS = (Path("/var/log/libvirt/lxc"), Path("/var/run/libvirt"), Path("/var/lib/libvirt"),
        Path("/etc/libvirt/lxc"))


class HostPrepError(CommandError):
    """Preparing the host for libvirtd (users, groups, mounts) failed."""


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_accounts() -> None:
    """Create the groups `kvm`, `libvirt-qemu` and the user `libvirt-qemu` if missing."""
    for group in GROUPS:
        if not _group_exists(group):
            command.run(["groupadd", "--system", group], error=HostPrepError)
    if not _user_exists(USER):
        command.run(["useradd", "--system", "--gid", USER, "--groups", "kvm", "--no-create-home",
                     "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", USER],
                    error=HostPrepError)


def ensure_dirs() -> None:
    for d in DIRS:
        d.mkdir(parents=True, exist_ok=True)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_propagation(path: Path, mountinfo: str | None = None) -> str | None:
    """Propagation of the topmost mount at exactly `path`: "shared", "slave", "private" or None
    when `path` is not a mount point."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    target = os.path.realpath(path)
    found: str | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 7 or _unescape(fields[4]) != target:
            continue
        optional = fields[6:fields.index("-")] if "-" in fields else []
        if any(f.startswith("shared:") for f in optional):
            found = "shared"
        elif any(f.startswith("master:") for f in optional):
            found = "slave"
        else:
            found = "private"
    return found


def ensure_shared(path: Path) -> bool:
    """Make `path` a shared mount point (bind it onto itself first when it is not a mount point).
    Returns True when something changed."""
    path.mkdir(parents=True, exist_ok=True)
    state = mount_propagation(path)
    if state == "shared":
        return False
    if state is None:
        command.run(["mount", "--bind", path, path], error=HostPrepError)
    command.run(["mount", "--make-shared", path], error=HostPrepError)
    return True


def prepare_host(shared_dirs: list[Path]) -> None:
    """Everything libvirtd needs on this host; idempotent."""
    ensure_accounts()
    ensure_dirs()
    for d in shared_dirs:
        ensure_shared(d)
