"""The gateway's operations, as the admin socket exposes them.

`Gateway.handle` dispatches a Request to the method named in OPS. Methods take the request's args,
validate them, and return JSON-ready results or raise GatewayError.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import trio

from gateway.admin.protocol import PROTOCOL_VERSION, Request
from gateway.admin.server import Peer
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import BackendError, Conflict, GatewayError, InvalidArgument
from gateway.log import fields
from gateway.volumes import register

if TYPE_CHECKING:
    from gateway.attach.manager import RootfsManager
    from gateway.daemon.metrics import Metrics
    from gateway.export.manager import Exports
    from gateway.nbd.qsd import StorageDaemon

log = logging.getLogger("gateway.admin.service")
VERSION = "0.1.0"
JOB_THREADS = 2

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


class MountFlags(TypedDict):
    nosuid: bool
    noexec: bool


def mount_flags(args: dict[str, Any]) -> MountFlags:
    """nosuid and noexec of a volume being made: setuid binaries in it are honoured only when the
    request says `setuid: true` (nosuid is the default, so `nosuid: true` changes nothing)."""
    setuid = arg_bool(args, "setuid")
    if setuid and arg_bool(args, "nosuid"):
        raise InvalidArgument("setuid and nosuid contradict each other")
    return {"nosuid": not setuid, "noexec": arg_bool(args, "noexec")}


class Gateway:
    """The daemon's state: the catalog plus the running components (set by gateway.daemon.main)."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.started = time.monotonic()
        # One lock per volume: requests for one volume are serialised, volumes proceed in parallel.
        self._locks: dict[str, trio.Lock] = {}
        self.qsd: StorageDaemon | None = None
        self._exports: Exports | None = None
        self._rootfs: RootfsManager | None = None
        self.libvirt_uri = settings.libvirt_uri
        self.libvirt_connected = False
        self.domain_volumes: dict[str, str] = {}
        self.reconcile_report: dict[str, Any] = {}
        self.metrics: Metrics | None = None
        # Worker threads for jobs (copies, imports, blank volumes): a few of their own, so
        # that mounts, which use trio's default limiter, never wait behind them.
        self.job_limiter = trio.CapacityLimiter(JOB_THREADS)

    @property
    def exports(self) -> Exports:
        if self._exports is None:
            raise BackendError("the export engine is not running")
        return self._exports

    @property
    def rootfs(self) -> RootfsManager:
        if self._rootfs is None:
            raise BackendError("rootfs delivery is not running")
        return self._rootfs

    def attach_components(self, qsd: StorageDaemon, exports: Exports,
                          rootfs: RootfsManager) -> None:
        self.qsd = qsd
        self._exports = exports
        self._rootfs = rootfs

    @property
    def own_dirs(self) -> tuple[Path, ...]:
        """The gateway's own paths: no image path may lie inside them (the run dir with the
        block view and sockets, the images it made, the catalog)."""
        catalog = self.settings.catalog_path
        return (self.settings.run_dir, self.settings.state_dir / "volumes", catalog,
                *(catalog.with_name(catalog.name + suffix) for suffix in ("-wal", "-shm")))

    def lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    async def handle(self, request: Request, peer: Peer) -> Any:
        fn = OPS.get(request.op)
        if fn is None:
            raise InvalidArgument(f"unknown op {request.op!r}")
        log.debug("request", extra=fields(op=request.op, uid=peer.uid, pid=peer.pid))
        if self.metrics is not None:
            self.metrics.requests.labels(request.op).inc()
        try:
            return await fn(self, request.args)
        except GatewayError as exc:
            if self.metrics is not None:
                self.metrics.errors.labels(exc.code).inc()
            raise
        except Exception:
            if self.metrics is not None:
                self.metrics.errors.labels("internal").inc()
            raise

    def volume_json(self, name: str) -> dict[str, Any]:
        out = self.catalog.volume(name).to_json()
        export = self._exports.active.get(name) if self._exports is not None else None
        out["exported"] = export is not None
        out["uri"] = export.uri if export is not None else None
        # lingering after a umount, closed at the next volume change or after --export-linger
        out["export_idle"] = self._exports is not None and name in self._exports.idle
        # its bind mount's loop device, kept bound for the next mount of the same window
        out["standby_loop"] = (self._exports.standby_device(name) if self._exports is not None
                               else None)
        out["attachment"] = self._rootfs.attachment_of(name) if self._rootfs else None
        out["overlays"] = self.catalog.overlays_of(name)
        return out


@op("status")
async def status(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    qsd = gw.qsd.health() if gw.qsd is not None else None
    healthy = qsd is not None and bool(qsd.get("ready"))
    attachments = gw.catalog.attachments()
    return {
        "protocol": PROTOCOL_VERSION,
        "version": VERSION,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - gw.started, 3),
        "healthy": healthy,
        "state_dir": str(gw.settings.state_dir),
        "run_dir": str(gw.settings.run_dir),
        "catalog_schema": gw.catalog.version,
        "volumes": len(gw.catalog.volumes()),
        "exports": len(gw._exports.active) if gw._exports is not None else 0,
        "mounts": sum(1 for a in attachments if a.state == "mounted"),
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


@op("volume-add")
async def volume_add(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    async with gw.lock(name):
        flags = mount_flags(args)
        fstype = register.check_fstype(args.get("fstype"))
        volume = await trio.to_thread.run_sync(lambda: register.examine(
            name, args.get("path"), args.get("format"), read_only=arg_bool(args, "read_only"),
            fstype=fstype, allowed_roots=gw.settings.allowed_roots, forbidden=gw.own_dirs,
            **flags))
        gw.catalog.add_volume(volume)
    log.info("volume added", extra=fields(volume=name, format=volume.format, path=volume.path))
    return gw.volume_json(name)


@op("volume-set")
async def volume_set(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """Change how a volume's rootfs is mounted from now on: `setuid` (honour setuid binaries)
    and `noexec`; refused while it is mounted."""
    name = register.check_name(args.get("name"))
    nosuid = not arg_bool(args, "setuid") if "setuid" in args else None
    noexec = arg_bool(args, "noexec") if "noexec" in args else None
    if nosuid is None and noexec is None:
        raise InvalidArgument("nothing to change: give setuid or noexec")
    async with gw.lock(name):
        gw.catalog.volume(name)
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        gw.catalog.update_volume(name, nosuid=nosuid, noexec=noexec)
    log.info("volume changed", extra=fields(volume=name, nosuid=nosuid, noexec=noexec))
    return gw.volume_json(name)


@op("volume-list")
async def volume_list(gw: Gateway, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [gw.volume_json(v.name) for v in gw.catalog.volumes()]


@op("volume-show")
async def volume_show(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    return gw.volume_json(register.check_name(args.get("name")))


@op("volume-remove")
async def volume_remove(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
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
        from gateway.admin.lifecycle_ops import release_base
        async with gw.lock(base):
            release_base(gw, base)
    log.info("volume removed", extra=fields(volume=name))
    return {"name": name, "removed": True}


@op("export")
async def export(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    async with gw.lock(name):
        result = await gw.exports.open(name)
    return {"name": name, "uri": result.uri}


@op("unexport")
async def unexport(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    async with gw.lock(name):
        gw.catalog.volume(name)
        if gw.catalog.attachment(name) is not None:
            raise Conflict(f"volume {name} is mounted; umount it first")
        await gw.exports.close(name)
    return {"name": name, "exported": False}


@op("probe")
async def probe(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    from gateway.probe.core import probe_reader_async
    name = register.check_name(args.get("name"))
    gw.catalog.volume(name)
    backend = gw.exports.get(name).backend
    result = await probe_reader_async(backend.read_at, backend.size)
    return result.to_json()


@op("mount")
async def mount(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    name = register.check_name(args.get("name"))
    mode = args.get("mode") or "bind"
    if not isinstance(mode, str):
        raise InvalidArgument("mode must be bind or fuse")
    return await gw.rootfs.mount(name, mode)


@op("umount")
async def umount(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """`if_unused` (the libvirt hook on release): keep the mount while another running gateway
    domain than `domain` still boots from the volume."""
    name = register.check_name(args.get("name"))
    if arg_bool(args, "if_unused"):
        # Never ask libvirt here: the hook calls this while libvirtd holds the dying domain, so
        # a libvirt query would wait for the hook that waits for us. gatewayd's own map of
        # running domains (from domain start and lifecycle events) answers instead.
        domain = args.get("domain")
        if isinstance(domain, str):
            gw.domain_volumes.pop(domain, None)
        users = sorted(d for d, v in gw.domain_volumes.items() if v == name)
        if users:
            return {"name": name, "mounted": True, "kept_for": users}
    return await gw.rootfs.umount(name, force=arg_bool(args, "force"))


@op("metrics")
async def metrics(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    if gw.metrics is None:
        raise BackendError("metrics are not available yet")
    if gw.qsd is not None:
        gw.metrics.qsd_restarts.set(gw.qsd.restarts)
    return {"text": gw.metrics.render()}
