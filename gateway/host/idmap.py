"""Idmapped mounts (open_tree, mount_setattr, move_mount through ctypes) and user-namespace fds.

`user_namespace(idmap)` returns an fd of a new user namespace carrying the map, made without
forking the (threaded) caller: a tiny helper is started through gateway.command (`unshare --user`
running a shell that waits on its stdin), its uid_map and gid_map are written from here (root in
the parent namespace may write any map), /proc/PID/ns/user is opened, and the helper is let go.

`idmapped_bind(source, target, ...)` clones the mount at `source` detached (OPEN_TREE_CLONE),
sets the idmapping and the per-mount flags on the clone (the kernel's support check: EINVAL where
the filesystem cannot be idmapped, refused with a message naming the type) and only then moves
it to `target`. Nothing is attached at `target` unless every step before succeeded.

Blocking (the helper, mount syscalls): call from a worker thread, never from the thread serving
the gateway's FUSE block view (the source mount may sit on it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select

from gateway import command
from gateway.errors import BackendError, FormatError, GatewayError, NotFound, PermissionDenied
from gateway.userns.slices import IdMap

# x86_64 syscall numbers (Python's os module has none of these).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000

HELPER_TIMEOUT = 5.0  # seconds for `unshare --user` to report its namespace


class IdmapError(BackendError):
    """An idmapped-mount syscall or the user-namespace helper failed (`.errno` says why)."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _error(what: str, err: int) -> GatewayError:
    """The one place these syscalls' errnos become gateway errors (errno kept)."""
    kind: type[GatewayError] = {errno.ENOENT: NotFound,
                                errno.EPERM: PermissionDenied}.get(err, IdmapError)
    return kind(f"{what}: {os.strerror(err)}", errno=err)


def _open_tree(path: str | os.PathLike[str]) -> int:
    fd = _libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD),
                       ctypes.c_char_p(os.fsencode(path)),
                       ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE))
    if fd < 0:
        raise _error(f"open_tree {path}", ctypes.get_errno())
    return int(fd)


def _set_attr(fd: int, attr_set: int, userns_fd: int) -> int:
    """mount_setattr on the detached tree; 0 or the errno."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    rc = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(fd), ctypes.c_char_p(b""),
                       ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))
    return 0 if rc == 0 else ctypes.get_errno()


def _move_mount(fd: int, target: str | os.PathLike[str]) -> None:
    rc = _libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), ctypes.c_char_p(b""),
                       ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                       ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if rc != 0:
        raise _error(f"move_mount to {target}", ctypes.get_errno())


def _ns_link(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/user")


def _write_map(pid: int, name: str, text: str) -> None:
    path = f"/proc/{pid}/{name}"
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def user_namespace(idmap: IdMap, *, timeout: float = HELPER_TIMEOUT) -> int:
    """An O_RDONLY fd of a fresh user namespace mapping 0..count-1 to the slice (the caller
    closes it). The helper process is gone when this returns, whatever happened."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    helper: command.Child | None = None
    try:
        # The shell runs inside the new namespace: it says so, then waits for its stdin to close
        # (so it also ends if gatewayd dies meanwhile).
        helper = command.spawn(["unshare", "--user", "--", "/bin/sh", "-c", "echo; read _"],
                               stdin=hold_r, stdout=ready_w)
        os.close(ready_w)
        ready_w = -1
        poller = select.poll()
        poller.register(ready_r, select.POLLIN)
        if not poller.poll(int(timeout * 1000)) or not os.read(ready_r, 16):
            raise IdmapError(f"unshare --user did not start within {timeout:g}s")
        if _ns_link(helper.pid) == _ns_link("self"):
            raise IdmapError("unshare --user did not enter a new user namespace")
        _write_map(helper.pid, "uid_map", idmap.uid_map())
        _write_map(helper.pid, "gid_map", idmap.gid_map())
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _error("making a user namespace for uid "
                     f"{idmap.uid_first} gid {idmap.gid_first}", exc.errno or errno.EIO) from exc
    finally:
        for fd in (ready_r, ready_w, hold_r, hold_w):
            if fd >= 0:
                os.close(fd)
        if helper is not None:
            command.stop(helper, exit_wait=1.0, grace=1.0)


def idmapped_bind(source: str | os.PathLike[str], target: str | os.PathLike[str],
                  idmap: IdMap, *, fstype: str, read_only: bool = False, nosuid: bool = True,
                  noexec: bool = False) -> None:
    """An idmapped (and nodev) clone of the mount at `source`, attached at `target`. A
    filesystem the kernel cannot idmap is refused (FormatError naming `fstype`) before anything
    is attached."""
    userns = user_namespace(idmap)
    try:
        tree = _open_tree(source)
        try:
            flags = (MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV
                     | (MOUNT_ATTR_RDONLY if read_only else 0)
                     | (MOUNT_ATTR_NOSUID if nosuid else 0)
                     | (MOUNT_ATTR_NOEXEC if noexec else 0))
            err = _set_attr(tree, flags, userns)
            if err == errno.EINVAL:
                raise FormatError(f"the kernel cannot idmap a {fstype} mount (EINVAL): "
                                  f"--userns is not available for {fstype} in this mode",
                                  errno=err)
            if err:
                raise _error(f"mount_setattr (idmap) on a clone of {source}", err)
            _move_mount(tree, target)
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def is_idmapped(options: str) -> bool:
    """Whether a mountinfo per-mount options field marks an idmapped mount."""
    return "idmapped" in options.split(",")
