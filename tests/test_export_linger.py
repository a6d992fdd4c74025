"""An export a mount made lingers idle after the umount, for a quick remount, and gets out of
the way of everything that needs the image file: removal, resize, overlays, a restart. A bind
mount's idle export keeps its loop device as a standby for the next mount of the same window."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gateway.host import loopdev
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, ImageSet, copy_image, make_fs_image

pytestmark = pytest.mark.timeout(120)


def shown(d: Daemon, name: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(d.ctl("volume", "show", name, "--json",
                                              check=True).stdout)
    return out


def qemu_img_info(image: Path) -> subprocess.CompletedProcess[str]:
    """Without -U: fails while a QSD holds the image's write lock."""
    return subprocess.run(["qemu-img", "info", "-f", "qcow2", str(image)], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def lingering(tmp_path: Path) -> Daemon:
    return Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                  log_path=tmp_path / "gatewayd.log",
                  extra_args=["--libvirt-uri", "", "--export-linger", "1.5"])


def test_idle_export_is_reused_then_retired(lingering: Daemon, image_set: ImageSet,
                                            tmp_path: Path) -> None:
    d = lingering
    d.start()
    try:
        image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "v.qcow2")
        d.ctl("volume", "add", "v", str(image), "--format", "qcow2", check=True)
        d.ctl("mount", "v", check=True)
        d.ctl("umount", "v", check=True)
        assert shown(d, "v")["export_idle"] is True
        assert (d.run_dir / "blk" / "v" / "disk").exists()
        assert qemu_img_info(image).returncode != 0  # QSD still holds it
        # a remount claims the idle export: it is the mount's own again
        d.ctl("mount", "v", check=True)
        assert shown(d, "v")["export_idle"] is False
        assert (d.run_dir / "rootfs" / "v" / "etc" / "marker").exists()
        d.ctl("umount", "v", check=True)
        deadline = time.monotonic() + 20
        while shown(d, "v")["exported"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shown(d, "v")["exported"] is False
        assert not (d.run_dir / "blk" / "v").exists()
        assert qemu_img_info(image).returncode == 0
    finally:
        assert d.cleanup() == []


def test_volume_changes_retire_an_idle_export_at_once(gatewayd: Daemon, image_set: ImageSet,
                                                      tmp_path: Path) -> None:
    d = gatewayd  # the default linger (10 s) is far longer than this test's steps
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "b.qcow2")
    d.ctl("volume", "add", "b", str(image), "--format", "qcow2", check=True)
    d.ctl("mount", "b", check=True)
    d.ctl("umount", "b", check=True)
    assert shown(d, "b")["export_idle"] is True
    d.ctl("volume", "resize", "b", "--size", "80M", check=True)
    assert shown(d, "b")["exported"] is False
    d.ctl("mount", "b", check=True)
    d.ctl("umount", "b", check=True)
    assert shown(d, "b")["export_idle"] is True
    d.ctl("volume", "create", "o", "--from", "b", "--overlay", check=True)
    assert shown(d, "b")["exported"] is False
    d.ctl("volume", "rm", "o", check=True)
    d.ctl("mount", "b", check=True)
    d.ctl("umount", "b", check=True)
    d.ctl("volume", "rm", "b", check=True)
    assert not (d.run_dir / "blk" / "b").exists()
    assert qemu_img_info(image).returncode == 0


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_an_idle_export_does_not_come_back_after_a_restart(gatewayd: Daemon,
                                                           image_set: ImageSet, tmp_path: Path,
                                                           how: str) -> None:
    d = gatewayd
    image = copy_image(image_set.path("none", "qcow2"), tmp_path / "r.qcow2")
    d.ctl("volume", "add", "r", str(image), "--format", "qcow2", check=True)
    d.ctl("mount", "r", check=True)
    d.ctl("umount", "r", check=True)
    assert shown(d, "r")["export_idle"] is True
    assert shown(d, "r")["standby_loop"] is not None
    if how == "kill":
        d.kill()
    else:
        assert d.stop() == 0
    # only gatewayd's open fd kept the standby bound: it went with the process, however it ended
    deadline = time.monotonic() + 10
    while loopdev.devices_backed_by(d.run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loopdev.devices_backed_by(d.run_dir) == []
    d.start()
    assert shown(d, "r")["exported"] is False
    assert qemu_img_info(image).returncode == 0
    d.ctl("volume", "rm", "r", check=True)


def mounted_device(d: Daemon, name: str) -> str:
    target = str(d.run_dir / "mnt" / name)
    with open("/proc/self/mountinfo") as f:
        sources = [line.split(" - ")[1].split()[1] for line in f if line.split()[4] == target]
    assert len(sources) == 1, sources
    return sources[0]


def test_a_remount_takes_the_standby_loop(gatewayd: Daemon, image_set: ImageSet,
                                          tmp_path: Path) -> None:
    d = gatewayd
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "s.qcow2")
    d.ctl("volume", "add", "s", str(image), "--format", "qcow2", check=True)
    d.ctl("mount", "s", check=True)
    first = mounted_device(d, "s")
    d.ctl("umount", "s", check=True)
    assert shown(d, "s")["standby_loop"] == first
    assert loopdev.devices_backed_by(d.run_dir / "blk" / "s") == [first]
    d.ctl("mount", "s", check=True)
    assert mounted_device(d, "s") == first  # no new device
    assert shown(d, "s")["standby_loop"] is None
    assert (d.run_dir / "rootfs" / "s" / "etc" / "marker").exists()
    d.ctl("umount", "s", check=True)
    # another mode does not take it: the loop goes before fuse2fs opens the window
    d.ctl("mount", "s", "--mode", "fuse", check=True)
    assert loopdev.devices_backed_by(d.run_dir / "blk" / "s") == []
    d.ctl("umount", "s", check=True)
    assert shown(d, "s")["standby_loop"] is None
    d.ctl("volume", "rm", "s", check=True)
    assert loopdev.devices_backed_by(d.run_dir) == []


def test_a_standby_sees_what_was_written_to_the_disk_meanwhile(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    d = gatewayd
    image = copy_image(image_set.path("gpt", "raw"), tmp_path / "w.raw")
    d.ctl("volume", "add", "w", str(image), "--format", "raw", check=True)
    d.ctl("mount", "w", check=True)
    rootfs = d.run_dir / "rootfs" / "w"
    assert (rootfs / "etc" / "marker").exists()
    window = json.loads(d.ctl("volume", "show", "w", "--json", check=True).stdout)[
        "attachment"]["window"]
    d.ctl("umount", "w", check=True)
    assert shown(d, "w")["standby_loop"] is not None
    # while idle, a new filesystem goes into the window through the block view's disk file
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "other").write_text("rewritten\n")
    fs = make_fs_image(tmp_path / "new.ext4", window["size"], tree)
    with open(fs, "rb") as src, open(d.run_dir / "blk" / "w" / "disk", "r+b") as disk:
        disk.seek(window["start"])
        while chunk := src.read(4 * MIB):
            disk.write(chunk)
        disk.flush()
        os.fsync(disk.fileno())
    d.ctl("mount", "w", check=True)
    assert (rootfs / "etc" / "other").read_text() == "rewritten\n"
    assert not (rootfs / "etc" / "marker").exists()
    d.ctl("umount", "w", check=True)
    d.ctl("volume", "rm", "w", check=True)
