"""The gateway's operations, as the admin socket exposes them.

`Gateway.handle` dispatches a Request to the method named in OPS. Methods take the request's args,
validate them, and return JSON-ready results or raise GatewayError.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gateway import volumes
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import Conflict, InvalidArgument
from gateway.log import fields
from gateway.protocol import PROTOCOL_VERSION, Request
from gateway.server import Peer

log = logging.getLogger("gateway.service")
VERSION = "0.1.0"

Op = Callable[["Gateway", dict[str, Any]], Awaitable[Any]]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return register


def arg_bool(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be true or false")
    return value


class Gateway:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.started = time.monotonic()
        # One lock per volume: requests for one volume are serialised, volumes proceed in parallel.
        self._locks: dict[str, trio.Lock] = {}

    def lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    async def handle(self, request: Request, peer: Peer) -> Any:
        fn = OPS.get(request.op)
        if fn is None:
            raise InvalidArgument(f"unknown op {request.op!r}")
        log.debug("request", extra=fields(op=request.op, uid=peer.uid, pid=peer.pid))
        return await fn(self, request.args)

    def volume_json(self, name: str) -> dict[str, Any]:
        return self.catalog.volume(name).to_json()


@op("status")
async def status(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL_VERSION,
        "version": VERSION,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - gw.started, 3),
        "healthy": True,
        "state_dir": str(gw.settings.state_dir),
        "run_dir": str(gw.settings.run_dir),
        "catalog_schema": gw.catalog.version,
        "volumes": len(gw.catalog.volumes()),
    }


@op("volume-add")
async def volume_add(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = volumes.check_name(args.get("name"))
    async with gw.lock(name):
        volume = await trio.to_thread.run_sync(lambda: volumes.examine(
            name, args.get("path"), args.get("format"), read_only=arg_bool(args, "read_only"),
            nosuid=arg_bool(args, "nosuid"), noexec=arg_bool(args, "noexec"),
            allowed_roots=gw.settings.allowed_roots))
        gw.catalog.add_volume(volume)
    log.info("volume added", extra=fields(volume=name, format=volume.format, path=volume.path))
    return gw.volume_json(name)


@op("volume-list")
async def volume_list(gw: Gateway, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [gw.volume_json(v.name) for v in gw.catalog.volumes()]


@op("volume-show")
async def volume_show(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    return gw.volume_json(volumes.check_name(args.get("name")))


@op("volume-remove")
async def volume_remove(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = volumes.check_name(args.get("name"))
    async with gw.lock(name):
        gw.catalog.volume(name)
        if name in gw.catalog.exported():
            raise Conflict(f"volume {name} is exported; unexport it first")
        gw.catalog.remove_volume(name)
    log.info("volume removed", extra=fields(volume=name))
    return {"name": name, "removed": True}
