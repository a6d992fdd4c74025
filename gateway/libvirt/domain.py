"""libvirt-lxc domains that boot from a gateway rootfs.

`domain_xml` and `attachment_from_xml` are pure. The operations are blocking (the daemon runs
them in worker threads); each opens its own connection, and libvirt errors leave as
gateway.errors types via gateway.libvirt.connection.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import libvirt

from gateway.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from gateway.libvirt.connection import DEFAULT_URI, close_quietly, connect, libvirt_errors
from gateway.userns.slices import IdMap

METADATA_NS = "https://storage-gateway.invalid/xmlns/attachment/1"
METADATA_PREFIX = "gateway"
MODES = ("bind", "fuse")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(f"invalid domain name {name!r}: use 1-64 letters, digits and "
                              "'_.+-', starting with a letter or digit")
    return name


def _validate_attachment(volume: str, mode: str) -> None:
    if not isinstance(volume, str) or not volume or any(c in volume for c in "\0\n/"):
        raise InvalidArgument(f"invalid volume name {volume!r}")
    if mode not in MODES:
        raise InvalidArgument(f"invalid mode {mode!r}: expected one of {', '.join(MODES)}")


def domain_xml(name: str, rootfs: str, volume: str, mode: str, init: str = "/sbin/init",
               args: Sequence[str] = (), memory_mib: int = 128, vcpus: int = 1,
               ids: IdMap | None = None) -> str:
    """The libvirt-lxc domain XML: `rootfs` (a host directory) mounted as `/`, a pty console and
    the gateway attachment (volume, mode) in <metadata>. With `ids` the container runs in a user
    namespace: <idmap> for uids and gids, `userns="yes"` in the metadata (the hook then asks for
    an idmapped rootfs with the domain's own map), and a network namespace of its own
    (<privnet/>), without which libvirt 9.0 fails a user-namespace domain."""
    validate_name(name)
    _validate_attachment(volume, mode)
    if not rootfs.startswith("/"):
        raise InvalidArgument(f"rootfs must be an absolute path, not {rootfs!r}")
    if not init.startswith("/"):
        raise InvalidArgument(f"init must be an absolute path, not {init!r}")
    if memory_mib < 1 or vcpus < 1:
        raise InvalidArgument("memory_mib and vcpus must be positive")
    for text in (rootfs, init, *args):
        if "\0" in text:
            raise InvalidArgument("NUL bytes are not allowed in domain XML")
    dom = ET.Element("domain", type="lxc")
    ET.SubElement(dom, "name").text = name
    meta = ET.SubElement(dom, "metadata")
    # The namespace is declared on the element itself (not hoisted to <domain>), as libvirt keeps
    # only the metadata subtree.
    attrs = {f"xmlns:{METADATA_PREFIX}": METADATA_NS, "volume": volume, "mode": mode}
    if ids is not None:
        attrs["userns"] = "yes"
    ET.SubElement(meta, f"{METADATA_PREFIX}:attachment", attrs)
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "exe"
    ET.SubElement(os_el, "init").text = init
    for arg in args:
        ET.SubElement(os_el, "initarg").text = arg
    if ids is not None:
        idmap = ET.SubElement(dom, "idmap")
        ET.SubElement(idmap, "uid", start="0", target=str(ids.uid_first), count=str(ids.count))
        ET.SubElement(idmap, "gid", start="0", target=str(ids.gid_first), count=str(ids.count))
        ET.SubElement(ET.SubElement(dom, "features"), "privnet")
    devices = ET.SubElement(dom, "devices")
    fs = ET.SubElement(devices, "filesystem", type="mount")
    ET.SubElement(fs, "source", dir=rootfs)
    ET.SubElement(fs, "target", dir="/")
    ET.SubElement(devices, "console", type="pty")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def attachment_from_xml(xml: str) -> tuple[str, str] | None:
    """(volume, mode) from a domain XML's gateway metadata; None for other domains or bad XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{{{METADATA_NS}}}attachment")
    if el is None:
        return None
    volume, mode = el.get("volume"), el.get("mode")
    if not volume or mode not in MODES:
        return None
    return volume, mode


def idmap_from_xml(xml: str) -> IdMap | None:
    """The map of a domain's <idmap> (id 0 of uid and gid, equal counts), None without one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    uid, gid = root.find("idmap/uid"), root.find("idmap/gid")
    if uid is None or gid is None or uid.get("start") != "0" or gid.get("start") != "0":
        return None
    try:
        count = int(uid.get("count", ""))
        if int(gid.get("count", "")) != count:
            return None
        return IdMap(int(uid.get("target", "")), int(gid.get("target", "")), count)
    except (ValueError, InvalidArgument):
        return None


def rootfs_from_xml(xml: str) -> str | None:
    """The source dir of the filesystem mounted at '/', if any."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for fs in root.findall("devices/filesystem"):
        target, source = fs.find("target"), fs.find("source")
        if target is not None and source is not None and target.get("dir") == "/":
            return source.get("dir")
    return None


def state_name(code: int) -> str:
    return STATES.get(code, f"unknown-{code}")


def _lookup(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def start_domain(xml: str, *, uri: str = DEFAULT_URI) -> str:
    """Define and start the domain; returns its name. On failure nothing of it remains defined.

    An inactive gateway domain of the same name is replaced; a running one or a foreign one is
    refused (AlreadyExists)."""
    try:
        name = ET.fromstring(xml).findtext("name") or ""
    except ET.ParseError as exc:
        raise InvalidArgument(f"domain XML does not parse: {exc}") from exc
    validate_name(name)
    if attachment_from_xml(xml) is None:
        raise InvalidArgument(f"domain {name} has no gateway attachment metadata")
    conn = connect(uri)
    try:
        with libvirt_errors(f"looking up domain {name}"):
            old = _lookup(conn, name)
            if old is not None:
                if old.isActive():
                    raise AlreadyExists(f"domain {name} is already running")
                if attachment_from_xml(old.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is None:
                    raise AlreadyExists(f"domain {name} exists and is not a gateway domain")
        with libvirt_errors(f"defining domain {name}"):
            dom = conn.defineXML(xml)
        try:
            with libvirt_errors(f"starting domain {name}"):
                dom.create()
        except BaseException:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
            raise
        return name
    finally:
        close_quietly(conn)


def stop_domain(name: str, *, uri: str = DEFAULT_URI) -> bool:
    """Destroy and undefine a gateway domain. Idempotent: False when it did not exist."""
    validate_name(name)
    conn = connect(uri)
    try:
        with libvirt_errors(f"stopping domain {name}"):
            dom = _lookup(conn, name)
            if dom is None:
                return False
            if attachment_from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is None:
                raise Conflict(f"domain {name} is not a gateway domain; not touching it")
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID,
                                                libvirt.VIR_ERR_NO_DOMAIN):
                    raise
            try:
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return True
    finally:
        close_quietly(conn)


def describe(dom: Any) -> dict[str, Any] | None:
    """{name, state, volume, mode[, idmap]} of a gateway domain (idmap: a user-namespace
    domain's map), None for others (blocking)."""
    xml = dom.XMLDesc(0)
    attachment = attachment_from_xml(xml)
    if attachment is None:
        return None
    state, _reason = dom.state()
    info: dict[str, Any] = {"name": dom.name(), "state": state_name(state),
                            "volume": attachment[0], "mode": attachment[1]}
    ids = idmap_from_xml(xml)
    if ids is not None:  # a user-namespace domain
        info["idmap"] = ids.to_json()
    return info


def list_domains(*, uri: str = DEFAULT_URI) -> list[dict[str, Any]]:
    """Gateway domains only, sorted by name."""
    conn = connect(uri)
    try:
        out: list[dict[str, Any]] = []
        with libvirt_errors("listing domains"):
            for dom in conn.listAllDomains(0):
                try:
                    info = describe(dom)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # went away meanwhile
                    raise
                if info is not None:
                    out.append(info)
        return sorted(out, key=lambda d: str(d["name"]))
    finally:
        close_quietly(conn)


def domain_state(name: str, *, uri: str = DEFAULT_URI) -> str:
    validate_name(name)
    conn = connect(uri)
    try:
        with libvirt_errors(f"reading state of domain {name}"):
            dom = _lookup(conn, name)
            if dom is None:
                raise NotFound(f"no domain {name}")
            state, _reason = dom.state()
        return state_name(state)
    finally:
        close_quietly(conn)
