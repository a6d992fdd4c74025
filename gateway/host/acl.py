"""POSIX access ACL entries that let one host uid traverse a directory (search permission only).

A user-namespace container resolves its rootfs path (RUN_DIR/rootfs/VOL) as its own root, which
on the host is the slice's first uid: it needs search permission on RUN_DIR/rootfs, which stays
0700 for everyone else. `allow_search(dir, uid)` adds `user:UID:--x` (and widens the mask to let
it act), `revoke_search(dir, uid)` removes it again. The ACL is read and written as the kernel's
system.posix_acl_access xattr (version 2: a header, then (tag, perm, id) entries sorted by tag
and id). Blocking (xattr syscalls on a local directory).
"""

from __future__ import annotations

import errno
import os
import struct

from gateway.errors import BackendError

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED = 0xFFFFFFFF
SEARCH = 0x1
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entry = tuple[int, int, int]  # (tag, perm, id)


class AclError(BackendError):
    """Reading or writing a directory's ACL failed."""


def decode(blob: bytes) -> list[Entry]:
    if len(blob) < _HEADER.size or (len(blob) - _HEADER.size) % _ENTRY.size:
        raise AclError("malformed POSIX ACL xattr")
    if _HEADER.unpack_from(blob)[0] != VERSION:
        raise AclError("unknown POSIX ACL xattr version")
    return [_ENTRY.unpack_from(blob, off) for off in range(_HEADER.size, len(blob), _ENTRY.size)]


def encode(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: (e[0], e[2]))
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in ordered)


def from_mode(mode: int) -> list[Entry]:
    """The minimal ACL a directory's mode bits stand for."""
    return [(USER_OBJ, (mode >> 6) & 7, UNDEFINED), (GROUP_OBJ, (mode >> 3) & 7, UNDEFINED),
            (OTHER, mode & 7, UNDEFINED)]


def with_user(entries: list[Entry], uid: int, perm: int | None) -> list[Entry]:
    """`entries` with uid's USER entry set to `perm` (None: removed) and the mask recomputed
    (the union of the group class); no mask at all when no named entry is left."""
    kept = [e for e in entries if e[0] != MASK and not (e[0] == USER and e[2] == uid)]
    if perm is not None:
        kept.append((USER, perm, uid))
    named = [e for e in kept if e[0] in (USER, GROUP)]
    if named:
        group_class = 0
        for tag, bits, _id in kept:
            if tag in (USER, GROUP, GROUP_OBJ):
                group_class |= bits
        kept.append((MASK, group_class, UNDEFINED))
    return kept


def _read(path: str) -> list[Entry]:
    try:
        return decode(os.getxattr(path, XATTR, follow_symlinks=False))
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return from_mode(os.lstat(path).st_mode)


def _change(path: str | os.PathLike[str], uid: int, perm: int | None) -> None:
    where = os.fspath(path)
    try:
        entries = _read(where)
        os.setxattr(where, XATTR, encode(with_user(entries, uid, perm)), follow_symlinks=False)
    except OSError as exc:
        raise AclError(f"ACL of {where} for uid {uid}: {exc.strerror}", errno=exc.errno) from exc


def allow_search(path: str | os.PathLike[str], uid: int) -> None:
    _change(path, uid, SEARCH)


def revoke_search(path: str | os.PathLike[str], uid: int) -> None:
    _change(path, uid, None)


def search_allowed(path: str | os.PathLike[str]) -> set[int]:
    """The uids with a named entry on `path` (for checks and tests)."""
    try:
        return {e[2] for e in _read(os.fspath(path)) if e[0] == USER}
    except OSError as exc:
        raise AclError(f"ACL of {path}: {exc.strerror}", errno=exc.errno) from exc
