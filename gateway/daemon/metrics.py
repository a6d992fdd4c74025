"""Prometheus metrics (text exposition through `gatewayctl metrics`)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PHASES = ("export", "probe", "window", "loop", "mount", "bind", "fuse2fs")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SNAPSHOT_CONSISTENCIES = ("frozen", "crash-consistent", "unmounted")


class Metrics:
    def __init__(self, volumes: Callable[[], int], exports: Callable[[], int],
                 mounts: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
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
        self.qsd_restarts = Gauge("gateway_qsd_restarts", "qemu-storage-daemon restarts",
                                  registry=self.registry)
        for name, doc, fn in (("gateway_volumes", "Registered volumes", volumes),
                              ("gateway_exports", "Exported volumes", exports),
                              ("gateway_mounts", "Mounted rootfs attachments", mounts)):
            Gauge(name, doc, registry=self.registry).set_function(fn)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.mount_phase.labels(phase).observe(seconds)

    def observe_freeze(self, seconds: float) -> None:
        self.snapshot_freeze.observe(seconds)

    def count_snapshot(self, consistency: str) -> None:
        self.snapshots.labels(consistency).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
