"""The id-shifting passthrough: a pyfuse3 filesystem over a source directory (fuse2fs's mount).

Each inode the kernel knows is held as an O_PATH fd on the source (`_Node`, keyed by the
source's inode number, the source's root as FUSE's root), so renames and hard links need no path
bookkeeping; every call works relative to those fds. Owners are shifted by `Shift` both ways:
attributes show host ids, and what a caller creates is chowned to its disk ids (the layer
itself runs as root). The kernel checks permissions against the shifted attributes
(default_permissions), as the caller's host credentials.

Refused here: block and character device nodes (EPERM), and the xattrs that carry ids (POSIX
ACLs, file capabilities): reading them finds none, writing them is not supported.

One process serves one volume; handlers run on the trio thread and call the source directly:
this process serves no other FUSE filesystem of the gateway, so nothing here waits on itself.
Errors: OSError and Unmapped become the FUSE request's errno (`_handler`, the one boundary).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from gateway.idshift.shift import Shift, Unmapped

log = logging.getLogger("gateway.idshift")

ATTR_TIMEOUT = 1.0  # seconds the kernel keeps attributes and names (only this layer writes)
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
# xattrs whose values hold ids: not passed through either way
ID_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default", b"security.capability")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): the inode an O_PATH fd holds, symlinks included."""
    _check(_libc.fchownat(fd, b"", ctypes.c_uint(uid & 0xFFFFFFFF),
                          ctypes.c_uint(gid & 0xFFFFFFFF), AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def _utimes_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[slot] = _Timespec(0, UTIME_OMIT)
        else:
            times[slot] = _Timespec(value // 10**9, value % 10**9)
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def _renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir, old, new_dir, new, ctypes.c_uint(flags)))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


P = ParamSpec("P")
R = TypeVar("R")


def _handler(func: Callable[P, Coroutine[Any, Any, R]]
             ) -> Callable[P, Coroutine[Any, Any, R]]:
    """The adapter boundary: OSError and Unmapped answer with their errno, anything else EIO."""
    @functools.wraps(func)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (OSError, Unmapped) as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("idshift: %s failed", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapped


@dataclass
class _Node:
    fd: int  # O_PATH | O_NOFOLLOW on the source
    lookups: int


class ShiftFs(pyfuse3.Operations):
    """Passthrough of `source` with owners shifted by `shift`."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, source: str, shift: Shift) -> None:
        super().__init__()
        self.shift = shift
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_ino = os.fstat(root_fd).st_ino
        self.nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node(root_fd, 1)}
        self.dirs: dict[int, tuple[int, list[bytes]]] = {}  # fh -> (fd, names)

    # ---- inodes ---------------------------------------------------------------------------

    def _ino(self, source_ino: int) -> int:
        return pyfuse3.ROOT_INODE if source_ino == self.root_ino else source_ino

    def _fd(self, inode: int) -> int:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node.fd

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._ino(st.st_ino)
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = self.shift.host_uid(st.st_uid)
        entry.st_gid = self.shift.host_gid(st.st_gid)
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _remember(self, fd: int) -> pyfuse3.EntryAttributes:
        """Count one lookup of the inode `fd` (an O_PATH fd this call owns) holds."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        ino = self._ino(st.st_ino)
        node = self.nodes.get(ino)
        if node is None:
            self.nodes[ino] = _Node(fd, 1)
        else:
            node.lookups += 1
            os.close(fd)
        return self._attrs(st)

    def _open_path(self, parent: int, name: bytes) -> int:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd(parent))

    def _owner(self, parent_fd: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """Disk ids for a new entry: the caller's, or the directory's group when it is setgid."""
        uid = self.shift.owner_uid(ctx.uid)
        parent = os.fstat(parent_fd)
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else self.shift.owner_gid(ctx.gid)
        return uid, gid

    def _made(self, parent: int, name: bytes, owner: tuple[int, int]) -> pyfuse3.EntryAttributes:
        fd = self._open_path(parent, name)
        try:
            _chown_fd(fd, *owner)
        except OSError:
            os.close(fd)
            raise
        return self._remember(fd)

    @_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(self._open_path(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is None or inode == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self.nodes[inode]
                os.close(node.fd)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(os.fstat(self._fd(inode)))

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fd = self._fd(inode)
        link = stat.S_ISLNK(os.fstat(fd).st_mode)
        if fields.update_uid or fields.update_gid:
            uid = self.shift.chown_uid(attr.st_uid) if fields.update_uid else -1
            gid = self.shift.chown_gid(attr.st_gid) if fields.update_gid else -1
            _chown_fd(fd, uid, gid)
        if fields.update_mode and not link:
            os.chmod(_proc(fd), stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(_proc(fd), attr.st_size)
        if fields.update_atime or fields.update_mtime:
            _utimes_fd(fd, attr.st_atime_ns if fields.update_atime else None,
                       attr.st_mtime_ns if fields.update_mtime else None)
        return self._attrs(os.fstat(fd))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self._fd(inode))

    # ---- names ----------------------------------------------------------------------------

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # device files stay refused (nodev policy)
        parent = self._fd(parent_inode)
        owner = self._owner(parent, ctx)
        os.mknod(name, mode, 0, dir_fd=parent)
        return self._made(parent_inode, name, owner)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._fd(parent_inode)
        owner = self._owner(parent, ctx)
        os.mkdir(name, mode, dir_fd=parent)
        return self._made(parent_inode, name, owner)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._fd(parent_inode)
        owner = self._owner(parent, ctx)
        os.symlink(target, name, dir_fd=parent)
        return self._made(parent_inode, name, owner)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.link(_proc(self._fd(inode)), new_name, dst_dir_fd=self._fd(new_parent_inode),
                follow_symlinks=True)
        return self._remember(self._open_path(new_parent_inode, new_name))

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(name, dir_fd=self._fd(parent_inode))

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(name, dir_fd=self._fd(parent_inode))

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        _renameat2(self._fd(parent_inode_old), name_old, self._fd(parent_inode_new), name_new,
                   flags)

    # ---- files ----------------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        fd = os.open(_proc(self._fd(inode)), flags | os.O_CLOEXEC)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._fd(parent_inode)
        owner = self._owner(parent, ctx)
        flags &= ~(os.O_NOCTTY | os.O_APPEND)
        # the kernel asks only after a lookup found nothing: never chown a file that was there
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=parent)
        try:
            os.fchown(fd, *owner)
            path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            entry = self._remember(path_fd)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    @_handler
    async def flush(self, fh: int) -> None:
        return None

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @_handler
    async def release(self, fh: int) -> None:
        os.close(fh)

    # ---- directories ----------------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = os.open(_proc(self._fd(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        except BaseException:
            os.close(fd)
            raise
        self.dirs[fd] = (fd, names)
        return fd

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        fd, names = self.dirs[fh]
        for index in range(start_id, len(names)):
            try:
                entry_fd = os.open(names[index], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=fd)
            except FileNotFoundError:
                continue  # removed since opendir
            try:
                st = os.fstat(entry_fd)
            except OSError:
                os.close(entry_fd)
                continue
            if not pyfuse3.readdir_reply(token, names[index], self._attrs(st), index + 1):
                os.close(entry_fd)
                return
            self._remember(entry_fd)

    @_handler
    async def releasedir(self, fh: int) -> None:
        fd, _names = self.dirs.pop(fh)
        os.close(fd)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        os.fsync(self.dirs[fh][0])

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        found = os.fstatvfs(self._fd(pyfuse3.ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(found, name))
        return out

    # ---- xattrs ---------------------------------------------------------------------------

    def _xattr_path(self, inode: int) -> str:
        fd = self._fd(inode)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        return _proc(fd)

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name in ID_XATTRS:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return os.getxattr(self._xattr_path(inode), name)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if name in ID_XATTRS:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        os.setxattr(self._xattr_path(inode), name, value)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        try:
            path = self._xattr_path(inode)
        except pyfuse3.FUSEError:
            return []
        return [os.fsencode(n) for n in os.listxattr(path) if os.fsencode(n) not in ID_XATTRS]

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in ID_XATTRS:
            raise pyfuse3.FUSEError(errno.ENODATA)
        os.removexattr(self._xattr_path(inode), name)

