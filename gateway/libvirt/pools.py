"""libvirt storage pools: a pool volume's path and its format, read from libvirt, never guessed.

`resolve(uri, pool, vol)` looks the volume up through libvirt-python
(`pool.storageVolLookupByName(vol).path()`) and takes the format from the volume's XML
(`<target><format type='qcow2'/></target>`). A volume whose XML names no format, or a format other
than raw or qcow2, is refused. libvirt's dir pools fill that XML by probing the file, so the
gateway pins a pool volume's format only when the admin declares the same one. The connection is
gatewayd's own URI, and only a plain local one (`check_uri`). Blocking: call from a worker thread.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gateway.errors import FormatError, InvalidArgument, PermissionDenied

POOL_FORMATS = ("raw", "qcow2")
# A local libvirt URI with no transport (`lxc+ext://...?command=` runs a program), no host and no
# query: lxc:///, qemu:///system, ...
LOCAL_URI = re.compile(r"[a-z]+:///[a-z]*")


def check_uri(uri: str) -> str:
    if not LOCAL_URI.fullmatch(uri):
        raise PermissionDenied(f"libvirt URI {uri!r} is not a plain local URI (no transport, "
                               "host or query allowed for storage pools)")
    return uri


@dataclass(frozen=True)
class PoolVolume:
    uri: str
    pool: str
    vol: str
    path: str
    format: str

    def to_json(self) -> dict[str, str]:
        return {"uri": self.uri, "pool": self.pool, "vol": self.vol, "path": self.path,
                "format": self.format}


def format_from_xml(xml: str, what: str) -> str:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise FormatError(f"{what}: unreadable volume XML: {exc}") from exc
    node = root.find("./target/format")
    fmt = node.get("type") if node is not None else None
    if not fmt:
        raise FormatError(f"{what}: the pool volume's XML names no format; refusing to guess")
    if fmt not in POOL_FORMATS:
        raise FormatError(f"{what}: format {fmt!r} is not supported (raw or qcow2 only)")
    return fmt


def resolve(uri: str, pool: str, vol: str) -> PoolVolume:
    from gateway.libvirt.connection import close_quietly, connect, libvirt_errors
    if not pool or not vol:
        raise InvalidArgument("--pool and --vol are both required")
    check_uri(uri)
    what = f"pool {pool} volume {vol}"
    conn = connect(uri)
    try:
        with libvirt_errors(f"looking up {what}"):
            volume = conn.storagePoolLookupByName(pool).storageVolLookupByName(vol)
            path = str(volume.path())
            xml = str(volume.XMLDesc(0))
    finally:
        close_quietly(conn)
    return PoolVolume(uri=uri, pool=pool, vol=vol, path=path, format=format_from_xml(xml, what))
