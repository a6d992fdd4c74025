"""Attachments: a volume's rootfs delivered at RUN_DIR/rootfs/VOL, in bind or fuse mode.

Modules: manager (the rootfs manager: mount, umount, journal, standby loops, adoption of records),
steps (the blocking attach and detach steps, run-dir layout, crash reconcile and sweep).
"""

__all__ = ["manager", "steps"]
