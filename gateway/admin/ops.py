"""The admin surface: every op the socket serves, by name, and the dispatcher.

OPS is the whole public surface in one table: op name -> handler. Each op's argument keys and
types are declared in gateway.admin.args.SPECS (the two tables name the same ops; a test checks
that they agree with each other, with gatewayctl and with the libvirt hook). Who may call each
op, with which arguments, is the rights table (gateway.tenants.rights), which the dispatcher
applies before any op runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.admin import args as arguments
from gateway.admin import daemon_ops, domain_ops, lifecycle_ops, tenant_ops, volume_ops
from gateway.admin.args import Args
from gateway.admin.gateway import Gateway
from gateway.admin.protocol import Request
from gateway.admin.server import Peer
from gateway.errors import Forbidden, GatewayError, InternalError, InvalidArgument
from gateway.log import fields
from gateway.tenants import rights

log = logging.getLogger("gateway.admin.ops")

Op = Callable[[Gateway, Args], Awaitable[Any]]

OPS: dict[str, Op] = {
    "status": volume_ops.status,
    "metrics": volume_ops.metrics,
    "volume-add": volume_ops.volume_add,
    "volume-add-pool": lifecycle_ops.volume_add_pool,
    "volume-add-rbd": volume_ops.volume_add_rbd,
    "volume-release": volume_ops.volume_release,
    "volume-set": volume_ops.volume_set,
    "volume-list": volume_ops.volume_list,
    "volume-show": volume_ops.volume_show,
    "volume-remove": volume_ops.volume_remove,
    "volume-create": lifecycle_ops.volume_create,
    "volume-import": lifecycle_ops.volume_import,
    "volume-resize": lifecycle_ops.volume_resize,
    "volume-snapshot": lifecycle_ops.volume_snapshot,
    "volume-save": lifecycle_ops.volume_save,
    "export": volume_ops.export,
    "unexport": volume_ops.unexport,
    "probe": volume_ops.probe,
    "mount": volume_ops.mount,
    "umount": volume_ops.umount,
    "job-status": lifecycle_ops.job_status,
    "job-list": lifecycle_ops.job_list,
    "job-cancel": lifecycle_ops.job_cancel,
    "domain-xml": domain_ops.domain_xml,
    "domain-start": domain_ops.domain_start,
    "domain-stop": domain_ops.domain_stop,
    "domain-list": domain_ops.domain_list,
    "shutdown": daemon_ops.shutdown,
    "volume-publish": tenant_ops.volume_publish,
    "volume-unpublish": tenant_ops.volume_unpublish,
    "volume-chown": tenant_ops.volume_chown,
}


class Dispatcher:
    """Serves requests from the admin socket on a complete Gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._metrics = gw.metrics  # InternalError for a Gateway without its components

    async def handle(self, request: Request, peer: Peer) -> Any:
        handler = OPS.get(request.op)
        if handler is None:
            raise InvalidArgument(f"unknown op {request.op!r}")
        log.debug("request", extra=fields(op=request.op, uid=peer.uid, pid=peer.pid))
        metrics = self._metrics
        metrics.requests.labels(request.op).inc()
        try:
            # The rights table decides before anything runs (admins pass at once).
            caller = await tenant_ops.caller_of(peer)
            facts = await tenant_ops.facts_for(self.gw, caller, request.op)
            rights.enforce(caller, request.op, request.args, facts)
            args = arguments.parse(request.op, request.args)
            args.caller = caller
            return rights.shape(caller, request.op, await handler(self.gw, args), facts)
        except GatewayError as exc:
            metrics.errors.labels(exc.code).inc()
            if isinstance(exc, Forbidden):
                metrics.count_refusal(exc.reason)
                log.info("request refused", extra=fields(op=request.op, uid=peer.uid,
                                                         reason=exc.reason))
            raise
        except Exception:
            metrics.errors.labels(InternalError.code).inc()
            raise
