"""Pinned formats end to end: what an export serves is decided by the catalog, never by content."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway.nbd.client import NBDClient
from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qsd import StorageDaemon
from gateway.nbd.transient import transient_export
from gateway.testing.images import ImageSet

SECRET = b"TOP-SECRET-HOST-FILE-0123456789"
MIB = 1 << 20



def evil_image(tmp_path: Path) -> tuple[Path, Path]:
    """A file whose bytes are a valid qcow2 header naming a host secret as backing file."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes((SECRET + b"\n") * (MIB // 32))
    evil = tmp_path / "evil.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
                    evil, "1M"], check=True)
    assert evil.read_bytes()[:4] == b"QFI\xfb"
    assert SECRET not in evil.read_bytes()
    return evil, secret


def nbdcopy(uri: str, out: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=60)
    return out.read_bytes()


async def read_all(uri: str) -> bytearray:
    async with NBDClient.open(uri) as c:
        return await c.read_at(0, c.size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("read_only", [True, False])
async def test_raw_volume_with_qcow2_header_is_plain_data(qsd: StorageDaemon, tmp_path: Path,
                                                          read_only: bool) -> None:
    evil, _secret = evil_image(tmp_path)
    own = evil.read_bytes()
    uri = await qsd.export(ExportSpec("evil", str(evil), "raw", read_only=read_only))
    via_client = await read_all(uri)
    via_nbdcopy = nbdcopy(uri, tmp_path / "copy.bin")
    # qemu serves whole 512-byte sectors: an unaligned file is padded with zeros
    padded = -(-len(own) // 512) * 512
    for served in (via_client, via_nbdcopy):
        assert len(served) == padded
        assert served[: len(own)] == own
        assert served[len(own):] == bytes(padded - len(own))
        assert SECRET not in served
    # the commands sent named the raw driver over the file; no backing anywhere
    adds = [a for c, a in qsd.sent if c == "blockdev-add"]
    assert [a["driver"] for a in adds] == ["file", "raw"]


@pytest.mark.timeout(60)
async def test_qcow2_volume_never_opens_header_named_backing(qsd: StorageDaemon,
                                                             tmp_path: Path) -> None:
    evil, _secret = evil_image(tmp_path)
    uri = await qsd.export(ExportSpec("evilq", str(evil), "qcow2", read_only=True))
    served = await read_all(uri)
    assert len(served) == MIB
    assert SECRET not in served
    assert served == bytes(MIB)  # backing null: unallocated clusters read as zeros


@pytest.mark.timeout(60)
async def test_genuine_qcow2_registered_as_raw_serves_container(qsd: StorageDaemon,
                                                                image_set: ImageSet,
                                                                tmp_path: Path) -> None:
    qcow = image_set.path("gpt", "qcow2")
    uri = await qsd.export(ExportSpec("asraw", str(qcow), "raw", read_only=True))
    assert await read_all(uri) == qcow.read_bytes()
    assert nbdcopy(uri, tmp_path / "c.bin") == qcow.read_bytes()


@pytest.mark.timeout(60)
async def test_qcow2_serves_its_guest_view(qsd: StorageDaemon, image_set: ImageSet,
                                           tmp_path: Path) -> None:
    qcow = image_set.path("gpt", "qcow2")
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, expected],
                   check=True)
    uri = await qsd.export(ExportSpec("guest", str(qcow), "qcow2", read_only=True))
    want = expected.read_bytes()
    assert await read_all(uri) == want
    assert nbdcopy(uri, tmp_path / "c.bin") == want


@pytest.mark.timeout(60)
async def test_transient_export_is_read_only_and_cleans_up(image_set: ImageSet,
                                                           tmp_path: Path) -> None:
    qcow = image_set.path("mbr", "qcow2")
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, expected],
                   check=True)
    work = tmp_path / "w"
    spec = ExportSpec("probe", str(qcow), "qcow2", read_only=False)
    async with transient_export(spec, work) as client:
        assert client.read_only
        head = await client.read_at(0, 1024 * 1024)
        pid = int((work / "qsd.pid").read_text())
    assert head == expected.read_bytes()[: len(head)]
    assert not Path(f"/proc/{pid}").exists()
    assert not (work / "nbd.sock").exists() or not os.path.exists(f"/proc/{pid}")
