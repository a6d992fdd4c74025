"""The Gateway: what every admin op acts on.

gatewayd builds it in two explicit steps. `Gateway(settings, catalog)` is what the start-up
reconcile needs (nothing runs yet); `attach(Components(...))` gives it the running parts (QSD, the
exports, rootfs delivery, metrics) in one step, once they all run. Only then does gatewayd hand it
to the ops (gateway.admin.ops.Dispatcher refuses a Gateway without its components), so no handler
ever sees a half-built one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.admin.jobs import JobTable
from gateway.catalog import Catalog
from gateway.ceph.client import ClientConfig
from gateway.ceph.leases import Leases
from gateway.config import Settings
from gateway.errors import InternalError
from gateway.supervisor import Supervisor

if TYPE_CHECKING:
    from gateway.attach.manager import RootfsManager
    from gateway.daemon.metrics import Metrics
    from gateway.dataplane.guard import DataPlaneGuard
    from gateway.export.manager import Exports
    from gateway.nbd.qsd import StorageDaemon


@dataclass(frozen=True)
class Components:
    """The running parts of gatewayd, started before the admin socket opens."""

    qsd: StorageDaemon
    exports: Exports
    rootfs: RootfsManager
    metrics: Metrics
    dataplane: DataPlaneGuard | None = None  # None: an in-process block view (tests, tools)


class Gateway:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.started = time.monotonic()
        # One lock per volume: requests for one volume are serialised, volumes proceed in parallel.
        self._locks: dict[str, trio.Lock] = {}
        self.jobs = JobTable()
        # gatewayd's long-lived components: a failing one is restarted, never the daemon's end.
        self.supervisor = Supervisor()
        self.libvirt_uri = settings.libvirt_uri
        self.libvirt_connected = False
        # running gateway domain -> its volume (domain start, lifecycle events, the hook)
        self.domain_volumes: dict[str, str] = {}
        self.reconcile_report: dict[str, Any] = {}
        # This host's writer leases on RBD images (renewed by gatewayd's nursery).
        # How long a Ceph cluster may take to answer, and what each cluster last answered.
        self.ceph = ClientConfig(settings.ceph_timeout)
        self.leases = Leases(settings.host_id, self.ceph, duration=settings.lease_seconds)
        self._components: Components | None = None
        # Set by the `shutdown` op: gatewayd answers it and exits.
        self.stopping = trio.Event()

    def attach(self, components: Components) -> None:
        """The one step that completes the Gateway (gatewayd, once every component runs)."""
        if self._components is not None:
            raise InternalError("gateway: components attached twice")
        self._components = components

    @property
    def components(self) -> Components:
        if self._components is None:
            raise InternalError("gateway: used before its components were attached")
        return self._components

    @property
    def qsd(self) -> StorageDaemon:
        return self.components.qsd

    @property
    def exports(self) -> Exports:
        return self.components.exports

    @property
    def rootfs(self) -> RootfsManager:
        return self.components.rootfs

    @property
    def metrics(self) -> Metrics:
        return self.components.metrics

    @property
    def own_dirs(self) -> tuple[Path, ...]:
        """The gateway's own paths: no image path may lie inside them (the run dir with the
        block view and sockets, the images it made, the catalog)."""
        catalog = self.settings.catalog_path
        return (self.settings.run_dir, self.settings.state_dir / "volumes", catalog,
                *(catalog.with_name(catalog.name + suffix) for suffix in ("-wal", "-shm")))

    def lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    def volume_json(self, name: str) -> dict[str, Any]:
        out = self.catalog.volume(name).to_json()
        exports = self.exports
        export = exports.active.get(name)
        out["exported"] = export is not None
        out["uri"] = export.uri if export is not None else None
        # lingering after a umount, closed at the next volume change or after --export-linger
        out["export_idle"] = name in exports.idle
        # its bind mount's loop device, kept bound for the next mount of the same window
        out["standby_loop"] = exports.standby_device(name)
        out["attachment"] = self.rootfs.attachment_of(name)
        out["overlays"] = self.catalog.overlays_of(name)
        # an RBD volume's writer lease on this host (none, held or lost); None for a file
        rbd = self.catalog.rbd_image(name)
        out["lease"] = None if rbd is None else self.leases.state(name).value
        # tenancy: the owner's uid (None: the admin's) and whether tenants may make overlays
        out["owner"], out["published"] = self.catalog.tenancy(name)
        return out
