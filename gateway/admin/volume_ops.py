"""Admin ops on registered volumes: add, list, show, set, remove; export and unexport; probe;
mount and umount; and the daemon-wide status and metrics."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from gateway.admin.args import Args, mount_flags
from gateway.admin.gateway import Gateway
from gateway.admin.lifecycle_ops import release_base
from gateway.admin.protocol import PROTOCOL_VERSION
from gateway.attach.states import SERVING
from gateway.config import Settings
from gateway.errors import Conflict, InvalidArgument
from gateway.log import fields
from gateway.volumes import register

log = logging.getLogger("gateway.admin.volume_ops")
VERSION = "0.1.0"


async def status(gw: Gateway, args: Args) -> dict[str, Any]:
    qsd = gw.qsd.health()
    attachments = gw.catalog.attachments()
    return {
        "protocol": PROTOCOL_VERSION,
        "version": VERSION,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - gw.started, 3),
        "healthy": bool(qsd.get("ready")),
        "state_dir": str(gw.settings.state_dir),
        "run_dir": str(gw.settings.run_dir),
        "catalog_schema": gw.catalog.version,
        "volumes": len(gw.catalog.volumes()),
        "exports": len(gw.exports.active),
        "mounts": sum(1 for a in attachments if a.state in SERVING),
        "qsd": qsd,
        "libvirt": {"uri": gw.libvirt_uri or None, "connected": gw.libvirt_connected},
        "reconcile": gw.reconcile_report,
        "security": security_status(gw.settings),
    }


def security_status(settings: Settings) -> dict[str, Any]:
    """What the trust model is on this host (README, Security)."""
    roots = [str(r) for r in settings.allowed_roots]
    out: dict[str, Any] = {"allowed_roots": roots or None,
                           "admin_group": settings.admin_group}
    if not roots and settings.admin_group:
        out["warning"] = (f"no --allowed-roots: members of {settings.admin_group} can register "
                          "any host file as a volume and read or write it, which makes them "
                          "root-equivalent")
    return out


async def metrics(gw: Gateway, args: Args) -> dict[str, Any]:
    gw.metrics.qsd_restarts.set(gw.qsd.restarts)
    return {"text": gw.metrics.render()}


async def volume_add(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    flags = mount_flags(args)
    fstype, read_only = args.opt_text("fstype"), args.flag("read_only")
    fmt, path = args.text("format"), args.text("path")
    async with gw.lock(name):
        volume = await trio.to_thread.run_sync(lambda: register.examine(
            name, path, fmt, read_only=read_only, fstype=fstype,
            allowed_roots=gw.settings.allowed_roots, forbidden=gw.own_dirs, **flags))
        gw.catalog.add_volume(volume)
    log.info("volume added", extra=fields(volume=name, format=volume.format, path=volume.path))
    return gw.volume_json(name)


async def volume_set(gw: Gateway, args: Args) -> dict[str, Any]:
    """Change how a volume's rootfs is mounted from now on: `setuid` (honour setuid binaries)
    and `noexec`; refused while it is mounted."""
    name = args.text("name")
    setuid, noexec = args.opt_flag("setuid"), args.opt_flag("noexec")
    nosuid = None if setuid is None else not setuid
    if nosuid is None and noexec is None:
        raise InvalidArgument("nothing to change: give setuid or noexec")
    async with gw.lock(name):
        gw.catalog.volume(name)
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        gw.catalog.update_volume(name, nosuid=nosuid, noexec=noexec)
    log.info("volume changed", extra=fields(volume=name, nosuid=nosuid, noexec=noexec))
    return gw.volume_json(name)


async def volume_list(gw: Gateway, args: Args) -> list[dict[str, Any]]:
    return [gw.volume_json(v.name) for v in gw.catalog.volumes()]


async def volume_show(gw: Gateway, args: Args) -> dict[str, Any]:
    return gw.volume_json(args.text("name"))


async def volume_remove(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    async with gw.lock(name):
        gw.catalog.volume(name)
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        if name in gw.catalog.exported():
            raise Conflict(f"volume {name} is exported; unexport it first")
        await gw.exports.retire(name)
        overlays = gw.catalog.overlays_of(name)
        if overlays:
            raise Conflict(f"volume {name} is the base of overlays {', '.join(overlays)}; "
                           "remove them first")
        base = gw.catalog.volume(name).base
        gw.catalog.remove_volume(name)
    if base is not None:
        async with gw.lock(base):
            release_base(gw, base)
    log.info("volume removed", extra=fields(volume=name))
    return {"name": name, "removed": True}


async def export(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    async with gw.lock(name):
        result = await gw.exports.open(name)
    return {"name": name, "uri": result.uri}


async def unexport(gw: Gateway, args: Args) -> dict[str, Any]:
    name = args.text("name")
    async with gw.lock(name):
        gw.catalog.volume(name)
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        await gw.exports.close(name)
    return {"name": name, "exported": False}


async def probe(gw: Gateway, args: Args) -> dict[str, Any]:
    from gateway.probe.core import probe_reader_async
    name = args.text("name")
    gw.catalog.volume(name)
    backend = gw.exports.get(name).backend
    result = await probe_reader_async(backend.read_at, backend.size)
    return result.to_json()


async def mount(gw: Gateway, args: Args) -> dict[str, Any]:
    return await gw.rootfs.mount(args.text("name"), args.text("mode"))


async def umount(gw: Gateway, args: Args) -> dict[str, Any]:
    """`if_unused` (the libvirt hook on release): keep the mount while another running gateway
    domain than `domain` still boots from the volume."""
    name = args.text("name")
    if args.flag("if_unused"):
        # Never ask libvirt here: the hook calls this while libvirtd holds the dying domain, so
        # a libvirt query would wait for the hook that waits for us. gatewayd's own map of
        # running domains (from domain start and lifecycle events) answers instead.
        domain = args.opt_text("domain")
        if domain is not None:
            gw.domain_volumes.pop(domain, None)
        users = sorted(d for d, v in gw.domain_volumes.items() if v == name)
        if users:
            return {"name": name, "mounted": True, "kept_for": users}
    return await gw.rootfs.umount(name, force=args.flag("force"))
