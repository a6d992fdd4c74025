"""The block view: a pyfuse3 filesystem exposing each volume's disk and rootfs window as files.

Layout under the mountpoint (RUN_DIR/blk)::

    NAME/disk     the whole virtual disk (size = backend.size)
    NAME/rootfs   only the rootfs window [start, start+size), present after set_window()

Access: every file is owned by root, mode 0600 (0400 for read-only volumes), with
`default_permissions` so the kernel checks modes. Root bypasses mode bits, so `open` itself refuses
write access to read-only volumes with EROFS. `allow_other` is not set: loop and fuse2fs run as
root. Files are opened with `direct_io`: the page cache is not doubled under loop (the loop's
upper filesystem already caches), and a write returns only after the backend accepted it, so
nothing is lost in the FUSE page cache when the daemon dies.

Sizes are exact; reads past the end are short or empty; a write starting at or past the end fails
with ENOSPC (a write crossing the end is cut short, as on a block device).

remove_volume() semantics: it refuses (Conflict) while files of the volume are open, waiting up to
a timeout for handles to be released first, because loop devices release their file
asynchronously. With force=True it detaches anyway and open handles then fail with EIO.

pyfuse3 supports one mounted filesystem per process; a second BlockView.run() raises Conflict.
The trio thread running pyfuse3.main() must never call mount(2), loop ioctls, fuse2fs or read the
filesystems layered on these files: use worker threads or subprocesses for that.

Errors: every FUSE handler goes through one wrapper (`_handler`), the adapter boundary: a
FUSEError passes as it is; any other exception becomes FUSEError(its positive `errno`, else EIO)
and is logged once (a GatewayError or OSError as a warning, anything else, a bug, with its
traceback). trio.Cancelled, KeyboardInterrupt and other BaseExceptions pass through untouched.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from gateway.errors import AlreadyExists, Conflict, GatewayError, InvalidArgument, NotFound
from gateway.fuse.backend import BlockBackend

log = logging.getLogger(__name__)

FSNAME = "storage-gateway"
# Request size: libfuse 3 negotiates max_write = 1 MiB (FUSE_MAX_PAGES, 256 pages) by default and
# leaves max_read unlimited, so both directions already reach 1 MiB per request. Passing
# `max_read=` as a mount option breaks pyfuse3's init ("requested different maximum read size").
DISK = "disk"
ROOTFS = "rootfs"

_active = False  # pyfuse3 holds one session per process


@dataclass
class _Window:
    start: int
    size: int


@dataclass
class _Volume:
    name: str
    backend: BlockBackend
    dir_ino: int
    disk_ino: int
    rootfs_ino: int
    window: _Window | None = None
    open_handles: set[int] = field(default_factory=set)


@dataclass
class _Handle:
    volume: _Volume
    kind: str  # DISK or ROOTFS
    start: int
    size: int
    writable: bool
    detached: bool = False


def _fuse_errno(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and not isinstance(code, bool) and code > 0:
        return code
    return errno.EIO


P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[Concatenate["BlockView", P], Awaitable[R]]
Wrapped = Callable[Concatenate["BlockView", P], Coroutine[Any, Any, R]]


def _handler(by: str | None) -> Callable[[Handler[P, R]], Wrapped[P, R]]:
    """Wrap a FUSE handler whose first argument is an inode (`by="ino"`), a file handle
    (`by="fh"`) or neither (None): see the module's notes on errors."""
    def wrap(fn: Handler[P, R]) -> Wrapped[P, R]:
        @functools.wraps(fn)
        async def handle(self: BlockView, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as exc:
                where = self._where(by, args[0] if args else None)
                if isinstance(exc, (GatewayError, OSError)):
                    log.warning("block view: %s %s: %s", fn.__name__, where, exc)
                else:
                    log.error("block view: %s %s: unexpected %s: %s", fn.__name__, where,
                              type(exc).__name__, exc, exc_info=exc)
                raise pyfuse3.FUSEError(_fuse_errno(exc)) from None
        return handle
    return wrap


class BlockView(pyfuse3.Operations):  # type: ignore[misc]
    """The filesystem; volumes may be added and removed while it is mounted."""

    def __init__(self) -> None:
        super().__init__()
        self._volumes: dict[str, _Volume] = {}
        self._by_ino: dict[int, tuple[_Volume, str]] = {}
        self._handles: dict[int, _Handle] = {}
        self._inos = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._fhs = itertools.count(1)
        self._released = trio.Event()
        self.mountpoint: str | None = None

    # ---- service -------------------------------------------------------------------------

    async def run(self, mountpoint: str | os.PathLike[str], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount at `mountpoint`, serve until cancelled or unmounted, then unmount."""
        global _active
        if _active:
            raise Conflict("block view: a block view is already mounted in this process")
        path = os.fspath(mountpoint)
        options = {f"fsname={FSNAME}", "subtype=blockview", "default_permissions"}
        try:
            pyfuse3.init(self, path, options)
        except RuntimeError as exc:
            raise GatewayError(f"block view: cannot mount at {path}: {exc}") from exc
        _active = True
        self.mountpoint = path
        try:
            task_status.started()
            await pyfuse3.main()
        finally:
            self.mountpoint = None
            _active = False
            pyfuse3.close(unmount=True)

    # ---- volume management (called from the trio thread) ----------------------------------

    def add_volume(self, name: str, backend: BlockBackend) -> None:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidArgument(f"block view: bad volume name {name!r}")
        if name in self._volumes:
            raise AlreadyExists(f"block view: volume {name} already present")
        vol = _Volume(name, backend, next(self._inos), next(self._inos), next(self._inos))
        self._volumes[name] = vol
        self._by_ino[vol.dir_ino] = (vol, "")
        self._by_ino[vol.disk_ino] = (vol, DISK)
        self._by_ino[vol.rootfs_ino] = (vol, ROOTFS)

    def volumes(self) -> list[str]:
        return sorted(self._volumes)

    def _volume(self, name: str) -> _Volume:
        try:
            return self._volumes[name]
        except KeyError:
            raise NotFound(f"block view: no volume {name}") from None

    def set_window(self, name: str, start: int, size: int) -> None:
        """Expose bytes [start, start+size) of the volume's disk as NAME/rootfs."""
        vol = self._volume(name)
        if start < 0 or size <= 0 or start + size > vol.backend.size:
            raise InvalidArgument(f"block view: window {start}+{size} outside volume {name} "
                                  f"of {vol.backend.size} bytes")
        if any(self._handles[fh].kind == ROOTFS for fh in vol.open_handles):
            raise Conflict(f"block view: volume {name} rootfs is open; cannot move its window")
        vol.window = _Window(start, size)

    def window(self, name: str) -> tuple[int, int] | None:
        """(start, size) of the volume's rootfs window, or None."""
        w = self._volume(name).window
        return None if w is None else (w.start, w.size)

    def clear_window(self, name: str) -> None:
        vol = self._volume(name)
        if any(self._handles[fh].kind == ROOTFS for fh in vol.open_handles):
            raise Conflict(f"block view: volume {name} rootfs is open")
        vol.window = None

    async def close_window(self, name: str, *, timeout: float = 5.0) -> None:
        """clear_window() after waiting up to `timeout` for the rootfs file to be released.

        A loop device with auto-clear drops its backing file asynchronously after the umount, and
        the kernel sends FUSE RELEASE later still, so right after a teardown the file may still
        count as open (seen with 16 volumes unmounted at once)."""
        vol = self._volume(name)

        def rootfs_open() -> bool:
            return any(self._handles[fh].kind == ROOTFS for fh in vol.open_handles)

        with trio.move_on_after(timeout):
            while rootfs_open():
                await self._released.wait()
        self.clear_window(name)

    def open_count(self, name: str) -> int:
        return len(self._volume(name).open_handles)

    async def remove_volume(self, name: str, *, timeout: float = 5.0,
                            force: bool = False) -> BlockBackend:
        """Remove the volume and return its backend (the caller flushes and closes it)."""
        vol = self._volume(name)
        with trio.move_on_after(timeout):
            while vol.open_handles:
                await self._released.wait()
        if vol.open_handles:
            if not force:
                raise Conflict(f"block view: volume {name} still has "
                               f"{len(vol.open_handles)} open file(s)")
            for fh in vol.open_handles:
                self._handles[fh].detached = True
        del self._volumes[name]
        for ino in (vol.dir_ino, vol.disk_ino, vol.rootfs_ino):
            self._by_ino.pop(ino, None)
        return vol.backend

    def _where(self, by: str | None, key: object) -> str:
        """What a failed request was about, for its log line: VOL/kind, or the bare number."""
        if by is None or not isinstance(key, int):
            return "/"
        if by == "fh":
            h = self._handles.get(key)
            return f"{h.volume.name}/{h.kind}" if h is not None else f"fh {key}"
        if key == pyfuse3.ROOT_INODE:
            return "/"
        entry = self._by_ino.get(key)
        return f"{entry[0].name}/{entry[1]}".rstrip("/") if entry is not None else f"ino {key}"

    # ---- attributes -------------------------------------------------------------------------

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_uid = 0
        a.st_gid = 0
        a.st_blksize = 4096
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2 + len(self._volumes)
            return a
        entry = self._by_ino.get(ino)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        vol, kind = entry
        ro = vol.backend.read_only
        if kind == "":
            a.st_mode = stat.S_IFDIR | 0o700
            a.st_nlink = 2
            return a
        if kind == ROOTFS and vol.window is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_mode = stat.S_IFREG | (0o400 if ro else 0o600)
        a.st_nlink = 1
        a.st_size = vol.backend.size if kind == DISK else vol.window.size  # type: ignore[union-attr]
        a.st_blocks = (a.st_size + 511) // 512
        return a

    @_handler("ino")
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @_handler("ino")
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent_inode == pyfuse3.ROOT_INODE:
            if text == ".":
                return self._attr(parent_inode)
            vol = self._volumes.get(text)
            if vol is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(vol.dir_ino)
        entry = self._by_ino.get(parent_inode)
        if entry is None or entry[1] != "":
            raise pyfuse3.FUSEError(errno.ENOENT)
        vol = entry[0]
        if text == DISK:
            return self._attr(vol.disk_ino)
        if text == ROOTFS and vol.window is not None:
            return self._attr(vol.rootfs_ino)
        if text == "..":
            return self._attr(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_handler("ino")
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if inode != pyfuse3.ROOT_INODE and self._by_ino.get(inode, (None, "x"))[1] != "":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_handler("ino")  # a directory's handle is its inode (opendir)
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if fh == pyfuse3.ROOT_INODE:
            entries = [(name, vol.dir_ino) for name, vol in sorted(self._volumes.items())]
        else:
            entry = self._by_ino.get(fh)
            if entry is None:
                return
            vol = entry[0]
            entries = [(DISK, vol.disk_ino)]
            if vol.window is not None:
                entries.append((ROOTFS, vol.rootfs_ino))
        for index, (name, ino) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(ino), index):
                break

    @_handler("ino")
    async def releasedir(self, fh: int) -> None:
        return None

    @_handler(None)
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # ---- file I/O ------------------------------------------------------------------------

    @_handler("ino")
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        entry = self._by_ino.get(inode)
        if entry is None or entry[1] == "":
            raise pyfuse3.FUSEError(errno.ENOENT if entry is None else errno.EISDIR)
        vol, kind = entry
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and vol.backend.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        if kind == DISK:
            start, size = 0, vol.backend.size
        else:
            if vol.window is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            start, size = vol.window.start, vol.window.size
        fh = next(self._fhs)
        self._handles[fh] = _Handle(vol, kind, start, size, writable)
        vol.open_handles.add(fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None or h.detached:
            raise pyfuse3.FUSEError(errno.EIO)
        return h

    @_handler("fh")
    async def read(  # type: ignore[override]  # pyfuse3 replies from any buffer object
            self, fh: int, off: int, size: int) -> bytes | bytearray:
        h = self._handle(fh)
        if off >= h.size or size <= 0:
            return b""
        length = min(size, h.size - off)
        # Any buffer will do: pyfuse3 replies from it before another task runs.
        data: bytes | bytearray = await h.volume.backend.read_at(h.start + off, length)
        return data

    @_handler("fh")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off >= h.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = buf if off + len(buf) <= h.size else buf[: h.size - off]
        await h.volume.backend.write_at(h.start + off, data)
        return len(data)

    @_handler("fh")
    async def flush(self, fh: int) -> None:
        h = self._handles.get(fh)
        if h is None or h.detached:
            return  # close() of a detached handle succeeds; its writes already reached the backend
        if h.writable:
            await h.volume.backend.flush()

    @_handler("fh")
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        await h.volume.backend.flush()

    @_handler("fh")
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            h.volume.open_handles.discard(fh)
            self._released.set()
            self._released = trio.Event()
