"""The libvirt lifecycle watcher: when a gateway domain stops, however it stops (destroyed,
shut down, crashed), its volume's mount is torn down unless another running gateway domain still
uses the volume. It also keeps the Gateway's map of running domains (used by the hook's release,
which must not ask libvirt) up to date.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from gateway.admin.gateway import Gateway
from gateway.errors import BackendError, GatewayError
from gateway.log import fields

if TYPE_CHECKING:
    from gateway.libvirt.events import LifecycleEvents

log = logging.getLogger("gateway.libvirt.watcher")
STOP_EVENTS = ("stopped", "crashed")


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


async def resync(gw: Gateway) -> None:
    """Catch up with what libvirt did while nobody listened (gatewayd was away): a volume whose
    gateway domains are all defined but none runs any more lost its container, so its mount
    goes; the running ones are noted. A domain that was also undefined meanwhile leaves no
    trace in libvirt: its mount stays until `umount`."""
    from gateway.libvirt.domain import list_domains
    domains = await trio.to_thread.run_sync(lambda: list_domains(uri=gw.libvirt_uri))
    running = {str(d["volume"]) for d in domains if d["state"] == "running"}
    for d in domains:
        if d["state"] == "running":
            gw.domain_volumes[str(d["name"])] = str(d["volume"])
    ended = {str(d["volume"]) for d in domains} - running
    for record in gw.catalog.attachments():
        if record.volume in ended:
            log.info("a gateway domain ended while gatewayd was away; tearing its mount down",
                     extra=fields(volume=record.volume))
            try:
                await gw.rootfs.umount(record.volume)
            except GatewayError as exc:
                log.error("teardown after resync failed", extra=fields(volume=record.volume,
                                                                       error=exc.message))


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
                await resync(gw)
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
