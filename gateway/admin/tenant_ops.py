"""Admin ops on tenancy (`volume-publish`, `volume-unpublish`, `volume-chown`, admin only) and
what the dispatcher reads before it applies the rights table (gateway.tenants.rights): who the
caller is, and the facts its tenant rule looks at."""

from __future__ import annotations

import logging
import pwd
from typing import Any

import trio

from gateway.admin.args import Args
from gateway.admin.gateway import Gateway
from gateway.admin.server import Peer
from gateway.errors import GatewayError, NotFound
from gateway.log import fields
from gateway.tenants import ids as tenant_ids
from gateway.tenants import rights
from gateway.tenants.rights import Caller, Facts, Role

log = logging.getLogger("gateway.admin.tenant_ops")


async def caller_of(peer: Peer) -> Caller:
    """The peer as a caller: tenants get their user name (their /etc/subuid entries and
    messages name it; a uid without a passwd entry goes by its number)."""
    if peer.role is Role.ADMIN:
        return Caller(Role.ADMIN, peer.uid, "root" if peer.uid == 0 else str(peer.uid))
    try:
        entry = await trio.to_thread.run_sync(pwd.getpwuid, peer.uid)
    except KeyError:
        return Caller(peer.role, peer.uid, str(peer.uid))
    return Caller(peer.role, peer.uid, entry.pw_name)


async def _domains(gw: Gateway) -> dict[str, str]:
    """Every gateway domain (running or only defined) -> its volume."""
    found = dict(gw.domain_volumes)
    if gw.libvirt_uri:
        from gateway.libvirt.domain import list_domains
        uri = gw.libvirt_uri
        try:
            listed = await trio.to_thread.run_sync(lambda: list_domains(uri=uri))
        except GatewayError as exc:
            log.warning("listing domains for a tenant's request failed",
                        extra=fields(error=exc.message))
            listed = []
        found.update({str(d["name"]): str(d["volume"]) for d in listed})
    return found


async def facts_for(gw: Gateway, caller: Caller, op: str) -> Facts:
    """What `caller`'s rule for `op` looks at (nothing for an admin)."""
    if not caller.tenant or op not in rights.TENANT_RULES:
        return Facts()
    domains = await _domains(gw) if rights.needs_domains(caller, op) else {}
    subids = False
    if rights.needs_subids(caller, op):
        found = await trio.to_thread.run_sync(tenant_ids.own_range, caller.user)
        subids = found is not None
    return Facts(owners=gw.catalog.owners(), published=gw.catalog.published(),
                 domains=domains, subids=subids)


async def _publish(gw: Gateway, name: str, published: bool) -> dict[str, Any]:
    async with gw.lock(name):
        gw.catalog.set_published(name, published)
    log.info("volume published" if published else "volume unpublished",
             extra=fields(volume=name))
    return gw.volume_json(name)


async def volume_publish(gw: Gateway, args: Args) -> dict[str, Any]:
    """Let tenants make overlays of the volume."""
    return await _publish(gw, args.text("name"), True)


async def volume_unpublish(gw: Gateway, args: Args) -> dict[str, Any]:
    """No new tenant overlays of the volume (those made stay)."""
    return await _publish(gw, args.text("name"), False)


async def volume_chown(gw: Gateway, args: Args) -> dict[str, Any]:
    """Give the volume to a user (a name or a uid; root gives it back to the admin)."""
    name, user = args.text("name"), args.text("user")
    uid = await trio.to_thread.run_sync(_uid_of, user)
    async with gw.lock(name):
        gw.catalog.set_owner(name, uid or None)
    log.info("volume owner changed", extra=fields(volume=name, owner=uid))
    return gw.volume_json(name)


def _uid_of(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        pass
    if user.isdigit():
        return int(user)
    raise NotFound(f"no user named {user}")
