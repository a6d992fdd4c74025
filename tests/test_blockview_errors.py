"""The block view's handler wrapper: what reaches pyfuse3 when a backend fails. A unit test of
the adapter boundary (no mount: the handlers are called as pyfuse3 would call them)."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import pytest
import trio

from gateway.errors import BackendError
from gateway.fuse.blockview import BlockView

pytestmark = pytest.mark.timeout(30)


class FailingBackend:
    """A 1 MiB disk whose every request raises `error`."""

    size = 1 << 20
    read_only = False

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def read_at(self, offset: int, length: int) -> bytes:
        raise self.error

    async def write_at(self, offset: int, data: bytes) -> None:
        raise self.error

    async def flush(self) -> None:
        raise self.error


class OddErrno(Exception):
    def __init__(self, code: object) -> None:
        super().__init__(f"errno {code!r}")
        self.errno = code


async def open_disk(view: BlockView, error: BaseException) -> int:
    view.add_volume("vol", FailingBackend(error))
    entry = await view.lookup(pyfuse3.ROOT_INODE, b"vol")
    disk = await view.lookup(entry.st_ino, b"disk")
    info = await view.open(disk.st_ino, os.O_RDWR)
    fh: int = info.fh
    return fh


@pytest.mark.parametrize(("error", "code"), [
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (BackendError("nbd: gone"), errno.EIO),
    (RuntimeError("a bug"), errno.EIO),
    (OddErrno(-5), errno.EIO),
    (OddErrno("EPIPE"), errno.EIO),
    (OddErrno(True), errno.EIO),
    (OddErrno(errno.EROFS), errno.EROFS),
])
async def test_any_exception_becomes_one_fuse_error(error: BaseException, code: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    view = BlockView()
    fh = await open_disk(view, error)
    for request in (lambda: view.read(fh, 0, 4096), lambda: view.write(fh, 0, b"x"),
                    lambda: view.flush(fh), lambda: view.fsync(fh, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.fuse.blockview"):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await request()
        assert info.value.errno == code
        assert len(caplog.records) == 1, caplog.records  # logged once, at the boundary
        assert "vol/disk" in caplog.records[0].getMessage()
        unexpected = not isinstance(error, (OSError, BackendError))
        assert (caplog.records[0].levelno == logging.ERROR) is unexpected


async def test_fuse_errors_pass_unlogged(caplog: pytest.LogCaptureFixture) -> None:
    view = BlockView()
    with caplog.at_level(logging.WARNING, logger="gateway.fuse.blockview"):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await view.getattr(12345)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as info:
            await view.read(999, 0, 10)  # no such handle
        assert info.value.errno == errno.EIO
    assert caplog.records == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
async def test_base_exceptions_pass_through(error: BaseException) -> None:
    view = BlockView()
    fh = await open_disk(view, error)
    with pytest.raises(type(error)):
        await view.read(fh, 0, 4096)


async def test_cancellation_passes_through() -> None:
    view = BlockView()
    fh = await open_disk(view, RuntimeError("unused"))

    class Stuck(FailingBackend):
        async def read_at(self, offset: int, length: int) -> bytes:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    view._handles[fh].volume.backend = Stuck(RuntimeError())
    with trio.move_on_after(0.05) as scope:
        await view.read(fh, 0, 4096)
    assert scope.cancelled_caught
