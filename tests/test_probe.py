"""The native probe on images made by real tools, cross-checked with pyparted, sfdisk, blkid."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import parted
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import NotFound, ProbeError
from gateway.probe.core import (
    EXTERNAL_JOURNAL,
    DiskProbe,
    probe_file,
    probe_reader,
    probe_reader_async,
    scan_file,
    scan_reader,
)
from gateway.testing.probe_images import Case, first_bytes, session_cases

CASES = [
    "whole-ext2", "whole-ext3", "whole-ext4", "whole-xfs", "whole-btrfs", "whole-vfat12",
    "whole-vfat16", "whole-vfat32", "whole-squashfs", "whole-swap", "whole-luks1", "whole-luks2",
    "whole-lvm", "mbr-basic", "mbr-logical", "mbr-ext-0f", "mbr-empty-slot", "mbr-out-of-order",
    "mbr-swap-first", "mbr-xfs", "gpt-basic", "gpt-multi", "gpt-out-of-order", "gpt-luks-first",
    "gpt-lvm-first", "gpt-empty-first", "gpt-hybrid", "gpt-4k", "gpt-bad-primary",
    "gpt-bad-primary-sig", "gpt-bad-entries", "gpt-both-bad", "gpt-absurd", "mbr-ebr-loop",
    "mbr-past-end", "all-zero", "garbage-55aa", "garbage-55aa-flags", "whole-ext4-extjournal",
    "whole-jbd", "gpt-ext3-extjournal",
]
TABLE_CASES = [n for n in CASES if n.startswith(("mbr-", "gpt-"))]


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    built = session_cases(lambda: tmp_path_factory.mktemp("probe-images"))
    assert sorted(built) == sorted(CASES)
    return built


def blkid_type(path: Path, offset: int = 0, size: int | None = None) -> dict[str, str]:
    argv = ["blkid", "-p", "-o", "export", "-O", str(offset)]
    if size is not None:
        argv += ["-S", str(size)]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 2), proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", CASES)
def test_rootfs_rule(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    if case.error is not None:
        with pytest.raises(ProbeError) as info:
            probe_file(case.path)
        assert case.error in str(info.value)
        assert "\n" not in str(info.value)
        assert info.value.code == "probe-error"
        return
    result = probe_file(case.path)
    assert result.table == case.table
    assert result.sector_size == case.sector_size
    assert case.rootfs is not None
    assert (result.rootfs.number, result.rootfs.fs) == case.rootfs
    doc = result.to_json()
    json.dumps(doc)
    assert set(doc) == {"table", "sector_size", "partitions", "rootfs"}
    assert set(doc["rootfs"]) == {"number", "start", "size", "fs"}
    for part in doc["partitions"]:
        assert set(part) == {"number", "start", "size", "type", "fs"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", TABLE_CASES)
def test_partitions_match_libparted(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    if not case.crosscheck:
        pytest.skip("corrupted or non-512 image: libparted disagrees by design")
    layout = scan_file(case.path)
    disk = parted.newDisk(parted.getDevice(str(case.path)))
    theirs = sorted((p.number, p.geometry.start * 512, p.geometry.length * 512)
                    for p in disk.partitions)
    ours = sorted((p.number, p.start, p.size) for p in layout.partitions)
    assert ours == theirs
    assert {"msdos": "mbr", "gpt": "gpt"}[disk.type] == layout.table


def _sfdisk_types(
    path: Path, sector_size: int = 512
) -> tuple[str, dict[int, tuple[int, int, str]]]:
    target, loop = str(path), None
    if sector_size != 512:
        loop = target = subprocess.run(["losetup", "-f", "--show", "-r", "-b", str(sector_size),
                                        str(path)], capture_output=True, text=True,
                                       check=True).stdout.strip()
    try:
        out = subprocess.run(["sfdisk", "--json", target], capture_output=True, text=True,
                             check=True).stdout
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=True)
    table = json.loads(out)["partitiontable"]
    parts = {}
    for p in table["partitions"]:
        number = int(p["node"][len(target):].lstrip("p"))
        kind = p["type"].lower()
        parts[number] = (p["start"] * sector_size, p["size"] * sector_size,
                         kind if table["label"] == "gpt" else f"0x{int(kind, 16):02x}")
    return table["label"], parts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [n for n in TABLE_CASES if n in (
    "mbr-basic", "mbr-logical", "mbr-ext-0f", "mbr-empty-slot", "mbr-out-of-order", "gpt-multi",
    "gpt-out-of-order", "gpt-4k", "gpt-hybrid", "gpt-bad-primary", "gpt-bad-entries")])
def test_types_match_sfdisk(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    layout = scan_file(case.path)
    label, parts = _sfdisk_types(case.path, case.sector_size)
    assert {"dos": "mbr", "gpt": "gpt"}[label] == layout.table
    assert {p.number: (p.start, p.size, p.type) for p in layout.partitions} == parts
    assert layout.sector_size == case.sector_size


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", CASES)
def test_fs_matches_blkid(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    try:
        layout = scan_file(case.path)
    except ProbeError:
        pytest.skip("table refused; nothing to compare")
    if layout.table == "none":
        info = blkid_type(case.path)
        assert info.get("TYPE") == blkid_name(layout.whole_disk_fs)
        assert "PTTYPE" not in info
        return
    if case.crosscheck:
        pttype = blkid_type(case.path).get("PTTYPE")
        assert {"dos": "mbr", "gpt": "gpt", "PMBR": "gpt"}.get(pttype or "") == layout.table
    disk_size = case.path.stat().st_size
    for part in layout.partitions:
        if part.container or part.end > disk_size:
            continue
        assert blkid_type(case.path, part.start, part.size).get("TYPE") == blkid_name(part.fs), part


def blkid_name(fs: str | None) -> str | None:
    """Our name as blkid spells it: blkid types an ext with an external journal ext3/ext4."""
    return fs.removesuffix(EXTERNAL_JOURNAL) if fs is not None else None


def test_read_batching(cases: dict[str, Case]) -> None:
    for name in ("gpt-basic", "mbr-basic", "gpt-4k", "whole-ext4"):
        assert scan_file(cases[name].path).reads <= 4, name
    assert scan_file(cases["gpt-bad-primary"].path).reads <= 4


def test_reader_api_matches_file(cases: dict[str, Case]) -> None:
    path = cases["gpt-multi"].path
    with open(path, "rb") as f:
        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        size = path.stat().st_size
        assert probe_reader(read, size) == probe_file(path)


async def test_async_reader(cases: dict[str, Case]) -> None:
    import trio

    path = cases["mbr-logical"].path
    data = path.read_bytes()

    async def read(offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return data[offset:offset + length]

    result = await probe_reader_async(read, len(data))
    assert result == probe_file(path)
    assert [p.number for p in result.partitions] == [1, 2, 5, 6, 7, 8]
    assert result.partitions[1].container and result.partitions[1].fs is None


def test_sans_io_protocol(cases: dict[str, Case]) -> None:
    data = cases["gpt-basic"].path.read_bytes()
    probe = DiskProbe(len(data))
    with pytest.raises(ProbeError, match="before the probe finished"):
        probe.layout()
    with pytest.raises(ProbeError, match="no outstanding read"):
        probe.feed(12345, b"x")
    rounds = 0
    while reqs := probe.requests():
        rounds += 1
        for offset, length in reqs:
            assert 0 <= offset and offset + length <= len(data)
            probe.feed(offset, data[offset:offset + length])
    assert rounds == 2
    layout = probe.layout()
    assert layout.table == "gpt" and layout.reads == 2


def test_short_reads_do_not_break(cases: dict[str, Case]) -> None:
    data = cases["mbr-logical"].path.read_bytes()
    layout = scan_reader(lambda off, n: data[off:off + n // 3], len(data))
    assert layout.table in ("mbr", "none")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        probe_file(tmp_path / "nope.img")


def test_tiny_disks() -> None:
    for size in (0, 1, 100, 511, 512):
        with pytest.raises(ProbeError, match="whole disk: no filesystem found"):
            probe_reader(lambda off, n: bytes(n), size)


@pytest.mark.timeout(120)
def test_hypothesis_mutated_tables(cases: dict[str, Case]) -> None:
    heads = [first_bytes(cases[n].path) for n in ("gpt-multi", "mbr-logical", "gpt-4k",
                                                   "whole-vfat16", "whole-ext4")]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, len(heads) - 1), seed=st.integers(0, 2**32 - 1),
           flips=st.integers(1, 24), extra=st.integers(0, 1 << 30))
    def check(which: int, seed: int, flips: int, extra: int) -> None:
        rng = random.Random(seed)
        blob = bytearray(heads[which])
        for _ in range(flips):
            pos = rng.choice((rng.randrange(0, 1024 + 512 * 33), rng.randrange(0, len(blob))))
            blob[pos] = rng.randrange(256)
        data = bytes(blob)
        size = len(data) + extra

        def read(offset: int, length: int) -> bytes:
            assert offset + length <= size
            return data[offset:offset + length]

        try:
            scan_reader(read, size)
        except ProbeError as exc:
            assert "\n" not in str(exc)

    check()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ext3", "ext4"])
def test_each_external_journal_field_is_refused(cases: dict[str, Case], kind: str) -> None:
    """Journal inode 0, a journal device number, or a journal UUID: each one alone is external."""
    head = first_bytes(cases[f"whole-{kind}"].path)
    sb = 1024

    def reader(data: bytes) -> Callable[[int, int], bytes]:
        return lambda off, n: data[off:off + n]

    assert struct.unpack_from("<I", head, sb + 0xE0)[0] != 0  # mkfs made an internal journal
    for offset, value in ((0xE0, b"\0\0\0\0"), (0xE4, struct.pack("<I", 0x0801)),
                          (0xD0 + 15, b"\x01")):
        blob = bytearray(head)
        blob[sb + offset:sb + offset + len(value)] = value
        data = bytes(blob)
        layout = scan_reader(reader(data), len(data))
        assert layout.whole_disk_fs == kind + EXTERNAL_JOURNAL, hex(offset)
        with pytest.raises(ProbeError, match=f"^whole disk: {kind} with an external journal"):
            probe_reader(reader(data), len(data))
    assert scan_reader(reader(head), len(head)).whole_disk_fs == kind
