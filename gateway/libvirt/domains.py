"""libvirt-lxc domains on gateway rootfs: the admin ops and the lifecycle watcher.

A domain start mounts its volume (unless mounted), then defines and starts the domain in a worker
thread. The volume lock is not held while libvirt starts the domain, because libvirt runs the
gateway hook, which calls back into gatewayd to mount the same volume (idempotently).
When a gateway domain stops, however it stops, the watcher tears its mount down unless another
running gateway domain still uses the volume.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from gateway.admin.service import Gateway, op
from gateway.errors import BackendError, GatewayError, InvalidArgument
from gateway.log import fields
from gateway.volumes.register import check_name

if TYPE_CHECKING:
    from gateway.libvirt.events import LifecycleEvents

log = logging.getLogger("gateway.libvirt.domains")
STOP_EVENTS = ("stopped", "crashed")


def _int(args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{key} must be a positive integer")
    return value


def _str_list(args: dict[str, Any], key: str) -> list[str]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key} must be a list of strings")
    return value


def build_xml(gw: Gateway, args: dict[str, Any], rootfs: str | None = None) -> tuple[str, str]:
    from gateway.libvirt.domain import domain_xml, validate_name
    name = validate_name(args.get("name"))  # type: ignore[arg-type]
    volume = check_name(args.get("volume"))
    mode = args.get("mode") or "bind"
    init = args.get("init") or "/sbin/init"
    if not isinstance(init, str):
        raise InvalidArgument("init must be a path")
    path = rootfs or str(gw.settings.run_dir / "rootfs" / volume)
    xml = domain_xml(name, path, volume, str(mode), init=init, args=_str_list(args, "args"),
                     memory_mib=_int(args, "memory", 128), vcpus=_int(args, "vcpus", 1))
    return name, xml


@op("domain-xml")
async def domain_xml_op(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    gw.catalog.volume(check_name(args.get("volume")))
    name, xml = build_xml(gw, args)
    return {"name": name, "xml": xml}


@op("domain-start")
async def domain_start(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    from gateway.libvirt.domain import start_domain
    name, _ = build_xml(gw, args)  # validate everything before touching anything
    volume = check_name(args.get("volume"))
    mode = str(args.get("mode") or "bind")
    mounted_here = gw.rootfs.attachment_of(volume) is None
    attached = await gw.rootfs.mount(volume, mode)
    _, xml = build_xml(gw, args, attached["rootfs"])
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
    if args.get("release_host_view"):
        await gw.rootfs.release_host_view(volume)
    return {"name": name, "volume": volume, "mode": attached["mode"],
            "rootfs": attached["rootfs"]}


@op("domain-stop")
async def domain_stop(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    from gateway.libvirt.domain import list_domains, stop_domain, validate_name
    name = validate_name(args.get("name"))  # type: ignore[arg-type]
    domains = {d["name"]: d for d in await trio.to_thread.run_sync(
        lambda: list_domains(uri=gw.libvirt_uri))}
    volume = domains[name]["volume"] if name in domains else gw.domain_volumes.get(name)
    existed = await trio.to_thread.run_sync(lambda: stop_domain(name, uri=gw.libvirt_uri))
    gw.domain_volumes.pop(name, None)
    if volume is not None:
        await release_if_unused(gw, volume, exclude=name)
    return {"name": name, "stopped": existed, "volume": volume}


@op("domain-list")
async def domain_list(gw: Gateway, args: dict[str, Any]) -> list[dict[str, Any]]:
    from gateway.libvirt.domain import list_domains
    return await trio.to_thread.run_sync(lambda: list_domains(uri=gw.libvirt_uri))


async def release_if_unused(gw: Gateway, volume: str, exclude: str | None = None) -> None:
    """Tear the volume's mount down unless another running gateway domain uses it."""
    from gateway.libvirt.domain import list_domains
    if gw.rootfs.attachment_of(volume) is None:
        return
    try:
        domains = await trio.to_thread.run_sync(lambda: list_domains(uri=gw.libvirt_uri))
    except GatewayError:
        domains = []
    users = [d["name"] for d in domains
             if d["volume"] == volume and d["name"] != exclude and d["state"] == "running"]
    if users:
        log.info("volume still in use", extra=fields(volume=volume, domains=users))
        return
    await gw.rootfs.umount(volume)


async def watch_domains(gw: Gateway, *, task_status: trio.TaskStatus[None]
                        = trio.TASK_STATUS_IGNORED) -> None:
    """Follow libvirt lifecycle events; retried while libvirtd is away."""
    from gateway.libvirt.events import LifecycleEvents
    task_status.started()
    while True:
        events = LifecycleEvents(gw.libvirt_uri)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(events.run)
                gw.libvirt_connected = True
                log.info("following libvirt domain events", extra=fields(uri=gw.libvirt_uri))
                await _consume(gw, events)
        except* BackendError as group:
            log.debug("libvirt not reachable", extra=fields(error=str(group.exceptions[0])))
        gw.libvirt_connected = False
        await trio.sleep(2.0)


async def _consume(gw: Gateway, events: LifecycleEvents) -> None:
    async for event in events.receive:
        if event.event == "started" and event.volume is not None:
            gw.domain_volumes[event.name] = event.volume
        if event.event not in STOP_EVENTS or event.volume is None:
            continue
        log.info("gateway domain ended", extra=fields(domain=event.name, event=event.event,
                                                      detail=event.detail, volume=event.volume))
        gw.domain_volumes.pop(event.name, None)
        try:
            await release_if_unused(gw, event.volume, exclude=event.name)
        except GatewayError as exc:
            log.error("teardown after domain end failed",
                      extra=fields(domain=event.name, volume=event.volume, error=exc.message))
