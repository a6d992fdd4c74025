"""Exports: a volume served by qemu-storage-daemon over NBD and read back by the gateway.

Modules: states (the export lifecycle as a table, no I/O), manager (that lifecycle over QSD, the
block view and the catalog: open, claim for a mount, linger idle, retire, close; the reconnecting
VolumeBackend the block view reads through).
"""

__all__ = ["manager", "states"]
