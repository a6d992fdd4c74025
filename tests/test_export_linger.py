"""An export a mount made lingers idle after the umount, for a quick remount, and gets out of
the way of everything that needs the image file: removal, resize, overlays, a restart. A bind
mount's idle export keeps its loop device as a standby for the next mount of the same window.

The gateway runs in process (tests/conftest.py `in_process_gateway`) on trio's MockClock, which
runs as fast as the wall clock and is jumped over the linger: the linger and the retirement are
timed on the mock clock, never waited out. (autojump would jump whenever the trio loop is idle,
which it also is while a worker thread mounts or QSD answers: the deadlines of unrelated timeouts
would fire.) Only the kill -9 case needs a gatewayd process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from gateway.host import loopdev
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, ImageSet, copy_image, make_fs_image
from tests.conftest import InProcessGateway

pytestmark = pytest.mark.timeout(120)
LINGER = 10.0  # gatewayd's default


@pytest.fixture
def clock() -> MockClock:
    """The test's trio clock (pytest-trio runs the test on it): wall-clock speed, jumped."""
    return MockClock(rate=1.0)


async def shown(gw: InProcessGateway, name: str) -> dict[str, Any]:
    out: dict[str, Any] = await gw.call("volume-show", {"name": name})
    return out


def qemu_img_info(image: Path) -> subprocess.CompletedProcess[str]:
    """Without -U: fails while a QSD holds the image's write lock."""
    return subprocess.run(["qemu-img", "info", "-f", "qcow2", str(image)], capture_output=True,
                          text=True, timeout=30)


async def exported_until(gw: InProcessGateway, name: str, seconds: float) -> bool:
    """Whether the volume is still exported after up to `seconds` of waiting for it not to be."""
    with trio.move_on_after(seconds):
        while (await shown(gw, name))["exported"]:
            await trio.sleep(0.01)
    return bool((await shown(gw, name))["exported"])


async def test_idle_export_is_reused_then_retired(in_process_gateway: InProcessGateway,
                                                  clock: MockClock, image_set: ImageSet,
                                                  tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start(linger=1.5)
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "v.qcow2")
    await gw.call("volume-add", {"name": "v", "path": str(image), "format": "qcow2"})
    await gw.call("mount", {"name": "v"})
    await gw.call("umount", {"name": "v"})
    assert (await shown(gw, "v"))["export_idle"] is True
    assert await gw.blocking((gw.run_dir / "blk" / "v" / "disk").exists)
    assert (await gw.blocking(qemu_img_info, image)).returncode != 0  # QSD still holds it
    # a remount claims the idle export: it is the mount's own again
    await gw.call("mount", {"name": "v"})
    assert (await shown(gw, "v"))["export_idle"] is False
    assert await gw.blocking((gw.run_dir / "rootfs" / "v" / "etc" / "marker").exists)
    # ... and the first idle period's timer is over: it retires nothing
    clock.jump(2.0)
    assert await exported_until(gw, "v", 0.2) is True
    await gw.call("umount", {"name": "v"})
    clock.jump(1.0)  # not yet
    assert await exported_until(gw, "v", 0.2) is True
    assert (await shown(gw, "v"))["export_idle"] is True
    clock.jump(1.0)  # past the linger: retired
    assert await exported_until(gw, "v", 20) is False
    assert not await gw.blocking((gw.run_dir / "blk" / "v").exists)
    assert (await gw.blocking(qemu_img_info, image)).returncode == 0


async def create(gw: InProcessGateway, args: dict[str, Any]) -> None:
    answer = await gw.call("volume-create", args)
    while "job" in answer and answer["state"] == "running":
        await trio.sleep(0.05)
        answer = await gw.call("job-status", {"id": answer["job"]})
    assert answer.get("state", "done") == "done", answer


async def test_volume_changes_retire_an_idle_export_at_once(
        in_process_gateway: InProcessGateway, clock: MockClock, image_set: ImageSet,
        tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start(linger=LINGER)  # the clock never comes near the linger in this test
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "b.qcow2")
    await gw.call("volume-add", {"name": "b", "path": str(image), "format": "qcow2"})
    await gw.call("mount", {"name": "b"})
    await gw.call("umount", {"name": "b"})
    assert (await shown(gw, "b"))["export_idle"] is True
    await gw.call("volume-resize", {"name": "b", "size": "80M"})
    assert (await shown(gw, "b"))["exported"] is False
    await gw.call("mount", {"name": "b"})
    await gw.call("umount", {"name": "b"})
    assert (await shown(gw, "b"))["export_idle"] is True
    await create(gw, {"name": "o", "from": "b", "overlay": True})
    assert (await shown(gw, "b"))["exported"] is False
    await gw.call("volume-remove", {"name": "o"})
    await gw.call("mount", {"name": "b"})
    await gw.call("umount", {"name": "b"})
    await gw.call("volume-remove", {"name": "b"})
    assert not await gw.blocking((gw.run_dir / "blk" / "b").exists)
    assert (await gw.blocking(qemu_img_info, image)).returncode == 0


def standby_gone(run_dir: Path) -> bool:
    """Only gatewayd's open fd kept the standby bound: it goes with the gateway (blocking)."""
    deadline = time.monotonic() + 10
    while loopdev.devices_backed_by(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return loopdev.devices_backed_by(run_dir) == []


async def test_an_idle_export_does_not_come_back_after_a_restart(
        in_process_gateway: InProcessGateway, clock: MockClock, image_set: ImageSet,
        tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start(linger=LINGER)
    image = copy_image(image_set.path("none", "qcow2"), tmp_path / "r.qcow2")
    await gw.call("volume-add", {"name": "r", "path": str(image), "format": "qcow2"})
    await gw.call("mount", {"name": "r"})
    await gw.call("umount", {"name": "r"})
    assert (await shown(gw, "r"))["export_idle"] is True
    assert (await shown(gw, "r"))["standby_loop"] is not None
    await gw.stop()
    assert await gw.blocking(standby_gone, gw.run_dir)
    await gw.start()
    assert (await shown(gw, "r"))["exported"] is False
    assert (await gw.blocking(qemu_img_info, image)).returncode == 0
    await gw.call("volume-remove", {"name": "r"})


def test_an_idle_export_does_not_come_back_after_a_kill(gatewayd: Daemon, image_set: ImageSet,
                                                        tmp_path: Path) -> None:
    d = gatewayd
    image = copy_image(image_set.path("none", "qcow2"), tmp_path / "r.qcow2")
    d.ctl("volume", "add", "r", str(image), "--format", "qcow2", check=True)
    d.ctl("mount", "r", check=True)
    d.ctl("umount", "r", check=True)
    out = json.loads(d.ctl("volume", "show", "r", "--json", check=True).stdout)
    assert out["export_idle"] is True and out["standby_loop"] is not None
    d.kill()
    assert standby_gone(d.run_dir)
    d.start()
    assert json.loads(d.ctl("volume", "show", "r", "--json", check=True).stdout)[
        "exported"] is False
    assert qemu_img_info(image).returncode == 0
    d.ctl("volume", "rm", "r", check=True)


def mounted_device(run_dir: Path, name: str) -> str:
    target = str(run_dir / "mnt" / name)
    with open("/proc/self/mountinfo") as f:
        sources = [line.split(" - ")[1].split()[1] for line in f if line.split()[4] == target]
    assert len(sources) == 1, sources
    return sources[0]


async def test_a_remount_takes_the_standby_loop(in_process_gateway: InProcessGateway,
                                                clock: MockClock, image_set: ImageSet,
                                                tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start(linger=LINGER)
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "s.qcow2")
    await gw.call("volume-add", {"name": "s", "path": str(image), "format": "qcow2"})
    await gw.call("mount", {"name": "s"})
    first = await gw.blocking(mounted_device, gw.run_dir, "s")
    await gw.call("umount", {"name": "s"})
    assert (await shown(gw, "s"))["standby_loop"] == first
    blk = gw.run_dir / "blk" / "s"
    assert await gw.blocking(loopdev.devices_backed_by, blk) == [first]
    await gw.call("mount", {"name": "s"})
    assert await gw.blocking(mounted_device, gw.run_dir, "s") == first  # no new device
    assert (await shown(gw, "s"))["standby_loop"] is None
    assert await gw.blocking((gw.run_dir / "rootfs" / "s" / "etc" / "marker").exists)
    await gw.call("umount", {"name": "s"})
    # another mode does not take it: the loop goes before fuse2fs opens the window
    await gw.call("mount", {"name": "s", "mode": "fuse"})
    assert await gw.blocking(loopdev.devices_backed_by, blk) == []
    await gw.call("umount", {"name": "s"})
    assert (await shown(gw, "s"))["standby_loop"] is None
    await gw.call("volume-remove", {"name": "s"})
    assert await gw.blocking(loopdev.devices_backed_by, gw.run_dir) == []


def write_window(disk: Path, start: int, fs: Path) -> None:
    with open(fs, "rb") as src, open(disk, "r+b") as out:
        out.seek(start)
        while chunk := src.read(4 * MIB):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


async def test_a_standby_sees_what_was_written_to_the_disk_meanwhile(
        in_process_gateway: InProcessGateway, clock: MockClock, image_set: ImageSet,
        tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start(linger=LINGER)
    image = copy_image(image_set.path("gpt", "raw"), tmp_path / "w.raw")
    await gw.call("volume-add", {"name": "w", "path": str(image), "format": "raw"})
    await gw.call("mount", {"name": "w"})
    rootfs = gw.run_dir / "rootfs" / "w"
    assert await gw.blocking((rootfs / "etc" / "marker").exists)
    window = (await shown(gw, "w"))["attachment"]["window"]
    await gw.call("umount", {"name": "w"})
    assert (await shown(gw, "w"))["standby_loop"] is not None
    # while idle, a new filesystem goes into the window through the block view's disk file
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "other").write_text("rewritten\n")
    fs = make_fs_image(tmp_path / "new.ext4", window["size"], tree)
    await gw.blocking(write_window, gw.run_dir / "blk" / "w" / "disk", window["start"], fs)
    await gw.call("mount", {"name": "w"})
    assert await gw.blocking((rootfs / "etc" / "other").read_text) == "rewritten\n"
    assert not await gw.blocking((rootfs / "etc" / "marker").exists)
    await gw.call("umount", {"name": "w"})
    await gw.call("volume-remove", {"name": "w"})
