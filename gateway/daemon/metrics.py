"""Prometheus metrics (text exposition through `gatewayctl metrics`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.tenants.rights import REASONS as REFUSAL_REASONS

PHASES = ("export", "probe", "window", "loop", "mount", "bind", "idmap", "fuse2fs")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SNAPSHOT_CONSISTENCIES = ("frozen", "crash-consistent", "unmounted")


class Metrics:
    def __init__(self, volumes: Callable[[], int], exports: Callable[[], int],
                 mounts: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        # requests the rights table refused, by reason (also kept in `refused` for status)
        self.refused: dict[str, int] = {}
        self._refusals = Counter("gateway_refusals", "Admin requests refused for a missing "
                                 "right, by reason", ["reason"], registry=self.registry)
        for reason in REFUSAL_REASONS:
            self._refusals.labels(reason)
        self.mount_phase = Histogram(
            "gateway_mount_phase_seconds", "Time spent in each phase of a rootfs mount",
            ["phase"], buckets=BUCKETS, registry=self.registry)
        self.errors = Counter("gateway_errors", "Admin requests that failed, by error code",
                              ["code"], registry=self.registry)
        self.requests = Counter("gateway_requests", "Admin requests, by op", ["op"],
                                registry=self.registry)
        self.leftovers_found = Counter(
            "gateway_reconcile_leftovers_found", "Leftovers found at reconcile",
            registry=self.registry)
        self.leftovers_cleaned = Counter(
            "gateway_reconcile_leftovers_cleaned", "Leftovers cleaned at reconcile",
            registry=self.registry)
        self.snapshot_freeze = Histogram(
            "gateway_snapshot_freeze_seconds",
            "How long a bind-mode filesystem stayed frozen (FIFREEZE to FITHAW) for a snapshot "
            "or a saved image", buckets=BUCKETS, registry=self.registry)
        self.snapshots = Counter(
            "gateway_snapshots", "Point-in-time copies made (snapshots and saved images), by "
            "consistency", ["consistency"], registry=self.registry)
        for consistency in SNAPSHOT_CONSISTENCIES:
            self.snapshots.labels(consistency)
        self._cluster_up = Gauge(
            "gateway_ceph_cluster_reachable", "Whether a Ceph cluster answered the last "
            "operation on it (1) or not (0), by its ceph.conf", ["cluster"],
            registry=self.registry)
        self.component_failures = Counter(
            "gateway_component_failures", "Failures of gatewayd's long-lived components (each "
            "was restarted), by component", ["component"], registry=self.registry)
        self.dataplane_deaths = Counter(
            "gateway_dataplane_deaths", "Data-plane processes that died under gatewayd (their "
            "volumes' mounts were torn down and a new data plane started)",
            registry=self.registry)
        self.qsd_restarts = Gauge("gateway_qsd_restarts", "qemu-storage-daemon restarts",
                                  registry=self.registry)
        for name, doc, fn in (("gateway_volumes", "Registered volumes", volumes),
                              ("gateway_exports", "Exported volumes", exports),
                              ("gateway_mounts", "Mounted rootfs attachments", mounts)):
            Gauge(name, doc, registry=self.registry).set_function(fn)

    def track_userns(self, attachments: Callable[[], int]) -> None:
        """The gauge of user-namespace attachments (each holds an id slice)."""
        Gauge("gateway_userns_mounts", "Idmapped rootfs attachments of user-namespace domains, "
              "each holding an id slice", registry=self.registry).set_function(attachments)

    def track_leases(self, fenced: Callable[[], int], fencings: Callable[[], int]) -> None:
        """RBD writer leases: volumes fenced now, and fencings found since gatewayd started."""
        Gauge("gateway_rbd_fenced_volumes", "RBD volumes whose writer lease another host took "
              "(their export and mount torn down)", registry=self.registry).set_function(fenced)
        Gauge("gateway_rbd_fencings", "Times an RBD volume of this host was found fenced since "
              "gatewayd started", registry=self.registry).set_function(fencings)

    def set_clusters(self, report: dict[str, dict[str, Any]]) -> None:
        """Each Ceph cluster's state as its last operation found it (1 reachable, 0 not; a
        cluster nothing has talked to yet is absent)."""
        for conf, entry in report.items():
            if entry.get("reachable") is not None:
                self._cluster_up.labels(conf).set(1 if entry["reachable"] else 0)

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._refusals.labels(reason).inc()

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.mount_phase.labels(phase).observe(seconds)

    def observe_freeze(self, seconds: float) -> None:
        self.snapshot_freeze.observe(seconds)

    def count_snapshot(self, consistency: str) -> None:
        self.snapshots.labels(consistency).inc()

    def count_component_failure(self, component: str) -> None:
        self.component_failures.labels(component).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
