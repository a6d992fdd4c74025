"""Admin ops for libvirt-lxc domains on gateway rootfs: xml, start, stop, list.

A domain start mounts its volume (unless mounted), then defines and starts the domain in a worker
thread. The volume lock is not held while libvirt starts the domain, because libvirt runs the
gateway hook, which calls back into gatewayd to mount the same volume (idempotently). Stopping a
domain releases its volume's mount unless another running gateway domain uses it (the same rule
the lifecycle watcher, gateway.libvirt.watcher, applies to domains that end on their own).

libvirt itself is imported only when a domain op runs.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from gateway.admin.args import Args
from gateway.admin.gateway import Gateway
from gateway.errors import Conflict, GatewayError
from gateway.libvirt.watcher import release_if_unused
from gateway.log import fields
from gateway.userns.slices import IdMap

log = logging.getLogger("gateway.admin.domain_ops")


def build_xml(gw: Gateway, args: Args, rootfs: str | None = None,
              ids: IdMap | None = None) -> tuple[str, str]:
    from gateway.libvirt.domain import domain_xml
    name, volume = args.text("name"), args.text("volume")
    path = rootfs or str(gw.settings.run_dir / "rootfs" / volume)
    xml = domain_xml(name, path, volume, args.text("mode"), init=args.text("init"),
                     args=args.words("args"), memory_mib=args.number("memory"),
                     vcpus=args.number("vcpus"), ids=ids)
    return name, xml


async def domain_xml(gw: Gateway, args: Args) -> dict[str, Any]:
    gw.catalog.volume(args.text("volume"))
    name, xml = build_xml(gw, args)
    return {"name": name, "xml": xml}


async def domain_start(gw: Gateway, args: Args) -> dict[str, Any]:
    from gateway.libvirt.domain import start_domain
    name, _ = build_xml(gw, args)  # validate everything before touching anything
    volume, mode = args.text("volume"), args.text("mode")
    userns = args.flag("userns")
    if userns:
        # A slice per domain: a volume already booting another domain is not shared with it.
        users = sorted(d for d, v in gw.domain_volumes.items() if v == volume and d != name)
        if users:
            raise Conflict(f"volume {volume} already boots domain {users[0]}; a --userns domain "
                           "needs a volume of its own")
    mounted_here = gw.rootfs.attachment_of(volume) is None
    tenant = args.caller.user if args.caller.tenant else None
    attached = await gw.rootfs.mount(volume, mode, userns=userns, domain=name, tenant=tenant)
    mapped = attached.get("idmap")
    ids = IdMap(**mapped) if isinstance(mapped, dict) else None
    _, xml = build_xml(gw, args, attached["rootfs"], ids)
    try:
        await trio.to_thread.run_sync(lambda: start_domain(xml, uri=gw.libvirt_uri))
    except BaseException:
        if mounted_here:
            with trio.CancelScope(shield=True):
                try:
                    await gw.rootfs.umount(volume)
                except GatewayError as exc:
                    log.error("cleanup after failed domain start failed",
                              extra=fields(domain=name, volume=volume, error=exc.message))
        raise
    gw.domain_volumes[name] = volume
    log.info("domain started", extra=fields(domain=name, volume=volume, mode=mode))
    if args.flag("release_host_view"):
        await gw.rootfs.release_host_view(volume)
    result = {"name": name, "volume": volume, "mode": attached["mode"],
              "rootfs": attached["rootfs"]}
    return {**result, "idmap": mapped} if mapped is not None else result


async def domain_stop(gw: Gateway, args: Args) -> dict[str, Any]:
    from gateway.libvirt.domain import list_domains, stop_domain
    name = args.text("name")
    domains = {d["name"]: d for d in await trio.to_thread.run_sync(
        lambda: list_domains(uri=gw.libvirt_uri))}
    volume = domains[name]["volume"] if name in domains else gw.domain_volumes.get(name)
    existed = await trio.to_thread.run_sync(lambda: stop_domain(name, uri=gw.libvirt_uri))
    gw.domain_volumes.pop(name, None)
    if volume is not None:
        await release_if_unused(gw, volume, exclude=name)
    return {"name": name, "stopped": existed, "volume": volume}


async def domain_list(gw: Gateway, args: Args) -> list[dict[str, Any]]:
    from gateway.libvirt.domain import list_domains
    return await trio.to_thread.run_sync(lambda: list_domains(uri=gw.libvirt_uri))
