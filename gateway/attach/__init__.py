"""Attachments: a volume's rootfs delivered at RUN_DIR/rootfs/VOL, in bind or fuse mode.

Modules: manager (the rootfs manager: mount, umount, journal, standby loops), attachment (the
blocking attach and detach steps, run-dir layout, crash reconcile and sweep), states (an
attachment's lifecycle as a table, no I/O), journal (the journal's entries as typed records).
"""

__all__ = ["attachment", "journal", "manager", "states"]
