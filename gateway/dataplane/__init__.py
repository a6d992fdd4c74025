"""The data plane: the block view and its NBD connections in a process that outlives gatewayd.

Modules: service (the process: block view, NBD clients, control socket), __main__ (its entry
point, `python -m gateway.dataplane --run-dir RUN_DIR`).
"""

__all__ = ["service"]
