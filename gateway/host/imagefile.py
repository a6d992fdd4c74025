"""Opening a registered image file again, safely: no symlink followed, and the very same file.

`volume add` stores the image's resolved path and the file's identity (st_dev, st_ino). Every
later use (QSD's blockdev-add, qemu-img) reopens it with `open_pinned`:
- each component of the stored path is opened relative to its parent with O_NOFOLLOW, so a
  symlink anywhere on the path (one swapped in after registration, say) is refused, never
  followed;
- the result must be a regular file or a block device, and the registered one (same device and
  inode).
The tool is then handed `/proc/<gatewayd pid>/fd/N` (`proc_path`) instead of the name: it opens
exactly the file that was checked, whatever happens to the name in between.

Opens use O_PATH: nothing is read or written through them, and opening a device node this way has
none of the side effects a real open can have. Blocking (path walks may reach any filesystem):
call from a worker thread, never from the trio thread that serves the block view.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence

from gateway.ceph.location import is_rbd_path
from gateway.errors import Conflict, InvalidArgument, NotFound, PermissionDenied

FileId = tuple[int, int]
_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_LEAF = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_path(path: str) -> int:
    """An O_PATH fd of the absolute `path`, reached without following any symlink."""
    if is_rbd_path(path):
        raise InvalidArgument(f"{path} is an RBD image, not a file: this operation works on "
                              "image files only (RBD volumes export, probe, mount and start "
                              "domains)")
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"image path must be absolute: {path!r}")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"image path {path!r} is not a plain absolute path")
    fd = os.open("/", _DIR)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], _LEAF, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise PermissionDenied(f"{path}: a component of the path is a symlink or not a "
                                   "directory; refusing to follow it") from exc
        if exc.errno == errno.ENOENT:
            raise NotFound(f"{path}: no such file") from exc
        raise InvalidArgument(f"{path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return leaf


def check_kind(fd: int, path: str) -> os.stat_result:
    """fstat of an opened image: a regular file or a block device, nothing else."""
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"{path} is a symlink; refusing to follow it")
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} is a directory, not an image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgument(f"{path} is not a regular file or block device")
    return st


def open_pinned(path: str, file_id: FileId | None) -> tuple[int, FileId]:
    """O_PATH fd of the registered image at `path` and its identity; refused if the path leads
    through a symlink or to another file than the one registered (`file_id`; None: any file,
    for rows registered before identities were recorded)."""
    fd = open_path(path)
    try:
        st = check_kind(fd, path)
        found = (st.st_dev, st.st_ino)
        if file_id is not None and found != tuple(file_id):
            raise Conflict(f"{path} is no longer the file registered for this volume (device "
                           "and inode differ); refusing to open it")
    except BaseException:
        os.close(fd)
        raise
    return fd, found


def proc_path(fd: int) -> str:
    """A name for `fd` that another process (running as root) can open: the very same file."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def reopen(fd: int, flags: int) -> int:
    """A real open (read or write) of the file behind an O_PATH fd."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


@contextlib.contextmanager
def pinned(images: Sequence[tuple[str, FileId | None]]) -> Iterator[list[str]]:
    """Open every (path, file_id) with `open_pinned`; yields their /proc names, closed after."""
    fds: list[int] = []
    try:
        for path, file_id in images:
            fds.append(open_pinned(path, file_id)[0])
        yield [proc_path(fd) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
