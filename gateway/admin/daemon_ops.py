"""Ops on gatewayd itself: `shutdown`.

A plain `shutdown` (like SIGTERM, a package upgrade or `systemctl restart`) ends gatewayd only:
the data plane, qemu-storage-daemon, loop devices, kernel mounts and fuse2fs go on serving every
running container, and the next gatewayd adopts them. `shutdown --all` is the explicit act that
stops everything: it is refused while gateway domains run unless `force`, which stops them
first; then every rootfs is unmounted, every export closed, the data plane and QSD stopped.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from gateway.admin.args import Args
from gateway.admin.gateway import Gateway
from gateway.dataplane import process as dataplane
from gateway.dataplane.view import RemoteView
from gateway.errors import Conflict, GatewayError
from gateway.log import fields

log = logging.getLogger("gateway.admin.daemon_ops")


async def _running_domains(gw: Gateway) -> list[str]:
    if not gw.libvirt_uri:
        return sorted(gw.domain_volumes)
    from gateway.libvirt.domain import list_domains
    try:
        domains = await trio.to_thread.run_sync(lambda: list_domains(uri=gw.libvirt_uri))
    except GatewayError:
        return sorted(gw.domain_volumes)
    return sorted(str(d["name"]) for d in domains if d["state"] == "running")


async def shutdown(gw: Gateway, args: Args) -> dict[str, Any]:
    everything = args.flag("all")
    if everything:
        running = await _running_domains(gw)
        if running and not args.flag("force"):
            raise Conflict(f"gateway domains still run ({', '.join(running)}): stop them "
                           "first, or use --force to stop them too")
        if running:
            from gateway.libvirt.domain import stop_domain
            uri = gw.libvirt_uri
            for name in running:
                await trio.to_thread.run_sync(functools.partial(stop_domain, name, uri=uri))
                gw.domain_volumes.pop(name, None)
        gw.jobs.halt_all()  # a copy holds its volume's lock: stop it before the unmounts
        await gw.rootfs.unmount_all()
        await gw.exports.close_all()
        view = gw.exports.view
        if isinstance(view, RemoteView):
            if gw.components.dataplane is not None:
                gw.components.dataplane.expect_exit()
            await dataplane.stop(view)
        gw.qsd.keep_running = False
    log.info("shutdown requested", extra=fields(all=everything))
    gw.stopping.set()
    return {"stopping": True, "all": everything}
