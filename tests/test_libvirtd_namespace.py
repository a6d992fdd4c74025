"""libvirtd's own mount namespace (gateway.libvirt.libvirtd) must not keep copies of the gateway's
private mounts: a copy never sees the host's umount, so the loop device under it would stay busy
for libvirtd's lifetime (found by the soak: a libvirtd started while volumes were mounted made
every later umount fail with "device busy")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.host import mounts
from gateway.libvirt.libvirtd import DROP_PRIVATE_COPIES

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]


def mounted_in_copy(script: str, *targets: Path) -> list[bool]:
    """Which of `targets` a namespace made as libvirtd's is (unshare --mount --propagation
    slave), after `script`, still has mounted."""
    probe = "".join(f'grep -q " {t} " /proc/self/mountinfo && echo y || echo n; '
                    for t in targets)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c",
                           script + probe], capture_output=True, text=True, timeout=30,
                          check=True)
    return [line == "y" for line in proc.stdout.split()]


def test_private_loop_mounts_are_dropped_from_libvirtds_namespace(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=30)
    loop_target, tmpfs_target = tmp_path / "loop", tmp_path / "tmpfs"
    loop_target.mkdir()
    tmpfs_target.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(loop_target)], check=True, timeout=30)
    try:
        mounts.make_private(loop_target)
        mounts.mount("tmpfs", tmpfs_target, "tmpfs")
        try:
            # Without the drop the copy keeps both; with it only the loop-backed one goes.
            assert mounted_in_copy("", loop_target, tmpfs_target) == [True, True]
            assert mounted_in_copy(DROP_PRIVATE_COPIES, loop_target, tmpfs_target) == [
                False, True]
        finally:
            mounts.umount(tmpfs_target)
    finally:
        subprocess.run(["umount", "-d", str(loop_target)], check=True, timeout=30)
