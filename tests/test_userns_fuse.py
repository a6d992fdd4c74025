"""Issue 17, fuse mode: user-namespace domains on fuse2fs through the id-shifting layer.

A `--mode fuse --userns` domain with a real gatewayd and libvirtd: inside, `id -u` is 0,
/proc/self/uid_map shows the slice and /etc/marker is owned by 0; on the host its init runs as
the slice's first uid. fuse2fs serves the private RUN_DIR/mnt/VOL and the layer (its own
process, journalled) serves RUN_DIR/rootfs/VOL; a restarted gatewayd adopts both. What the
container writes lands on disk with the ids it gave, the image's other owners stay, and
teardown leaves no process, mount or ACL entry. A layer killed under a mount takes the mount
down as a dying fuse2fs does, and one that died while gatewayd was away is torn down, not
adopted, by the next gatewayd.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gateway.host import acl, fuse2fs, mounts
from gateway.idshift import process as idshift
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, build_rootfs_tree
from tests.libvirt_env import LibvirtEnv, container_init, libvirt_env, open_ancestors
from tests.test_userns_lxc import (
    OWNED,
    PREFIX,
    RANGE_START,
    SLICE,
    ctl_json,
    inside,
    make_image,
    owners,
    ugw,
)

__all__ = ["libvirt_env", "ugw"]  # the fixtures
pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.fuse, pytest.mark.libvirtd]


def image_with_owners(tmp_path: Path) -> Path:
    tree = build_rootfs_tree(tmp_path / "tree")
    for rel, (uid, gid) in OWNED.items():
        os.chown(tree / rel, uid, gid, follow_symlinks=False)
    return make_image("ext4", tree, tmp_path)


def data_path_gone(run_dir: Path, volume: str) -> list[str]:
    """What is left of a volume's fuse-mode data path (empty when all went)."""
    left = [f"mount {m.mount_point}" for root in (run_dir / "mnt" / volume,
                                                 run_dir / "rootfs" / volume)
            for m in mounts.mounts_under(root)]
    left += [f"idshift {pid}" for pid in idshift.processes_mounted_under(run_dir / "rootfs")]
    left += [f"fuse2fs {pid}" for root in (run_dir / "mnt", run_dir / "rootfs")
             for pid in fuse2fs.processes_mounted_under(root / volume)]
    return left


def wait_detached(gw: Daemon, volume: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ctl_json(gw, "volume", "show", volume)["attachment"] is not None:
        assert time.monotonic() < deadline, f"{volume} stayed attached"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_fuse_userns_domain(ugw: Daemon, libvirt_env: LibvirtEnv, tmp_path: Path) -> None:
    image = image_with_owners(tmp_path)
    before = owners(image, tmp_path / "look")
    volume, name = "uf-ext4", f"{PREFIX}fuse"
    run_dir = ugw.run_dir
    ctl_json(ugw, "volume", "add", volume, str(image), "--format", "raw")
    try:
        open_ancestors(run_dir)
        started = ctl_json(ugw, "domain", "start", name, "--volume", volume, "--mode", "fuse",
                           "--userns")
        first = started["idmap"]["uid_first"]
        assert RANGE_START <= first and started["idmap"]["count"] == SLICE
        assert started["idmap"]["gid_first"] == first
        # fuse2fs at the private mount, the layer (nodev, nosuid) at the rootfs
        rootfs = run_dir / "rootfs" / volume
        top = mounts.mounts_at(rootfs)[-1]
        assert top.source == idshift.FSNAME
        assert {"nosuid", "nodev"} <= set(top.options.split(","))
        assert [m.source for m in mounts.mounts_at(run_dir / "mnt" / volume)][-1].startswith(
            fuse2fs.FSNAME_PREFIX)
        layers = idshift.processes_mounted_under(rootfs)
        assert len(layers) == 1
        assert acl.search_allowed(run_dir / "rootfs") == {first}

        pid, uid = container_init(libvirt_env.uri, name)
        assert uid == first
        out = inside(pid, "id -u; cat /proc/self/uid_map; stat -c %u:%g /etc/marker; "
                          "cat /etc/marker; stat -c %u:%g /etc/hostname; touch /made-by-root; "
                          "touch /made-for-1000; chown 1000:1000 /made-for-1000; "
                          "mknod /dev-node c 1 3 2>/dev/null && echo mknod-ok || echo mknod-no; "
                          "sync").split("\n")
        assert out[0] == "0"
        assert out[1].split() == ["0", str(first), str(SLICE)]
        assert out[2] == "0:0"
        assert out[3] + "\n" == MARKER
        assert out[4] == "1234:5678"
        assert out[5] == "mknod-no"
        # the host's view of the layer: shifted; of fuse2fs's private mount: as on disk
        assert os.stat(rootfs / "made-for-1000").st_uid == first + 1000
        assert os.stat(run_dir / "mnt" / volume / "made-for-1000").st_uid == 1000

        # gatewayd restarts: fuse2fs and the layer are adopted with the map
        assert ugw.stop(everything=False) == 0
        ugw.start()
        shown = ctl_json(ugw, "volume", "show", volume)["attachment"]
        assert (shown["state"], shown["idmap"]) == ("adopted", started["idmap"])
        assert inside(pid, "stat -c %u /made-for-1000").strip() == "1000"
    finally:
        ugw.ctl("domain", "stop", name)
    wait_detached(ugw, volume)
    assert not data_path_gone(run_dir, volume)
    assert not acl.search_allowed(run_dir / "rootfs")
    after = owners(image, tmp_path / "look")
    assert after["made-by-root"] == (0, 0)
    assert after["made-for-1000"] == (1000, 1000)
    changed = {rel: (before[rel], after.get(rel)) for rel in before
               if after.get(rel) != before[rel]}
    assert not changed
    ugw.ctl("volume", "rm", volume, check=True)


@pytest.mark.timeout(60)
def test_dying_layer_takes_the_mount_down(ugw: Daemon, tmp_path: Path) -> None:
    image = image_with_owners(tmp_path)
    volume = "uf-die"
    run_dir = ugw.run_dir
    ctl_json(ugw, "volume", "add", volume, str(image), "--format", "raw")
    mounted = ctl_json(ugw, "mount", volume, "--mode", "fuse", "--userns")
    assert mounted["idmap"]["count"] == SLICE
    rootfs = run_dir / "rootfs" / volume
    assert os.stat(rootfs / "etc" / "marker").st_uid == mounted["idmap"]["uid_first"]
    [layer] = idshift.processes_mounted_under(rootfs)
    os.kill(layer, signal.SIGKILL)
    wait_detached(ugw, volume)
    assert not data_path_gone(run_dir, volume)
    assert not acl.search_allowed(run_dir / "rootfs")
    # the volume mounts again (fsck first, as after a dead fuse2fs)
    again = ctl_json(ugw, "mount", volume, "--mode", "fuse", "--userns")
    assert again["idmap"] == mounted["idmap"]
    # the layer dies while gatewayd is away: the next one does not adopt, it tears down
    assert ugw.stop(everything=False) == 0
    [layer] = idshift.processes_mounted_under(rootfs)
    os.kill(layer, signal.SIGKILL)
    ugw.start()
    assert ctl_json(ugw, "volume", "show", volume)["attachment"] is None
    assert volume in ctl_json(ugw, "status")["reconcile"]["volumes"]
    assert not data_path_gone(run_dir, volume)
    assert not acl.search_allowed(run_dir / "rootfs")
    ugw.ctl("volume", "rm", volume, check=True)
