"""mount(2) and umount2(2) through ctypes, and a /proc/self/mountinfo parser.

Blocking calls: never run them on the trio thread that serves the block view (deadlock rule).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass

from gateway.errors import BackendError, Conflict, GatewayError, NotFound, PermissionDenied

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

MOUNTINFO = "/proc/self/mountinfo"


class MountError(BackendError):
    """mount(2)/umount2(2) failed with an errno that has no better code (`.errno` says which)."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


# errnos with a code of their own; every other errno is a MountError (backend-error)
_ERRNO_ERRORS: dict[int, type[GatewayError]] = {
    errno.EBUSY: Conflict, errno.ENOENT: NotFound, errno.EPERM: PermissionDenied,
}


def _error(what: str, err: int) -> GatewayError:
    """The one place a mount(2)/umount2(2) errno becomes a gateway error (errno kept)."""
    return _ERRNO_ERRORS.get(err, MountError)(f"{what}: {os.strerror(err)}", errno=err)


def _enc(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | os.PathLike[str] | None, target: str | os.PathLike[str],
          fstype: str | None, flags: int = MS_NODEV, data: str | None = None) -> None:
    """mount(2). Callers pass MS_NODEV (the default) unless they know better."""
    data_b = _enc(data)
    rc = _libc.mount(_enc(source), _enc(target), _enc(fstype), flags,
                     ctypes.c_char_p(data_b) if data_b is not None else None)
    if rc != 0:
        raise _error(f"mount {source} on {target} ({fstype})", ctypes.get_errno())


def bind(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
         read_only: bool = False, nodev: bool = True, nosuid: bool = False,
         noexec: bool = False, recursive: bool = False) -> None:
    """Bind mount, then remount with the per-mount flags (a bind ignores them otherwise)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    flags = ((MS_RDONLY if read_only else 0) | (MS_NODEV if nodev else 0)
             | (MS_NOSUID if nosuid else 0) | (MS_NOEXEC if noexec else 0))
    if flags:
        try:
            mount(None, target, None, MS_BIND | MS_REMOUNT | flags)
        except BaseException:
            umount(target, lazy=True)
            raise


def make_shared(target: str | os.PathLike[str]) -> None:
    mount(None, target, None, MS_SHARED)


def make_private(target: str | os.PathLike[str]) -> None:
    mount(None, target, None, MS_PRIVATE)


def umount(target: str | os.PathLike[str], *, lazy: bool = False, force: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0) | (MNT_FORCE if force else 0)
    if _libc.umount2(_enc(target), flags) != 0:
        raise _error(f"umount {target}", ctypes.get_errno())


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: str
    propagation: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def shared(self) -> bool:
        return any(p.startswith("shared:") for p in self.propagation)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    result: list[MountInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(" ")
        sep = fields.index("-", 6)
        fstype, source, super_options = [*fields[sep + 1:sep + 4], "", "", ""][:3]
        result.append(MountInfo(
            mount_id=int(fields[0]), parent_id=int(fields[1]), major_minor=fields[2],
            root=unescape(fields[3]), mount_point=unescape(fields[4]), options=fields[5],
            propagation=tuple(fields[6:sep]), fstype=fstype, source=unescape(source),
            super_options=super_options))
    return result


def mountinfo() -> list[MountInfo]:
    with open(MOUNTINFO, "rb") as f:
        return parse_mountinfo(os.fsdecode(f.read()))


def _norm(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def mounts_at(path: str | os.PathLike[str]) -> list[MountInfo]:
    target = _norm(path)
    return [m for m in mountinfo() if m.mount_point == target]


def mounts_under(path: str | os.PathLike[str]) -> list[MountInfo]:
    """Mounts at `path` or below it, deepest first (the order to unmount them)."""
    root = _norm(path)
    prefix = root.rstrip("/") + "/"
    found = [m for m in mountinfo() if m.mount_point == root or m.mount_point.startswith(prefix)]
    return sorted(found, key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    return bool(mounts_at(path))
