"""An export a mount made lingers idle after the umount, for a quick remount, and gets out of
the way of everything that needs the image file: removal, resize, overlays, a restart."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.gatewayd import Daemon
from tests.images import ImageSet, copy_image

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
    if how == "kill":
        d.kill()
    else:
        assert d.stop() == 0
    d.start()
    assert shown(d, "r")["exported"] is False
    assert qemu_img_info(image).returncode == 0
    d.ctl("volume", "rm", "r", check=True)
