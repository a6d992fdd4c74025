"""The data plane: the block view and its NBD connections in a process that outlives gatewayd.

Modules: service (the process: block view, NBD clients, control socket), __main__ (its entry
point, `python -m gateway.dataplane --run-dir RUN_DIR`); gatewayd's side: process (find or start
it), view (RemoteView/LocalView, what the managers ask of it) and guard (its watch on the
process: a death is reported, its mounts torn down, a new data plane started).
"""

__all__ = ["guard", "process", "service", "view"]
