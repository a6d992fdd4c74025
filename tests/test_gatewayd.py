"""gatewayd and gatewayctl end to end: a real daemon process, a real catalog, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.testing.daemon import BIN, CtlResult, Daemon
from gateway.testing.images import ImageSet

pytestmark = pytest.mark.timeout(120)


def one_line_error(proc: CtlResult) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def volume_rows(daemon: Daemon) -> list[dict[str, object]]:
    return list(json.loads(daemon.ctl("volume", "ls", "--json", check=True).stdout))


def test_status_reports_protocol_and_health(gatewayd: Daemon) -> None:
    status = json.loads(gatewayd.ctl("status", "--json", check=True).stdout)
    assert status["protocol"] == 1
    assert status["healthy"] is True
    human = gatewayd.ctl("status", check=True).stdout
    assert "protocol:" in human and "healthy:" in human


def test_socket_is_0660(gatewayd: Daemon) -> None:
    st = os.stat(gatewayd.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0


def test_volume_lifecycle_and_restart_keeps_catalog(gatewayd: Daemon, image_set: ImageSet) -> None:
    qcow2 = image_set.path("gpt", "qcow2")
    out = gatewayd.ctl("volume", "add", "base", str(qcow2), "--format", "qcow2", "--json",
                       check=True).stdout
    added = json.loads(out)
    assert added["format"] == "qcow2"
    assert added["path"] == str(qcow2)
    assert added["virtual_size"] == image_set.path("gpt", "raw").stat().st_size
    assert added["header"]["version"] == 3
    gatewayd.ctl("volume", "add", "r1", str(image_set.path("none", "raw")), "--format", "raw",
                 "--read-only", check=True)
    table = gatewayd.ctl("volume", "ls", check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "FORMAT", "SIZE"]
    assert [row["name"] for row in volume_rows(gatewayd)] == ["base", "r1"]

    gatewayd.stop()
    gatewayd.start()
    shown = json.loads(gatewayd.ctl("volume", "show", "r1", "--json", check=True).stdout)
    assert shown["read_only"] is True and shown["format"] == "raw"
    assert gatewayd.ctl("volume", "rm", "r1").returncode == 0
    assert [row["name"] for row in volume_rows(gatewayd)] == ["base"]


def test_bad_input_gets_one_line_and_leaves_catalog_unchanged(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    raw = image_set.path("none", "raw")
    gatewayd.ctl("volume", "add", "keep", str(raw), "--format", "raw", check=True)
    before = volume_rows(gatewayd)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image_set.path("none", "qcow2")), str(overlay)], check=True,
                   capture_output=True)
    truncated = tmp_path / "cut.qcow2"
    truncated.write_bytes(image_set.path("none", "qcow2").read_bytes()[:50])
    empty = tmp_path / "empty.raw"
    empty.touch()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        ("volume", "add", "x", str(raw), "--format", "vmdk"): "unknown format 'vmdk'",
        ("volume", "add", "x", "/nonexistent/disk.raw", "--format", "raw"): "no such file",
        ("volume", "add", "x", str(tmp_path), "--format", "raw"): "is a directory",
        ("volume", "add", "x", str(raw), "--format", "qcow2"): "not a qcow2 image",
        ("volume", "add", "x", str(truncated), "--format", "qcow2"): "truncated qcow2",
        ("volume", "add", "x", str(overlay), "--format", "qcow2"): "names a backing file",
        ("volume", "add", "keep", str(image_set.path("mbr", "raw")), "--format", "raw"):
            "volume keep already exists",
        ("volume", "add", "other", str(raw), "--format", "raw"):
            "already registered as volume keep",
        ("volume", "add", "Bad/..", str(raw), "--format", "raw"): "invalid volume name",
        ("volume", "add", "..", str(raw), "--format", "raw"): "invalid volume name",
        # gatewayctl resolves it against its working directory (the wire takes absolute paths
        # only: tests/test_admin_surface.py)
        ("volume", "add", "x", "relative.raw", "--format", "raw"): "/relative.raw: no such file",
        ("volume", "add", "x", str(empty), "--format", "raw"): "empty",
        ("volume", "add", "x", str(fifo), "--format", "raw"): "not a regular file or block device",
        ("volume", "show", "missing"): "no volume named missing",
        ("volume", "rm", "missing"): "no volume named missing",
    }
    for argv, expected in cases.items():
        line = one_line_error(gatewayd.ctl(*argv))
        assert line.startswith("gatewayctl: ") and expected in line, (argv, line)
    assert volume_rows(gatewayd) == before


def test_allowed_roots_refuse_outside_paths_and_symlinks(tmp_path: Path,
                                                         image_set: ImageSet) -> None:
    root = tmp_path / "images"
    root.mkdir()
    inside = root / "disk.raw"
    inside.write_bytes(b"\0" * 1048576)
    (root / "escape.raw").symlink_to(image_set.path("none", "raw"))
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--allowed-roots", str(root)])
    daemon.start()
    try:
        daemon.ctl("volume", "add", "ok", str(inside), "--format", "raw", check=True)
        for path in (image_set.path("none", "raw"), root / "escape.raw", root / ".." / "x.raw"):
            line = one_line_error(daemon.ctl("volume", "add", "no", str(path), "--format", "raw"))
            assert "outside the allowed image roots" in line
        assert [v["name"] for v in volume_rows(daemon)] == ["ok"]
    finally:
        assert daemon.cleanup() == []


def test_daemon_not_running_is_said_plainly(tmp_path: Path) -> None:
    daemon = Daemon(state_dir=tmp_path / "s", run_dir=tmp_path / "r", log_path=tmp_path / "l")
    line = one_line_error(daemon.ctl("status"))
    assert line == f"gatewayctl: gatewayd is not running (no socket at {daemon.socket})"


def test_usage_error_is_one_line(gatewayd: Daemon) -> None:
    proc = gatewayd.ctl("volume", "add")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    half = gatewayd.ctl("volume", "add", "x")
    assert half.returncode == 1
    assert half.stderr.strip() == ("gatewayctl: PATH and --format raw|qcow2 are required "
                                   "(or --pool POOL --vol VOL --format F)")


def test_sigint_and_sigterm_shut_down_in_order(tmp_path: Path) -> None:
    """A signal ends gatewayd alone (an upgrade, `systemctl restart`): the data plane and QSD
    stay, and the next gatewayd adopts them; `shutdown --all` ends everything."""
    daemon = Daemon(state_dir=tmp_path / "s", run_dir=tmp_path / "r", log_path=tmp_path / "l")
    for sig in (signal.SIGINT, signal.SIGTERM):
        daemon.start()
        assert daemon.stop(sig, everything=False) == 0
        assert not daemon.socket.exists()
        assert '"msg": "gatewayd stopped"' in daemon.log_path.read_text()
        staying = " ".join(daemon.leftovers())
        assert "gateway.dataplane" in staying and "qemu-storage-daemon" in staying
    daemon.start()
    assert json.loads(daemon.ctl("status", "--json", check=True).stdout)["qsd"]["adopted"] == 1
    assert daemon.stop() == 0
    assert daemon.cleanup() == []


def test_second_daemon_on_same_socket_refuses(gatewayd: Daemon, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "gatewayd"), "--state-dir", str(tmp_path / "s2"), "--run-dir",
         str(gatewayd.run_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"gatewayd: another gatewayd is serving {gatewayd.socket}" in proc.stderr
    assert gatewayd.ctl("status").returncode == 0


def test_logs_are_structured_json(gatewayd: Daemon, image_set: ImageSet) -> None:
    gatewayd.ctl("volume", "add", "v", str(image_set.path("none", "raw")), "--format", "raw",
                 check=True)
    entries = [json.loads(line) for line in gatewayd.log_path.read_text().splitlines()]
    added = [e for e in entries if e["msg"] == "volume added"]
    assert added and added[0]["volume"] == "v" and added[0]["level"] == "info"


def test_catalog_schema_is_versioned(gatewayd: Daemon) -> None:
    db = sqlite3.connect(gatewayd.state_dir / "catalog.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 2
    finally:
        db.close()
