"""gatewayd: the process that holds the catalog, the admin socket, QSD, the block view and the
libvirt watcher, and wires them together.

Modules: main (entry point, start-up reconcile, component wiring, shutdown), metrics
(Prometheus text), heap (glibc malloc tuning for I/O buffers).
"""

__all__ = ["heap", "main", "metrics"]
