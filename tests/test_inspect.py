"""The qcow2 header inspector: real images made by qemu-img, and crafted hostile headers."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from gateway.errors import FormatError
from gateway.volumes.inspect import HEADER_READ, inspect_image, inspect_qcow2


def qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def head(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()[:HEADER_READ]
    return data, path.stat().st_size


@pytest.fixture
def plain_qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "64M")
    return path


def patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset:offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def test_plain_qcow2_is_accepted(plain_qcow2: Path) -> None:
    facts = inspect_qcow2(*head(plain_qcow2))
    assert facts.version == 3
    assert facts.virtual_size == 64 * 1024 * 1024
    assert facts.cluster_size == 65536
    assert not facts.dirty


def test_qcow2_v2_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(path), "16M")
    assert inspect_qcow2(*head(path)).version == 2


def test_backing_file_is_refused(tmp_path: Path, plain_qcow2: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(plain_qcow2), str(overlay))
    with pytest.raises(FormatError, match=r"names a backing file \(.*plain.qcow2\)"):
        inspect_qcow2(*head(overlay))


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(path), "16M")
    with pytest.raises(FormatError, match="external data file"):
        inspect_qcow2(*head(path))


def test_encryption_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc.qcow2"
    qemu_img("create", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
             "-o", "encrypt.format=aes,encrypt.key-secret=sec0", str(path), "16M")
    with pytest.raises(FormatError, match="encrypt"):
        inspect_qcow2(*head(path))


def test_unknown_incompatible_bits_are_refused(tmp_path: Path, plain_qcow2: Path) -> None:
    bad = patched(plain_qcow2, tmp_path / "bits.qcow2", 72, struct.pack(">Q", 1 << 40))
    with pytest.raises(FormatError, match="unknown incompatible feature bits 0x10000000000"):
        inspect_qcow2(*head(bad))


def test_corrupt_bit_is_refused(tmp_path: Path, plain_qcow2: Path) -> None:
    bad = patched(plain_qcow2, tmp_path / "corrupt.qcow2", 72, struct.pack(">Q", 2))
    with pytest.raises(FormatError, match="marked corrupt"):
        inspect_qcow2(*head(bad))


def test_l1_table_past_end_is_refused(tmp_path: Path, plain_qcow2: Path) -> None:
    bad = patched(plain_qcow2, tmp_path / "l1.qcow2", 40, struct.pack(">Q", 1 << 40))
    with pytest.raises(FormatError, match="L1 table lies outside the file"):
        inspect_qcow2(*head(bad))


@pytest.mark.parametrize("keep", [0, 3, 40, 100, 4096])
def test_truncated_qcow2_is_refused(tmp_path: Path, plain_qcow2: Path, keep: int) -> None:
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(plain_qcow2.read_bytes()[:keep])
    with pytest.raises(FormatError):
        inspect_image("qcow2", *head(cut))


def test_raw_file_declared_qcow2_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    with pytest.raises(FormatError, match="not a qcow2 image"):
        inspect_image("qcow2", *head(raw))


@pytest.mark.root  # the lookalike names /etc/shadow, which qemu-img opens to create it
def test_raw_declared_accepts_a_qcow2_lookalike(tmp_path: Path, plain_qcow2: Path) -> None:
    """A raw disk may hold anything, including a qcow2 header naming a host file."""
    overlay = tmp_path / "looks.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(overlay), "1M")
    found = inspect_image("raw", *head(overlay))
    assert found.format == "raw"
    assert found.virtual_size == overlay.stat().st_size
    assert found.facts == {}


def test_empty_raw_and_unknown_format() -> None:
    with pytest.raises(FormatError, match="empty"):
        inspect_image("raw", b"", 0)
    with pytest.raises(FormatError, match="unknown format 'vmdk'"):
        inspect_image("vmdk", b"", 10)
