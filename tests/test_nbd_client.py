"""The libnbd client on trio against a real QSD export."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
import trio

from gateway.errors import InvalidArgument
from gateway.nbd.client import NBDClient, NBDError, parse_uri
from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qsd import StorageDaemon

MIB = 1 << 20



def test_parse_uri() -> None:
    assert parse_uri("nbd+unix:///vol-1?socket=/run/x/nbd.sock") == ("/run/x/nbd.sock", "vol-1")
    with pytest.raises(InvalidArgument):
        parse_uri("nbd://host/vol")
    with pytest.raises(InvalidArgument):
        parse_uri("nbd+unix:///vol")


@pytest.mark.timeout(60)
async def test_concurrent_reads_and_writes_many_tasks(qsd: StorageDaemon,
                                                      tmp_path: Path) -> None:
    size = 48 * MIB
    path = tmp_path / "c.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    uri = await qsd.export(ExportSpec("c", str(path), "raw", read_only=False))
    model = bytearray(size)
    rng = random.Random(7)
    async with NBDClient.open(str(qsd.nbd_path), "c") as c:
        assert c.size == size and not c.read_only
        # big writes (larger than a chunk) fill the socket: exercises the BOTH direction path
        blobs = [(i * 8 * MIB, os.urandom(8 * MIB - 4096)) for i in range(6)]

        async def write(off: int, data: bytes) -> None:
            await c.write_at(off, data)

        async with trio.open_nursery() as n:
            for off, data in blobs:
                n.start_soon(write, off, data)
                model[off:off + len(data)] = data
        small = []
        for _ in range(200):
            off = rng.randrange(0, size - 4096) & ~511
            small.append((off, rng.randbytes(rng.choice([512, 4096, 777]))))
        for off, data in small:  # overlapping small writes must land in order: do them serially
            await c.write_at(off, data)
            model[off:off + len(data)] = data
        await c.flush()
        results: dict[int, bytes | bytearray] = {}

        async def read(off: int, n: int) -> None:
            results[off] = await c.read_at(off, n)

        async with trio.open_nursery() as n:
            for _ in range(300):
                off = rng.randrange(0, size - 65536)
                n.start_soon(read, off, rng.randrange(1, 65536))
        for off, got in results.items():
            assert got == bytes(model[off:off + len(got)])
        whole = await c.read_at(0, size)
        assert hashlib.sha256(whole).digest() == hashlib.sha256(model).digest()
        await c.zero(MIB, MIB)
        await c.trim(4 * MIB, MIB)
        await c.flush()
        assert await c.read_at(MIB, MIB) == bytes(MIB)
        with pytest.raises(InvalidArgument):
            await c.read_at(size - 10, 11)
    model[MIB:2 * MIB] = bytes(MIB)
    copy = tmp_path / "copy.bin"
    subprocess.run(["nbdcopy", uri, str(copy)], check=True, timeout=60)
    data = copy.read_bytes()
    assert data[:4 * MIB] == bytes(model[:4 * MIB])
    assert data[5 * MIB:] == bytes(model[5 * MIB:])


@pytest.mark.timeout(30)
async def test_cancelled_reader_does_not_break_the_connection(qsd: StorageDaemon,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    content = os.urandom(16 * MIB)
    path.write_bytes(content)
    await qsd.export(ExportSpec("x", str(path), "raw", read_only=True))
    async with NBDClient.open(str(qsd.nbd_path), "x") as c:
        for _ in range(20):
            with trio.move_on_after(0.0005):
                await c.read_at(0, 16 * MIB)
        assert await c.read_at(12345, 100000) == content[12345:112345]


@pytest.mark.timeout(30)
async def test_closed_client_and_unknown_export(qsd: StorageDaemon, tmp_path: Path) -> None:
    with pytest.raises(NBDError, match="no export"):
        async with NBDClient.open(str(qsd.nbd_path), "nope"):
            pass
    with pytest.raises(NBDError):
        async with NBDClient.open(str(tmp_path / "no-such.sock"), "x"):
            pass
    path = tmp_path / "y.raw"
    path.write_bytes(bytes(MIB))
    uri = await qsd.export(ExportSpec("y", str(path), "raw", read_only=True))
    async with trio.open_nursery() as nursery:
        c = await NBDClient.connect(uri, nursery=nursery)
        assert c.connected and c.can_multi_conn
        await c.aclose()
        with pytest.raises(NBDError):
            await c.read_at(0, 512)
        with pytest.raises(NBDError):
            await c.reconnect()


@pytest.mark.timeout(30)
async def test_unexport_with_connected_client(qsd: StorageDaemon, tmp_path: Path) -> None:
    from gateway.errors import Conflict
    path = tmp_path / "z.raw"
    path.write_bytes(bytes(MIB))
    uri = await qsd.export(ExportSpec("z", str(path), "raw", read_only=True))
    async with NBDClient.open(uri) as c:
        await c.read_at(0, 512)
        with pytest.raises(Conflict):
            await qsd.unexport("z")
        await qsd.unexport("z", force=True)
        with pytest.raises(NBDError):
            for _ in range(100):
                await c.read_at(0, 512)
                await trio.sleep(0.01)
    assert qsd.exported() == set()


def _rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(60)
async def test_requests_do_not_keep_their_buffers(qsd: StorageDaemon, tmp_path: Path) -> None:
    """Regression: with nbd.Buffer, libnbd 1.14 kept every request's buffer alive for good, so
    each block-view read grew gatewayd by the bytes it read (100 MiB per 100 MiB read)."""
    path = tmp_path / "m.raw"
    path.write_bytes(os.urandom(8 * MIB))
    await qsd.export(ExportSpec("m", str(path), "raw", read_only=False))
    async with NBDClient.open(str(qsd.nbd_path), "m") as c:
        await c.read_at(0, MIB)
        before = _rss_mib()
        payload = os.urandom(MIB)
        for i in range(200):
            assert len(await c.read_at((i % 8) * MIB, MIB)) == MIB
            await c.write_at((i % 8) * MIB, payload)
        grown = _rss_mib() - before
    assert grown < 48, f"400 MiB of I/O grew the process by {grown} MiB"
