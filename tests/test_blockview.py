"""The block view over FileBackends on image copies: real FUSE, served in this process on trio.

Every access to the mounted files runs in a worker thread: the trio thread serves FUSE.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.errors import AlreadyExists, BackendError, Conflict, InvalidArgument
from gateway.fuse.backend import BlockBackend, FileBackend
from gateway.fuse.blockview import BlockView
from gateway.testing.images import MIB, ImageSet, copy_image

WINDOW = {"none": None, "mbr": (MIB, 64 * MIB), "gpt": (MIB, 64 * MIB)}


@pytest.fixture
async def view(tmp_path: Path) -> AsyncIterator[tuple[BlockView, Path]]:
    mnt = tmp_path / "blk"
    mnt.mkdir()
    bv = BlockView()
    async with trio.open_nursery() as nursery:
        await nursery.start(bv.run, mnt)
        yield bv, mnt
        nursery.cancel_scope.cancel()
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()


def window_of(table: str, path: Path) -> tuple[int, int]:
    return WINDOW[table] or (0, path.stat().st_size)


def read_file(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("table", ["none", "mbr", "gpt"])
async def test_disk_and_window_bytes(view: tuple[BlockView, Path], image_set: ImageSet,
                                     tmp_path: Path, table: str) -> None:
    bv, mnt = view
    img = copy_image(image_set.path(table, "raw"), tmp_path / "disk.raw")
    backend = FileBackend(img, read_only=True)
    bv.add_volume("vol", backend)
    start, size = window_of(table, img)
    assert await trio.to_thread.run_sync(os.listdir, mnt / "vol") == ["disk"]
    bv.set_window("vol", start, size)
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vol")) == ["disk", "rootfs"]
    expected = img.read_bytes()
    disk = await trio.to_thread.run_sync(read_file, mnt / "vol" / "disk")
    rootfs = await trio.to_thread.run_sync(read_file, mnt / "vol" / "rootfs")
    assert len(disk) == len(expected) and disk == expected
    assert rootfs == expected[start:start + size]
    st = await trio.to_thread.run_sync(os.stat, mnt / "vol" / "rootfs")
    assert st.st_size == size and st.st_uid == 0
    backend.close()


@pytest.mark.timeout(60)
async def test_read_only_volume(view: tuple[BlockView, Path], image_set: ImageSet) -> None:
    bv, mnt = view
    backend = FileBackend(image_set.path("gpt", "raw"), read_only=True)
    bv.add_volume("ro", backend)
    bv.set_window("ro", MIB, 64 * MIB)
    for name in ("disk", "rootfs"):
        st = await trio.to_thread.run_sync(os.stat, mnt / "ro" / name)
        assert stat.S_IMODE(st.st_mode) == 0o400
        with pytest.raises(OSError) as info:
            await trio.to_thread.run_sync(os.open, mnt / "ro" / name, os.O_RDWR)
        assert info.value.errno in (errno.EROFS, errno.EACCES)
    backend.close()


def _pread(path: Path, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _pwrite(path: Path, data: bytes, offset: int, sync: bool = True) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        n = os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
        return n
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
async def test_edges_and_writes(view: tuple[BlockView, Path], tmp_path: Path) -> None:
    bv, mnt = view
    img = tmp_path / "small.raw"
    img.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    backend = FileBackend(img)
    bv.add_volume("rw", backend)
    bv.set_window("rw", 4096, 8192)
    disk, win = mnt / "rw" / "disk", mnt / "rw" / "rootfs"
    st = await trio.to_thread.run_sync(os.stat, win)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 8192
    # reads past the end are short, then empty
    assert len(await trio.to_thread.run_sync(_pread, win, 100, 8192 - 10)) == 10
    assert await trio.to_thread.run_sync(_pread, win, 100, 8192) == b""
    assert len(await trio.to_thread.run_sync(_pread, disk, 4096, MIB - 1)) == 1
    # writes land at the window offset; a write crossing the end is short; past it ENOSPC
    assert await trio.to_thread.run_sync(_pwrite, win, b"WINDOW", 0) == 6
    assert img.read_bytes()[4096:4102] == b"WINDOW"
    assert await trio.to_thread.run_sync(_pwrite, win, b"x" * 20, 8192 - 10) == 10
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync(_pwrite, win, b"y", 8192)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync(_pwrite, disk, b"y", MIB)
    assert info.value.errno == errno.ENOSPC
    assert img.stat().st_size == MIB
    # window checks
    with pytest.raises(InvalidArgument):
        bv.set_window("rw", MIB - 100, 4096)
    with pytest.raises(AlreadyExists):
        bv.add_volume("rw", backend)
    backend.close()


@pytest.mark.timeout(60)
async def test_remove_volume_with_open_handle(view: tuple[BlockView, Path],
                                              tmp_path: Path) -> None:
    bv, mnt = view
    img = tmp_path / "v.raw"
    img.write_bytes(b"\1" * 65536)
    backend = FileBackend(img)
    bv.add_volume("v", backend)
    fd = await trio.to_thread.run_sync(os.open, mnt / "v" / "disk", os.O_RDONLY)
    try:
        with pytest.raises(Conflict):
            await bv.remove_volume("v", timeout=0.2)
        assert await trio.to_thread.run_sync(os.pread, fd, 4, 0) == b"\1" * 4
        assert await bv.remove_volume("v", timeout=0.2, force=True) is backend
        with pytest.raises(OSError) as info:
            await trio.to_thread.run_sync(os.pread, fd, 4, 0)
        assert info.value.errno == errno.EIO
        assert not await trio.to_thread.run_sync(os.path.exists, mnt / "v")
    finally:
        await trio.to_thread.run_sync(os.close, fd)
    # a released handle lets remove_volume succeed without force
    bv.add_volume("v", backend)
    fd = await trio.to_thread.run_sync(os.open, mnt / "v" / "disk", os.O_RDONLY)
    await trio.to_thread.run_sync(os.close, fd)
    await bv.remove_volume("v", timeout=5)
    backend.close()


class _FailingBackend:
    """Pure stand-in that fails every I/O, to check errno translation."""

    def __init__(self, err: BackendError) -> None:
        self.err = err

    @property
    def size(self) -> int:
        return 65536

    @property
    def read_only(self) -> bool:
        return False

    async def read_at(self, offset: int, length: int) -> bytes:
        raise self.err

    async def write_at(self, offset: int, data: bytes) -> None:
        raise self.err

    async def flush(self) -> None:
        raise self.err


@pytest.mark.timeout(60)
async def test_backend_errors_become_errno(view: tuple[BlockView, Path]) -> None:
    bv, mnt = view
    plain = _FailingBackend(BackendError("nbd: connection lost"))
    tagged_err = BackendError("nbd: no space")
    tagged_err.errno = errno.ENOSPC  # type: ignore[attr-defined]
    tagged = _FailingBackend(tagged_err)
    assert isinstance(plain, BlockBackend)
    bv.add_volume("plain", plain)
    bv.add_volume("tagged", tagged)
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync(_pread, mnt / "plain" / "disk", 512, 0)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync(_pwrite, mnt / "tagged" / "disk", b"z", 0, False)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.timeout(30)
async def test_one_view_per_process(view: tuple[BlockView, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(Conflict):
        await BlockView().run(other)


class _CountingBackend(FileBackend):
    largest_read = 0
    largest_write = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.largest_read = max(self.largest_read, length)
        return await super().read_at(offset, length)

    async def write_at(self, offset: int, data: bytes) -> None:
        self.largest_write = max(self.largest_write, len(data))
        await super().write_at(offset, data)


@pytest.mark.timeout(60)
async def test_large_requests(view: tuple[BlockView, Path], tmp_path: Path) -> None:
    bv, mnt = view
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    backend = _CountingBackend(img)
    bv.add_volume("big", backend)
    await trio.to_thread.run_sync(_pwrite, mnt / "big" / "disk", b"a" * (4 * MIB), 0)
    assert len(await trio.to_thread.run_sync(_pread, mnt / "big" / "disk", 4 * MIB, 0)) == 4 * MIB
    print(f"largest read {backend.largest_read}, largest write {backend.largest_write}")
    assert backend.largest_read >= 512 * 1024
    assert backend.largest_write >= 512 * 1024
    backend.close()
