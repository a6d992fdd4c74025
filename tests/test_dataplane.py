"""The data-plane process on its own: a real qemu-storage-daemon, the real block view in its own
process, a loop device and a kernel mount over it, and nobody else (no gatewayd at all)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.admin.client import call
from gateway.errors import Conflict
from gateway.host import loopdev, mounts
from gateway.testing.images import MARKER, MIB, ImageSet, copy_image

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def qsd(tmp_path: Path, image_set: ImageSet) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    img = copy_image(image_set.path("none", "raw"), tmp_path / "vol.raw")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={img},node-name=file0",
         "--blockdev", "driver=raw,file=file0,node-name=fmt0",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=fmt0,name=vol,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists)
        yield sock, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {check}"
        time.sleep(0.01)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    (run_dir / "blk").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.dataplane", "--run-dir", str(run_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "dataplane.log", "wb"),
                            start_new_session=True)
    sock = run_dir / "dataplane.sock"
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None)
        assert proc.poll() is None, (tmp_path / "dataplane.log").read_text()
        yield sock
        call(str(sock), "stop", {"force": True}, timeout=30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(run_dir / "blk")], check=False)


def test_the_data_plane_serves_a_mounted_rootfs_alone(
        qsd: tuple[Path, subprocess.Popen[bytes]], plane: Path, tmp_path: Path) -> None:
    nbd_sock, _ = qsd
    run_dir = plane.parent
    plugged = call(str(plane), "plug", {"name": "vol", "socket": str(nbd_sock), "export": "vol"},
                   timeout=30)
    assert plugged["size"] == 64 * MIB and plugged["window"] is None
    call(str(plane), "set-window", {"name": "vol", "start": 0, "size": 64 * MIB}, timeout=30)
    window = run_dir / "blk" / "vol" / "rootfs"
    loop, fd = loopdev.attach(window)
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        mounts.mount(loop.path, target, "ext4")
        os.close(fd)
        fd = -1
        assert (target / "etc" / "marker").read_text() == MARKER
        with open(target / "root" / "note", "w") as f:
            f.write("through the data plane\n")
            f.flush()
            os.fsync(f.fileno())
        status = call(str(plane), "status", {}, timeout=30)
        assert status["volumes"]["vol"]["open"] >= 1 and status["volumes"]["vol"]["writes"] > 0
        with pytest.raises(Conflict):  # the loop device still holds the window
            call(str(plane), "unplug", {"name": "vol"}, timeout=30)
        with pytest.raises(Conflict):
            call(str(plane), "stop", {}, timeout=30)
    finally:
        if fd >= 0:
            os.close(fd)
        mounts.umount(target)
    wait_for(lambda: not loopdev.devices_backed_by(run_dir / "blk"))
    call(str(plane), "unplug", {"name": "vol"}, timeout=30)


def test_sigterm_does_not_end_a_data_plane_that_serves(
        qsd: tuple[Path, subprocess.Popen[bytes]], plane: Path) -> None:
    nbd_sock, _ = qsd
    call(str(plane), "plug", {"name": "vol", "socket": str(nbd_sock), "export": "vol"},
         timeout=30)
    pid = call(str(plane), "status", {}, timeout=30)["pid"]
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert call(str(plane), "status", {}, timeout=30)["pid"] == pid
    call(str(plane), "unplug", {"name": "vol"}, timeout=30)
