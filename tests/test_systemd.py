"""systemd integration: the unit file, `gatewayctl install-systemd`, and the sd_notify protocol."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gateway.admin.client import call
from gateway.cli.systemd import UNIT_NAME, render_unit
from gateway.testing.daemon import BIN, Daemon

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parent.parent


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gatewayctl"), *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def test_checked_in_unit_matches_the_rendered_one() -> None:
    assert (REPO / "systemd" / UNIT_NAME).read_text() == render_unit()


def test_unit_content() -> None:
    s = unit_settings(render_unit())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["KillMode"] == ["process"]  # gatewayd alone: the data plane outlives a restart
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/usr/local/bin/gatewayd"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert int(s["TimeoutStopSec"][0]) > 60  # gatewayd allows itself 60 s to unmount
    for sandbox in ("ProtectSystem", "PrivateTmp", "PrivateMounts", "MountFlags"):
        assert sandbox not in s  # a private mount namespace would hide the rootfs mounts


def test_install_systemd_writes_the_unit(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    proc = ctl("install-systemd", "--unit-dir", str(unit_dir), "--admin-group", "sgw",
               "--allowed-roots", "/srv/images:/var/lib/images")
    assert proc.returncode == 0, proc.stderr
    path = unit_dir / UNIT_NAME
    text = path.read_text()
    s = unit_settings(text)
    exec_start = s["ExecStart"][0].split()
    assert exec_start[0] == str(BIN / "gatewayd")  # the gatewayd beside this gatewayctl
    assert exec_start[1:] == ["--admin-group", "sgw", "--allowed-roots",
                              "/srv/images:/var/lib/images"]
    assert s["Type"] == ["notify"] and s["KillMode"] == ["process"]
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert f"{UNIT_NAME} installed at {path}" in proc.stdout
    assert "systemctl daemon-reload" in proc.stdout
    assert f"systemctl enable --now {UNIT_NAME}" in proc.stdout
    assert [p.name for p in unit_dir.iterdir()] == [UNIT_NAME]  # no temp files left

    again = ctl("install-systemd", "--unit-dir", str(unit_dir), "--admin-group", "sgw",
                "--allowed-roots", "/srv/images:/var/lib/images")
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert path.read_text() == text


def test_install_systemd_refuses_a_foreign_unit(tmp_path: Path) -> None:
    (tmp_path / UNIT_NAME).write_text("[Service]\nExecStart=/bin/true\n")
    proc = ctl("install-systemd", "--unit-dir", str(tmp_path))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / UNIT_NAME).read_text() == "[Service]\nExecStart=/bin/true\n"
    assert ctl("install-systemd", "--unit-dir", str(tmp_path), "--force").returncode == 0
    assert unit_settings((tmp_path / UNIT_NAME).read_text())["Type"] == ["notify"]


def test_install_systemd_refuses_unquotable_values(tmp_path: Path) -> None:
    proc = ctl("install-systemd", "--unit-dir", str(tmp_path), "--allowed-roots", "/a b")
    assert proc.returncode == 1 and "cannot hold" in proc.stderr
    assert not (tmp_path / UNIT_NAME).exists()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_is_sent_only_once_the_admin_socket_accepts(tmp_path: Path, abstract: bool) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    if abstract:
        name = f"sgw-notify-{os.getpid()}-{time.monotonic_ns()}"
        notify.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        notify.bind(address)
    notify.settimeout(60)
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""],
                    env={"NOTIFY_SOCKET": address})
    argv = [str(BIN / "gatewayd"), "--state-dir", str(daemon.state_dir), "--run-dir",
            str(daemon.run_dir), "--libvirt-uri", ""]
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "NOTIFY_SOCKET": address})
    try:
        message = notify.recv(4096)
        # The very first thing after READY=1: the admin socket must accept and answer.
        status = call(daemon.socket, "status", timeout=10)
        assert message == b"READY=1"
        assert status["healthy"] is True
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        notify.close()
        daemon.stop()
        assert daemon.cleanup() == []


def test_unreachable_notify_socket_does_not_stop_the_daemon(tmp_path: Path) -> None:
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""],
                    env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    daemon.start()
    try:
        assert daemon.ctl("status").returncode == 0
        assert "sd_notify failed" in daemon.log_path.read_text()
    finally:
        assert daemon.stop() == 0
        assert daemon.cleanup() == []
