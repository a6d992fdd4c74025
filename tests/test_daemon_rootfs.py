"""Issue 5 through the daemon: rootfs delivery in bind and fuse mode, teardown, crash reconcile."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, MIB, ImageSet, copy_image

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    top = tmp_path_factory.mktemp("rootfs-daemon")
    d = Daemon(state_dir=top / "state", run_dir=top / "run", log_path=top / "gatewayd.log",
               extra_args=["--libvirt-uri", ""])
    d.start()
    try:
        yield d
    finally:
        leaked = d.cleanup()
        assert not leaked, leaked


def loops_backed_under(path: Path) -> list[str]:
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            if Path(backing).read_text().strip().startswith(str(path)):
                found.append(backing)
        except OSError:
            pass
    return found


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if line.split()[4].startswith(str(path) + "/")]


def assert_nothing_left(d: Daemon, volume: str) -> None:
    assert [m for m in mounts_under(d.run_dir) if m.endswith(f"/{volume}")] == []
    assert loops_backed_under(d.run_dir / "blk" / volume) == []
    pids = subprocess.run(["pgrep", "-f", f"fuse2fs .*{d.run_dir}/blk/{volume}/"],
                          capture_output=True, text=True).stdout.split()
    assert pids == []


def partition_fsck(image: Path, fmt: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    raw = image
    if fmt == "qcow2":
        raw = tmp / "fsck.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                       check=True)
    probe = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "gatewayctl"), "probe-image", "--format", "raw",
         str(raw), "--json"], capture_output=True, text=True, check=True).stdout)
    part = tmp / "part.ext4"
    start, size = probe["rootfs"]["start"], probe["rootfs"]["size"]
    with open(raw, "rb") as src, open(part, "wb") as dst:
        src.seek(start)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 4 * MIB))
            dst.write(chunk)
            remaining -= len(chunk)
    return subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)


CASES = [(table, fmt, mode) for table in ("none", "mbr", "gpt") for fmt in ("raw", "qcow2")
         for mode in ("bind", "fuse")]


@pytest.mark.parametrize(("table", "fmt", "mode"), CASES)
def test_rootfs_shows_the_marker_and_keeps_writes(daemon: Daemon, image_set: ImageSet,
                                                  tmp_path: Path, table: str, fmt: str,
                                                  mode: str) -> None:
    name = f"{table}-{fmt}-{mode}"
    image = copy_image(image_set.path(table, fmt), tmp_path / f"disk.{fmt}")
    daemon.ctl("volume", "add", name, str(image), "--format", fmt, check=True)
    out = json.loads(daemon.ctl("mount", name, "--mode", mode, "--json", check=True).stdout)
    rootfs = daemon.run_dir / "rootfs" / name
    assert out == {"rootfs": str(rootfs), "mode": mode}
    assert (rootfs / "etc" / "marker").read_text() == MARKER
    shown = json.loads(daemon.ctl("volume", "show", name, "--json", check=True).stdout)
    assert shown["attachment"]["mode"] == mode and shown["attachment"]["state"] == "mounted"
    assert shown["fstype"] == "ext4"
    payload = f"written through {mode}\n"
    with open(rootfs / "root" / "note", "w") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    daemon.ctl("umount", name, check=True)
    shown = json.loads(daemon.ctl("volume", "show", name, "--json", check=True).stdout)
    # the export the mount made lingers for a quick remount, a bind mount's with its loop
    # device; unexport closes both at once
    assert shown["attachment"] is None and shown["export_idle"] is True
    assert [m for m in mounts_under(daemon.run_dir) if m.endswith(f"/{name}")] == []
    standby = loops_backed_under(daemon.run_dir / "blk" / name)
    if mode == "bind":
        assert [f"/dev/{b.split('/')[3]}" for b in standby] == [shown["standby_loop"]]
    else:
        assert standby == [] and shown["standby_loop"] is None
    daemon.ctl("unexport", name, check=True)
    assert_nothing_left(daemon, name)
    shown = json.loads(daemon.ctl("volume", "show", name, "--json", check=True).stdout)
    assert shown["exported"] is False and shown["export_idle"] is False
    assert shown["standby_loop"] is None
    if fmt == "raw" or mode == "bind":
        fsck = partition_fsck(image, fmt, tmp_path)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    daemon.ctl("mount", name, "--mode", "bind", check=True)
    assert (rootfs / "root" / "note").read_text() == payload
    daemon.ctl("umount", name, check=True)
    daemon.ctl("volume", "rm", name, check=True)


def test_mount_and_umount_are_idempotent(daemon: Daemon, image_set: ImageSet) -> None:
    daemon.ctl("volume", "add", "idem", str(image_set.path("gpt", "qcow2")), "--format", "qcow2",
               "--read-only", check=True)
    first = daemon.ctl("mount", "idem", check=True).stdout
    assert daemon.ctl("mount", "idem", check=True).stdout == first
    other = daemon.ctl("mount", "idem", "--mode", "fuse")
    assert other.returncode == 1
    assert "already mounted in bind mode" in other.stderr
    busy = daemon.ctl("volume", "rm", "idem")
    assert busy.returncode == 1 and "is mounted; umount it first" in busy.stderr
    with pytest.raises(OSError):
        (daemon.run_dir / "rootfs" / "idem" / "newfile").write_text("x")  # read-only volume
    daemon.ctl("umount", "idem", check=True)
    daemon.ctl("umount", "idem", check=True)
    daemon.ctl("volume", "rm", "idem", check=True)


def test_volumes_mount_in_parallel(daemon: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    names = [f"par{i}" for i in range(4)]
    for name in names:
        image = copy_image(image_set.path("gpt", "raw"), tmp_path / f"{name}.raw")
        daemon.ctl("volume", "add", name, str(image), "--format", "raw", check=True)
    results: dict[str, int] = {}

    def mount(name: str) -> None:
        results[name] = daemon.ctl("mount", name).returncode

    threads = [threading.Thread(target=mount, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == dict.fromkeys(names, 0)
    for name in names:
        assert (daemon.run_dir / "rootfs" / name / "etc" / "marker").read_text() == MARKER
        daemon.ctl("umount", name, check=True)
        daemon.ctl("volume", "rm", name, check=True)


def test_pinned_fstype_refuses_a_disagreeing_probe(daemon: Daemon, image_set: ImageSet,
                                                   tmp_path: Path) -> None:
    image = copy_image(image_set.path("none", "raw"), tmp_path / "pin.raw")
    daemon.ctl("volume", "add", "pin", str(image), "--format", "raw", check=True)
    daemon.ctl("mount", "pin", check=True)
    daemon.ctl("umount", "pin", check=True)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    refused = daemon.ctl("mount", "pin")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("gatewayctl: volume pin: the probe found vfat but the "
                                      "catalog pins ext4; refusing to mount")
    assert_nothing_left(daemon, "pin")
    shown = json.loads(daemon.ctl("volume", "show", "pin", "--json", check=True).stdout)
    assert shown["attachment"] is None and shown["exported"] is False
    daemon.ctl("volume", "rm", "pin", check=True)


def test_fuse_mode_refuses_non_ext_filesystems(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "xfs.raw"
    with open(image, "wb") as f:
        f.truncate(320 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    daemon.ctl("volume", "add", "xfsvol", str(image), "--format", "raw", check=True)
    refused = daemon.ctl("mount", "xfsvol", "--mode", "fuse")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("gatewayctl: fuse mode serves ext2/3/4 only; volume "
                                      "xfsvol holds xfs")
    assert_nothing_left(daemon, "xfsvol")
    daemon.ctl("mount", "xfsvol", "--mode", "bind", check=True)
    assert os.path.ismount(daemon.run_dir / "rootfs" / "xfsvol")
    daemon.ctl("umount", "xfsvol", check=True)
    daemon.ctl("volume", "rm", "xfsvol", check=True)


def test_unmountable_disk_is_refused_cleanly(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "zero.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    daemon.ctl("volume", "add", "zero", str(image), "--format", "raw", check=True)
    refused = daemon.ctl("mount", "zero")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "no filesystem found" in refused.stderr
    assert_nothing_left(daemon, "zero")
    daemon.ctl("volume", "rm", "zero", check=True)


def test_kill_9_while_mounted_then_restart_adopts_what_is_whole(
        tmp_path: Path, image_set: ImageSet) -> None:
    """The data plane outlives gatewayd: after a kill -9 a new gatewayd adopts every attachment
    whose data path is whole, and tears down the one broken behind its back."""
    d = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run", log_path=tmp_path / "log",
               extra_args=["--libvirt-uri", ""])
    d.start()
    try:
        for mode in ("bind", "fuse", "broken"):
            image = copy_image(image_set.path("mbr", "qcow2"), tmp_path / f"{mode}.qcow2")
            d.ctl("volume", "add", mode, str(image), "--format", "qcow2", check=True)
            d.ctl("mount", mode, "--mode", "bind" if mode == "broken" else mode, check=True)
        d.kill()
        for mode in ("bind", "fuse"):  # served all along
            assert (d.run_dir / "rootfs" / mode / "etc" / "marker").read_text() == MARKER
        subprocess.run(["umount", str(d.run_dir / "rootfs" / "broken")], check=True)
        d.start()
        status = json.loads(d.ctl("status", "--json", check=True).stdout)
        assert status["healthy"] is True
        assert status["reconcile"]["adopted"] == ["bind", "fuse"]
        assert status["reconcile"]["found"] >= 1  # the broken one's kernel mount
        assert status["mounts"] == 2
        assert_nothing_left(d, "broken")
        for mode in ("bind", "fuse"):
            shown = json.loads(d.ctl("volume", "show", mode, "--json", check=True).stdout)
            assert shown["attachment"]["state"] == "adopted" and shown["attachment"]["mode"] == mode
            assert (d.run_dir / "rootfs" / mode / "etc" / "marker").read_text() == MARKER
            d.ctl("umount", mode, check=True)
            d.ctl("unexport", mode, check=True)  # its idle export and standby loop too
            assert_nothing_left(d, mode)
        d.ctl("mount", "broken", check=True)
        assert (d.run_dir / "rootfs" / "broken" / "etc" / "marker").read_text() == MARKER
        d.ctl("umount", "broken", check=True)
    finally:
        leaked = d.cleanup()
    assert leaked == []
