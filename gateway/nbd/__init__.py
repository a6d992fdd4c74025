"""NBD exports: QMP (sans-I/O core and trio adapter), the supervised qemu-storage-daemon, block
node graphs, and the libnbd client on trio.

Modules: qmp, qmp_trio, qsd, nodes, client, transient.
"""

__all__ = ["client", "nodes", "qmp", "qmp_trio", "qsd", "transient"]
