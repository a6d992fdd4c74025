"""Exports: a volume served by qemu-storage-daemon over NBD and read back by the gateway.

Modules: manager (the export lifecycle: open, claim for a mount, linger idle, retire, close;
the reconnecting VolumeBackend the block view reads through).
"""

__all__ = ["manager"]
