"""Issue 4 through the daemon: exports of pinned-format volumes, probed through the export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image

pytestmark = pytest.mark.timeout(120)


def nbdcopy_to_file(uri: str, dest: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, capture_output=True, timeout=60)
    return dest.read_bytes()


def test_export_is_idempotent_and_prints_the_uri(gatewayd: Daemon, image_set: ImageSet) -> None:
    gatewayd.ctl("volume", "add", "v", str(image_set.path("gpt", "qcow2")), "--format", "qcow2",
                 "--read-only", check=True)
    uri = f"nbd+unix:///v?socket={gatewayd.run_dir / 'nbd.sock'}"
    assert gatewayd.ctl("export", "v", check=True).stdout.strip() == uri
    assert gatewayd.ctl("export", "v", check=True).stdout.strip() == uri
    shown = json.loads(gatewayd.ctl("volume", "show", "v", "--json", check=True).stdout)
    assert shown["exported"] is True and shown["uri"] == uri
    rm = gatewayd.ctl("volume", "rm", "v")
    assert rm.returncode == 1
    assert rm.stderr.strip() == "gatewayctl: volume v is exported; unexport it first"
    gatewayd.ctl("unexport", "v", check=True)
    gatewayd.ctl("unexport", "v", check=True)
    shown = json.loads(gatewayd.ctl("volume", "show", "v", "--json", check=True).stdout)
    assert shown["exported"] is False
    gatewayd.ctl("volume", "rm", "v", check=True)


def test_probe_through_export_matches_probe_image(gatewayd: Daemon, image_set: ImageSet) -> None:
    for table in ("none", "mbr", "gpt"):
        path = image_set.path(table, "qcow2")
        name = f"p-{table}"
        gatewayd.ctl("volume", "add", name, str(path), "--format", "qcow2", "--read-only",
                     check=True)
        gatewayd.ctl("export", name, check=True)
        through_daemon = gatewayd.ctl("probe", name, "--json", check=True).stdout
        offline = gatewayd.ctl("probe-image", "--format", "qcow2", str(path), "--json",
                               check=True).stdout
        assert json.loads(through_daemon) == json.loads(offline)
        assert list(json.loads(offline)) == ["table", "sector_size", "partitions", "rootfs"]
        gatewayd.ctl("unexport", name, check=True)
    unexported = gatewayd.ctl("probe", "p-gpt")
    assert unexported.returncode == 1
    assert "is not exported" in unexported.stderr


def test_served_bytes_follow_the_pinned_format(gatewayd: Daemon, image_set: ImageSet,
                                               tmp_path: Path) -> None:
    """qcow2 serves its guest view; the same file registered raw serves its container bytes."""
    qcow2 = image_set.path("mbr", "qcow2")
    gatewayd.ctl("volume", "add", "as-qcow2", str(qcow2), "--format", "qcow2", "--read-only",
                 check=True)
    gatewayd.ctl("export", "as-qcow2", check=True)
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2),
                    str(expected)], check=True)
    uri = gatewayd.ctl("export", "as-qcow2", check=True).stdout.strip()
    assert nbdcopy_to_file(uri, tmp_path / "served.raw") == expected.read_bytes()
    gatewayd.ctl("unexport", "as-qcow2", check=True)

    gatewayd.ctl("volume", "add", "as-raw", str(copy_image(qcow2, tmp_path / "c.qcow2")),
                 "--format", "raw", "--read-only", check=True)
    uri = gatewayd.ctl("export", "as-raw", check=True).stdout.strip()
    assert nbdcopy_to_file(uri, tmp_path / "served2.raw") == (tmp_path / "c.qcow2").read_bytes()
    gatewayd.ctl("unexport", "as-raw", check=True)


def test_raw_volume_with_a_qcow2_header_naming_a_host_file(gatewayd: Daemon,
                                                           tmp_path: Path) -> None:
    """The attack: a guest writes a qcow2 header into its raw disk naming a host file."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"TOP-SECRET-HOST-DATA" * 1000)
    disk = tmp_path / "guest.raw"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(disk), "1M"], check=True, capture_output=True)
    with open(disk, "ab") as f:
        f.truncate(4 * 1024 * 1024)
    gatewayd.ctl("volume", "add", "guest", str(disk), "--format", "raw", check=True)
    uri = gatewayd.ctl("export", "guest", check=True).stdout.strip()
    served = nbdcopy_to_file(uri, tmp_path / "served.raw")
    assert served == disk.read_bytes()
    assert b"TOP-SECRET" not in served
    # The block view serves the same bytes.
    view = (gatewayd.run_dir / "blk" / "guest" / "disk").read_bytes()
    assert view == disk.read_bytes()
    gatewayd.ctl("unexport", "guest", check=True)


def test_exports_survive_a_gatewayd_restart(gatewayd: Daemon, image_set: ImageSet) -> None:
    gatewayd.ctl("volume", "add", "keep", str(image_set.path("none", "raw")), "--format", "raw",
                 "--read-only", check=True)
    gatewayd.ctl("export", "keep", check=True)
    gatewayd.stop()
    gatewayd.start()
    status = json.loads(gatewayd.ctl("status", "--json", check=True).stdout)
    assert status["exports"] == 1 and status["qsd"]["exports"] == ["keep"]
    assert (gatewayd.run_dir / "blk" / "keep" / "disk").stat().st_size == \
        image_set.path("none", "raw").stat().st_size
    gatewayd.ctl("unexport", "keep", check=True)


def test_qsd_kill_is_survived_by_the_block_view(gatewayd: Daemon, image_set: ImageSet,
                                                tmp_path: Path) -> None:
    import os
    import signal
    import time
    disk = copy_image(image_set.path("none", "raw"), tmp_path / "w.raw")
    gatewayd.ctl("volume", "add", "w", str(disk), "--format", "raw", check=True)
    gatewayd.ctl("export", "w", check=True)
    view = gatewayd.run_dir / "blk" / "w" / "disk"
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"before-kill!", 4096 * 100)
        os.fsync(fd)
        status = json.loads(gatewayd.ctl("status", "--json", check=True).stdout)
        os.kill(status["qsd"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads(gatewayd.ctl("status", "--json", check=True).stdout)
            if status["qsd"]["restarts"] == 1 and status["healthy"]:
                break
            time.sleep(0.05)
        assert status["qsd"]["restarts"] == 1 and status["healthy"]
        assert os.pread(fd, 12, 4096 * 100) == b"before-kill!"
        os.pwrite(fd, b"after-kill!!", 4096 * 101)
        os.fsync(fd)
    finally:
        os.close(fd)
    gatewayd.ctl("unexport", "w", check=True)
    data = disk.read_bytes()
    assert data[4096 * 100:4096 * 100 + 12] == b"before-kill!"
    assert data[4096 * 101:4096 * 101 + 12] == b"after-kill!!"
