"""The admin socket opened to the tenant group: one named-group entry `group:GID:rw-` in the
socket's POSIX access ACL, so that its owner group stays the admin group (connect(2) on a Unix
socket needs write permission, which the ACL grants). Blocking (xattr syscalls on a local file),
called once when the socket is made."""

from __future__ import annotations

import os

from gateway.host import acl

READ_WRITE = 0x6


def with_group(entries: list[acl.Entry], gid: int, perm: int) -> list[acl.Entry]:
    """`entries` with gid's named GROUP entry set to `perm` and the mask recomputed (the union of
    the group class)."""
    kept = [e for e in entries if e[0] != acl.MASK and not (e[0] == acl.GROUP and e[2] == gid)]
    kept.append((acl.GROUP, perm, gid))
    group_class = 0
    for tag, bits, _id in kept:
        if tag in (acl.USER, acl.GROUP, acl.GROUP_OBJ):
            group_class |= bits
    return [*kept, (acl.MASK, group_class, acl.UNDEFINED)]


def admit_group(path: str | os.PathLike[str], gid: int) -> None:
    """Let the members of group `gid` connect to the socket at `path`."""
    where = os.fspath(path)
    try:
        entries = acl.from_mode(os.lstat(where).st_mode)
        os.setxattr(where, acl.XATTR, acl.encode(with_group(entries, gid, READ_WRITE)),
                    follow_symlinks=False)
    except OSError as exc:
        raise acl.AclError(f"opening {where} to group {gid}: {exc.strerror}",
                           errno=exc.errno) from exc


def admitted_groups(path: str | os.PathLike[str]) -> set[int]:
    """The gids with a named entry in the socket's ACL (for checks and tests)."""
    try:
        blob = os.getxattr(os.fspath(path), acl.XATTR, follow_symlinks=False)
    except OSError:
        return set()
    return {e[2] for e in acl.decode(blob) if e[0] == acl.GROUP}
