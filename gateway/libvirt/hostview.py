"""Dropping the host's view of a running container's rootfs (nova's clean_lxc_namespace).

Measured on this host (libvirt 9.0, `<filesystem type='mount'>`): libvirt_lxc pivots the container
into a private copy of the source mount (no `master:` peer in the container's mountinfo), so
unmounting the source path on the host -- which propagates into libvirtd's slave namespace -- does
not touch the container: it keeps its rootfs and the filesystem stays alive until the container
exits. The host can then no longer reach the rootfs by that path.
"""

from __future__ import annotations

from pathlib import Path

from gateway import command
from gateway.errors import CommandError
from gateway.libvirt.hostprep import mount_propagation


class HostViewError(CommandError):
    """Unmounting the host-side rootfs mount failed."""


def release_host_view(rootfs_path: Path | str) -> bool:
    """Unmount the topmost host mount at `rootfs_path` (call once the domain runs). Returns False
    when nothing is mounted there."""
    path = Path(rootfs_path)
    if mount_propagation(path) is None:
        return False
    command.run(["umount", path], error=HostViewError)
    return True
