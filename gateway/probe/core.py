"""Find a volume's rootfs: partition table + superblock probe over the native sans-I/O core.

The C core (gateway/_native, built by build_native.py) never does I/O: it asks for byte ranges,
the drivers here fetch them from a reader and feed them back. `DiskProbe` is that protocol object;
`scan_*` return the disk layout, `probe_*` also apply the rootfs rule (`select_rootfs`).

Listed partitions follow libparted: MBR extended containers are included (with fs None), logical
partitions are numbered from 5, GPT partitions by entry index + 1, empty slots are skipped.
"""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gateway.errors import NotFound, ProbeError

_native: ModuleType | None
_IMPORT_ERROR: ImportError | None = None
try:
    _native = importlib.import_module("gateway.probe._native._probe")
except ImportError as exc:  # pragma: no cover - only when `make native` was not run
    _native = None
    _IMPORT_ERROR = exc

TABLES = {0: "none", 1: "mbr", 2: "gpt"}
MOUNTABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs", "vfat"})
# The C core's suffix for an ext3/ext4 whose journal lives on another device ("ext4" + this).
EXTERNAL_JOURNAL = "-external-journal"
_MAX_REQUESTS = 512

JsonDict = dict[str, Any]
SyncReader = Callable[[int, int], bytes]
AsyncReader = Callable[[int, int], Awaitable[bytes | bytearray]]


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str  # "0x83" or a lowercase GPT type GUID
    fs: str | None
    container: bool = False  # MBR extended container

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_json(self) -> JsonDict:
        return {"number": self.number, "start": self.start, "size": self.size, "type": self.type,
                "fs": self.fs}


@dataclass(frozen=True)
class Rootfs:
    number: int  # 0 = whole disk
    start: int
    size: int
    fs: str

    def to_json(self) -> JsonDict:
        return {"number": self.number, "start": self.start, "size": self.size, "fs": self.fs}


@dataclass(frozen=True)
class DiskLayout:
    """What the probe found, before the rootfs rule is applied."""

    table: str  # "none", "mbr" or "gpt"
    sector_size: int
    disk_size: int
    partitions: tuple[Partition, ...]
    whole_disk_fs: str | None  # filesystem at offset 0 when table == "none"
    reads: int  # read requests issued (not part of the JSON contract)


@dataclass(frozen=True)
class ProbeResult:
    layout: DiskLayout
    rootfs: Rootfs

    @property
    def table(self) -> str:
        return self.layout.table

    @property
    def sector_size(self) -> int:
        return self.layout.sector_size

    @property
    def partitions(self) -> tuple[Partition, ...]:
        return self.layout.partitions

    @property
    def reads(self) -> int:
        return self.layout.reads

    def to_json(self) -> JsonDict:
        return {
            "table": self.table,
            "sector_size": self.sector_size,
            "partitions": [p.to_json() for p in self.partitions],
            "rootfs": self.rootfs.to_json(),
        }


def _lib() -> Any:
    if _native is None:
        raise ProbeError(f"native probe not built (run `make native`): {_IMPORT_ERROR}")
    return _native


def _text(ffi: Any, chars: Any) -> str:
    return str(ffi.string(chars).decode("ascii", "replace"))


class DiskProbe:
    """Sans-I/O probe of one disk: `requests()` -> read them -> `feed()` ... until none are left."""

    def __init__(self, disk_size: int) -> None:
        if disk_size < 0:
            raise ProbeError(f"disk size {disk_size} is negative")
        native = _lib()
        self._ffi = native.ffi
        self._lib = native.lib
        self._size = disk_size
        handle = self._lib.probe_new(disk_size)
        if handle == self._ffi.NULL:
            raise ProbeError("probe: out of memory")
        self._handle = self._ffi.gc(handle, self._lib.probe_free)
        self._reqs = self._ffi.new("struct probe_request[]", _MAX_REQUESTS)

    def requests(self) -> list[tuple[int, int]]:
        """The (offset, length) ranges still needed; empty when the probe is finished."""
        n = self._lib.probe_next_requests(self._handle, self._reqs, _MAX_REQUESTS)
        return [(int(self._reqs[i].offset), int(self._reqs[i].length)) for i in range(n)]

    def feed(self, offset: int, data: bytes | bytearray) -> None:
        """Supply the bytes for a request (shorter than asked at the end of the data is fine)."""
        if self._lib.probe_feed(self._handle, offset, bytes(data), min(len(data), 0xFFFFFFFF)) != 0:
            raise ProbeError(f"probe: no outstanding read at offset {offset}")

    def layout(self) -> DiskLayout:
        """The result; raises ProbeError when the tables are invalid or the probe is unfinished."""
        res = self._ffi.new("struct probe_result *")
        self._lib.probe_get_result(self._handle, res)
        if res.status != 0:
            raise ProbeError(_text(self._ffi, res.error))
        parts = []
        for i in range(res.nparts):
            p = res.parts[i]
            fs = _text(self._ffi, p.fs) or None
            parts.append(Partition(number=int(p.number), start=int(p.start), size=int(p.size),
                                   type=_text(self._ffi, p.type), fs=fs,
                                   container=bool(p.is_container)))
        return DiskLayout(table=TABLES[int(res.table)], sector_size=int(res.sector_size),
                          disk_size=self._size, partitions=tuple(parts),
                          whole_disk_fs=_text(self._ffi, res.whole_fs) or None,
                          reads=int(res.reads))


def select_rootfs(layout: DiskLayout) -> Rootfs:
    """The rule: no table -> whole disk; else the lowest-numbered non-container partition."""
    if layout.table == "none":
        where, number, start, size, fs = "whole disk", 0, 0, layout.disk_size, layout.whole_disk_fs
    else:
        data = sorted((p for p in layout.partitions if not p.container), key=lambda p: p.number)
        if not data:
            raise ProbeError(f"{layout.table} partition table: no data partitions")
        first = data[0]
        where, number, start, size, fs = (f"partition {first.number}", first.number, first.start,
                                          first.size, first.fs)
        if first.end > layout.disk_size:
            raise ProbeError(f"{where}: runs past the end of the disk (ends at byte {first.end}, "
                             f"disk has {layout.disk_size})")
    if fs is None:
        raise ProbeError(f"{where}: no filesystem found")
    if fs.endswith(EXTERNAL_JOURNAL):
        # Mounting it would have the host kernel open a host block device as its journal.
        raise ProbeError(f"{where}: {fs.removesuffix(EXTERNAL_JOURNAL)} with an external journal "
                         f"is refused; give it an internal one (tune2fs -f -O ^has_journal, "
                         f"then tune2fs -j)")
    if fs not in MOUNTABLE:
        raise ProbeError(f"{where}: {fs} is not a mountable rootfs")
    return Rootfs(number=number, start=start, size=size, fs=fs)


def scan_reader(read: SyncReader, size: int) -> DiskLayout:
    """Run the probe with a blocking `read(offset, length) -> bytes`."""
    probe = DiskProbe(size)
    while reqs := probe.requests():
        for offset, length in reqs:
            probe.feed(offset, read(offset, length))
    return probe.layout()


async def scan_reader_async(read: AsyncReader, size: int) -> DiskLayout:
    """Run the probe with an async `read(offset, length) -> bytes` (e.g. an NBD export)."""
    probe = DiskProbe(size)
    while reqs := probe.requests():
        for offset, length in reqs:
            probe.feed(offset, await read(offset, length))
    return probe.layout()


def probe_reader(read: SyncReader, size: int) -> ProbeResult:
    layout = scan_reader(read, size)
    return ProbeResult(layout, select_rootfs(layout))


async def probe_reader_async(read: AsyncReader, size: int) -> ProbeResult:
    layout = await scan_reader_async(read, size)
    return ProbeResult(layout, select_rootfs(layout))


def scan_file(path: str | os.PathLike[str]) -> DiskLayout:
    """Probe a raw image file or a block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"{os.fspath(path)}: no such file") from exc
    except OSError as exc:
        raise ProbeError(f"{os.fspath(path)}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        return scan_reader(lambda offset, length: os.pread(fd, length, offset), size)
    except OSError as exc:
        raise ProbeError(f"{os.fspath(path)}: read failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


def probe_file(path: str | os.PathLike[str]) -> ProbeResult:
    layout = scan_file(path)
    return ProbeResult(layout, select_rootfs(layout))
