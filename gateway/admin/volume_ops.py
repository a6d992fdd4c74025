"""Admin ops on registered volumes: add, list, show, set, remove; export and unexport; probe;
mount and umount; and the daemon-wide status and metrics."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

from gateway.admin.args import Args, mount_flags
from gateway.admin.gateway import Gateway
from gateway.admin.lifecycle_ops import release_base
from gateway.admin.protocol import PROTOCOL_VERSION
from gateway.attach.states import SERVING
from gateway.ceph import client as ceph_client
from gateway.ceph.lease import LeaseState
from gateway.ceph.location import RbdImage
from gateway.ceph.meta import FSTYPE_KEY
from gateway.config import Settings
from gateway.errors import ClusterError, Conflict, GatewayError, InvalidArgument
from gateway.log import fields
from gateway.volumes import rbd as rbd_volumes
from gateway.volumes import register

log = logging.getLogger("gateway.admin.volume_ops")
VERSION = "0.1.0"


async def status(gw: Gateway, args: Args) -> dict[str, Any]:
    qsd = gw.qsd.health()
    attachments = gw.catalog.attachments()
    slices = gw.catalog.userns_slices()
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
        "components": gw.supervisor.health(),
        "dataplane": (gw.components.dataplane.report()
                      if gw.components.dataplane is not None else None),
        "security": security_status(gw.settings),
        "host_id": gw.settings.host_id,
        "leases": gw.leases.status(),
        "fenced": gw.leases.fenced(),  # RBD volumes whose lease another host took from this one
        "ceph": gw.ceph.health.report(),
        # idmapped attachments and, of them, those cut for a domain (unprivileged domains)
        "userns": {"mounts": len(slices),
                   "domains": sum(1 for _ids, domain in slices.values() if domain)},
        "refusals": dict(sorted(gw.metrics.refused.items())),  # by reason (rights table)
    }


def security_status(settings: Settings) -> dict[str, Any]:
    """What the trust model is on this host (README, Security)."""
    roots = [str(r) for r in settings.allowed_roots]
    out: dict[str, Any] = {"allowed_roots": roots or None,
                           "admin_group": settings.admin_group,
                           "tenant_group": settings.tenant_group}
    if not roots and settings.admin_group:
        out["warning"] = (f"no --allowed-roots: members of {settings.admin_group} can register "
                          "any host file as a volume and read or write it, which makes them "
                          "root-equivalent")
    return out


async def metrics(gw: Gateway, args: Args) -> dict[str, Any]:
    gw.metrics.qsd_restarts.set(gw.qsd.restarts)
    gw.metrics.set_clusters(gw.ceph.health.report())
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


async def volume_add_rbd(gw: Gateway, args: Args) -> dict[str, Any]:
    """Register an RBD image; its pinned format comes from the image's metadata (`format` is
    written there when the image has none)."""
    name = args.text("name")
    config = gw.ceph
    async with gw.lock(name):
        found = await ceph_client.arun(functools.partial(
            rbd_volumes.examine, name, args.text("rbd"), conf=args.opt_text("ceph_conf"),
            user=args.opt_text("ceph_user"), declared_format=args.opt_text("format"),
            fstype=args.opt_text("fstype"), read_only=args.flag("read_only"),
            config=config, **mount_flags(args)))
        gw.catalog.check_new_volume(found.volume)
        if found.writes:
            await ceph_client.arun(ceph_client.set_metadata, found.image, config, found.writes)
        gw.catalog.add_volume(found.volume, rbd=found.image)
    log.info("rbd volume added", extra=fields(volume=name, image=found.image.spec,
                                               format=found.volume.format,
                                               pinned=sorted(found.writes)))
    return gw.volume_json(name)


async def volume_release(gw: Gateway, args: Args) -> dict[str, Any]:
    """Hand an RBD volume over to another host: give up this host's writer lease. Refused while
    the volume is mounted or exported here (a lingering export is closed first)."""
    name = args.text("name")
    async with gw.lock(name):
        gw.catalog.volume(name)
        image = gw.catalog.rbd_image(name)
        if image is None:
            raise InvalidArgument(f"volume {name} is not an RBD volume: there is no lease to "
                                  "release")
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        await gw.exports.retire(name)
        if name in gw.exports.active:
            raise Conflict(f"volume {name} is exported; unexport it first")
        if gw.leases.state(name) is LeaseState.HELD:
            await publish_fstype(gw, name, image)
        held = await gw.leases.release(name)
    log.info("volume released", extra=fields(volume=name, held=held))
    return {"name": name, "released": held}


async def publish_fstype(gw: Gateway, name: str, image: RbdImage) -> None:
    """The filesystem type this host pinned at its first mount, written to the image's metadata
    for the next host, unless the image has one already. Best effort: the handover goes on."""
    fstype = gw.catalog.volume(name).fstype
    if fstype is None:
        return
    config = gw.ceph
    try:
        facts = await ceph_client.arun(ceph_client.image_facts, image, config)
        if FSTYPE_KEY not in facts.metadata:
            await ceph_client.arun(ceph_client.set_metadata, image, config, {FSTYPE_KEY: fstype})
    except GatewayError as exc:
        log.warning("could not write the pinned filesystem type to the image",
                    extra=fields(volume=name, error=exc.message))


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
        volume = gw.catalog.volume(name)
        base = volume.base
        image = gw.catalog.rbd_image(name)
        if image is not None:  # an RBD base keeps its clones' snapshots: refused while used
            try:
                await ceph_client.arun(rbd_volumes.check_no_clones, name, image, gw.ceph)
            except ClusterError:
                if rbd_volumes.made_here(volume):
                    raise  # its image goes too: that needs the cluster
                log.warning("could not look for clones of an rbd volume; unregistering it",
                            extra=fields(volume=name, image=image.spec))
        if image is not None and rbd_volumes.made_here(volume):
            await gw.leases.release(name)
            await ceph_client.arun(rbd_volumes.drop_made, image, gw.ceph)
        gw.catalog.remove_volume(name)
        await gw.leases.release(name)
        if args.caller.tenant:
            # a tenant's volume is an image gatewayd made in its own state dir, which nobody
            # else can reach: it goes with its row
            images = gw.settings.state_dir / "volumes"
            if Path(volume.path).parent == images:
                await trio.to_thread.run_sync(Path(volume.path).unlink, True)
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
    tenant = args.caller.user if args.caller.tenant else None
    return await gw.rootfs.mount(args.text("name"), args.text("mode"),
                                 userns=args.flag("userns"), ids=args.opt_idmap("idmap"),
                                 tenant=tenant)


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
