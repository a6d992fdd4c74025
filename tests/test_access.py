"""Admin socket access: real non-root users, SO_PEERCRED and the admin group."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.daemon import Daemon

pytestmark = pytest.mark.timeout(120)
GROUP = "sgw-test-admins"
MEMBER = "sgw-test-member"
OUTSIDER = "sgw-test-outsider"


def ensure_user(name: str, groups: str | None = None) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        subprocess.run(argv, check=True, capture_output=True)
    if groups:
        subprocess.run(["usermod", "-a", "-G", groups, name], check=True, capture_output=True)


@pytest.fixture(scope="module")
def users() -> None:
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
    ensure_user(MEMBER, GROUP)
    ensure_user(OUTSIDER)


@pytest.fixture
def group_daemon(users: None) -> Iterator[Daemon]:
    # Under /tmp with 0755 dirs, so other users can reach the socket's directory.
    top = Path(tempfile.mkdtemp(prefix="sgw-access-"))
    os.chmod(top, 0o755)
    daemon = Daemon(state_dir=top / "state", run_dir=top / "run", log_path=top / "log",
                    extra_args=["--admin-group", GROUP])
    daemon.start()
    try:
        yield daemon
    finally:
        assert daemon.cleanup() == []
        subprocess.run(["rm", "-rf", str(top)], check=False)


def test_socket_is_owned_by_the_admin_group(group_daemon: Daemon) -> None:
    st = os.stat(group_daemon.socket)
    assert st.st_uid == 0
    assert st.st_gid == grp.getgrnam(GROUP).gr_gid
    assert st.st_mode & 0o777 == 0o660


def test_admin_group_member_is_allowed(group_daemon: Daemon) -> None:
    proc = group_daemon.ctl("status", "--json", user=MEMBER)
    assert proc.returncode == 0, proc.stderr


def test_outsider_cannot_connect(group_daemon: Daemon) -> None:
    proc = group_daemon.ctl("status", user=OUTSIDER)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"gatewayctl: permission denied connecting to "
                                   f"{group_daemon.socket}")


def test_peer_credentials_refuse_outsider_even_if_socket_mode_is_loosened(
        group_daemon: Daemon) -> None:
    os.chmod(group_daemon.socket, 0o666)  # a misconfiguration: SO_PEERCRED still holds the line
    proc = group_daemon.ctl("volume", "ls", user=OUTSIDER)
    uid = pwd.getpwnam(OUTSIDER).pw_uid
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"gatewayctl: uid {uid} may not use the admin socket "
                                   f"(allowed: root or members of group {GROUP})")
    assert group_daemon.ctl("status").returncode == 0


def test_unknown_admin_group_fails_start(tmp_path: Path) -> None:
    daemon = Daemon(state_dir=tmp_path / "s", run_dir=tmp_path / "r", log_path=tmp_path / "l",
                    extra_args=["--admin-group", "no-such-group-sgw"])
    with pytest.raises(RuntimeError, match="admin group no-such-group-sgw does not exist"):
        daemon.start(timeout=20)
