"""Header-only image inspector: checks that a file matches the format an admin declared.

Pure functions over bytes. Nothing here decides a format: the caller states it, and the inspector
either accepts the file as that format (returning the facts the catalog keeps) or refuses it with a
FormatError. A file declared raw is accepted whatever its bytes, because a raw disk may legitimately
start with anything, including what looks like a qcow2 header.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.errors import FormatError

Format = Literal["raw", "qcow2"]
FORMATS: tuple[Format, ...] = ("raw", "qcow2")

QCOW2_MAGIC = b"QFI\xfb"
HEADER_READ = 64 * 1024  # header plus extensions always fit in the first cluster read here

# Incompatible feature bits (qcow2 spec, "incompatible_features").
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2)

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 24 bytes following the v2 part


@dataclass(frozen=True)
class Qcow2Facts:
    version: int
    cluster_size: int
    virtual_size: int
    l1_entries: int
    l1_offset: int
    refcount_offset: int
    snapshots: int
    dirty: bool
    compression: str
    extended_l2: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _backing_name(data: bytes, offset: int, size: int) -> str:
    if 0 < size <= 1023 and offset + size <= len(data):
        return data[offset:offset + size].decode("utf-8", "replace")
    return "(name outside the header)"


def _extensions(data: bytes, start: int, cluster_size: int) -> dict[int, bytes]:
    """Header extensions up to the end marker; each must lie inside the first cluster."""
    found: dict[int, bytes] = {}
    pos = start
    limit = min(len(data), cluster_size)
    while True:
        if pos + 8 > limit:
            raise FormatError("qcow2 header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == EXT_END:
            return found
        end = pos + 8 + length
        if end > limit:
            raise FormatError(f"qcow2 header extension 0x{kind:08x} runs past the first cluster")
        found[kind] = data[pos + 8:end]
        pos = pos + 8 + ((length + 7) & ~7)


def inspect_qcow2(data: bytes, file_size: int) -> Qcow2Facts:
    """Validate a qcow2 header (the first bytes of the file) against the gateway's rules."""
    if len(data) < 4 or data[:4] != QCOW2_MAGIC:
        raise FormatError("not a qcow2 image: no qcow2 magic at offset 0")
    if len(data) < _V2.size:
        raise FormatError("truncated qcow2: the header is incomplete")
    (_magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     rc_off, rc_clusters, nb_snap, snap_off) = _V2.unpack_from(data, 0)
    if version not in (2, 3):
        raise FormatError(f"unsupported qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        raise FormatError(f"invalid qcow2 cluster_bits {cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompat = 0
    header_length = _V2.size
    compression = "zlib"
    if version == 3:
        if len(data) < _V2.size + _V3.size:
            raise FormatError("truncated qcow2: the v3 header is incomplete")
        incompat, _compat, _autoclear, _refcount_order, header_length = _V3.unpack_from(data, 72)
        if header_length < 104 or header_length > cluster_size or header_length % 8:
            raise FormatError(f"invalid qcow2 header length {header_length}")
        if header_length > 104 and len(data) > 104:
            compression = "zstd" if data[104] == 1 else "zlib"
    if backing_off != 0:
        name = _backing_name(data, backing_off, backing_len)
        raise FormatError(f"qcow2 image names a backing file ({name}); register the base as its "
                          "own volume instead")
    if crypt != 0:
        raise FormatError("qcow2 image is encrypted; encrypted images are not supported")
    if incompat & INCOMPAT_DATA_FILE:
        raise FormatError("qcow2 image uses an external data file; not supported")
    if incompat & INCOMPAT_CORRUPT:
        raise FormatError("qcow2 image is marked corrupt; repair it with qemu-img check -r")
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        raise FormatError(f"qcow2 image sets unknown incompatible feature bits 0x{unknown:x}")
    exts = _extensions(data, header_length, cluster_size)
    if EXT_DATA_FILE in exts:
        raise FormatError("qcow2 image names an external data file; not supported")
    if EXT_CRYPTO in exts:
        raise FormatError("qcow2 image carries an encryption header; not supported")
    if size == 0:
        raise FormatError("qcow2 image has a virtual size of 0")
    if file_size < cluster_size:
        raise FormatError("truncated qcow2: the file is shorter than one cluster")
    entries_per_l2 = cluster_size // (16 if incompat & INCOMPAT_EXTL2 else 8)
    if l1_size * entries_per_l2 * cluster_size < size:
        raise FormatError("qcow2 L1 table is too small for the virtual size")
    if l1_off % cluster_size or l1_off + 8 * l1_size > file_size or (l1_size and l1_off == 0):
        raise FormatError("qcow2 L1 table lies outside the file (truncated or corrupt image)")
    if rc_off % cluster_size or rc_off == 0 or rc_off + rc_clusters * cluster_size > file_size:
        raise FormatError("qcow2 refcount table lies outside the file (truncated or corrupt image)")
    if nb_snap and (snap_off % cluster_size or snap_off >= file_size):
        raise FormatError("qcow2 snapshot table lies outside the file (truncated or corrupt image)")
    return Qcow2Facts(version=version, cluster_size=cluster_size, virtual_size=size,
                      l1_entries=l1_size, l1_offset=l1_off, refcount_offset=rc_off,
                      snapshots=nb_snap, dirty=bool(incompat & INCOMPAT_DIRTY),
                      compression=compression, extended_l2=bool(incompat & INCOMPAT_EXTL2))


@dataclass(frozen=True)
class Inspection:
    """What `volume add` records about an image: its size and the facts its header declares."""

    format: Format
    virtual_size: int
    facts: dict[str, Any]


def inspect_image(fmt: str, head: bytes, file_size: int) -> Inspection:
    """Check `head` (the first HEADER_READ bytes) against the declared format."""
    if fmt == "qcow2":
        facts = inspect_qcow2(head, file_size)
        return Inspection("qcow2", facts.virtual_size, facts.to_json())
    if fmt == "raw":
        if file_size == 0:
            raise FormatError("raw image is empty (0 bytes)")
        return Inspection("raw", file_size, {})
    raise FormatError(f"unknown format {fmt!r}: choose raw or qcow2")
