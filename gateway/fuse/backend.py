"""What the block view reads and writes: a virtual disk with a size, a mode and byte I/O.

`BlockBackend` is the contract; the NBD client (gateway.nbd.client.NBDClient) satisfies it, and
`FileBackend` is a plain file used by tests and by tools that have no NBD export at hand.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol, runtime_checkable

import trio

from gateway.errors import BackendError, InvalidArgument


@runtime_checkable
class BlockBackend(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def read_at(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write_at(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...


class FileBackendError(BackendError):
    """A FileBackend I/O failed; `.errno` (always set) is the OS error number for the FUSE
    reply."""


class FileBackend:
    """A plain file as a block backend (pread/pwrite/fsync in worker threads).

    The size is fixed at open time, like a disk's; writes past it are refused.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
        try:
            self._fd = os.open(self._path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise FileBackendError(f"file backend {self._path}: open failed: {exc.strerror}",
                                   errno=exc.errno or errno.EIO) from exc
        self._size = os.fstat(self._fd).st_size

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _fail(self, what: str, exc: OSError) -> FileBackendError:
        return FileBackendError(f"file backend {self._path}: {what} failed: {exc.strerror}",
                                errno=exc.errno or errno.EIO)

    def _check(self, offset: int, length: int) -> None:
        if self._fd < 0:
            raise FileBackendError(f"file backend {self._path}: closed", errno=errno.EBADF)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidArgument(f"file backend {self._path}: range {offset}+{length} "
                                  f"outside size {self._size}")

    async def read_at(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        try:
            return await trio.to_thread.run_sync(os.pread, self._fd, length, offset)
        except OSError as exc:
            raise self._fail("read", exc) from exc

    async def write_at(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if self._read_only:
            raise FileBackendError(f"file backend {self._path}: read-only", errno=errno.EROFS)

        def write_all() -> None:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(self._fd, view, pos)
                view = view[n:]
                pos += n

        try:
            await trio.to_thread.run_sync(write_all)
        except OSError as exc:
            raise self._fail("write", exc) from exc

    async def flush(self) -> None:
        if self._fd < 0 or self._read_only:
            return
        try:
            await trio.to_thread.run_sync(os.fsync, self._fd)
        except OSError as exc:
            raise self._fail("fsync", exc) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
