"""Issue 14 finding 8: admin connections must not exhaust gatewayd's fds and take it down.

A real gatewayd under `prlimit --nofile=256:256`: 300 held root connections make accept fail
with EMFILE, which is logged once and backed off while the daemon and its mounts live on. Non-root
peers are capped at MAX_CONNECTIONS_PER_UID connections each (checked with a real user of the
admin group); root is not.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admin.server import MAX_CONNECTIONS_PER_UID, MAX_REFUSALS_PER_UID
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, make_fs_image

ROOT = Path(__file__).resolve().parent.parent
GROUP = "sgw-test-admins"
USER = "sgw-test-fdcap"
HELLO = "hello through the gateway\n"


def pid(d: Daemon) -> int:
    assert d.proc is not None
    return d.proc.pid


def nofile_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files limit for pid {pid}")


def log_messages(d: Daemon) -> list[str]:
    found = []
    for line in d.log_path.read_text().splitlines():
        try:
            found.append(json.loads(line)["msg"])
        except (ValueError, KeyError):
            continue
    return found


def ensure_user(name: str, group: str) -> None:
    try:
        grp.getgrnam(group)
    except KeyError:
        subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True)
    subprocess.run(["usermod", "-a", "-G", group, name], check=True, capture_output=True)


@pytest.fixture
def top() -> Iterator[Path]:
    # Under /tmp with a 0755 top, so that a non-root user reaches the admin socket.
    path = Path(tempfile.mkdtemp(prefix="sgw-limits-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def make_daemon(top: Path, *extra: str, nofile: tuple[int, int] = (256, 256)) -> Daemon:
    """gatewayd started under `prlimit --nofile=SOFT:HARD` (which execs it: same pid)."""
    return Daemon(state_dir=top / "state", run_dir=top / "run", log_path=top / "log",
                  extra_args=["--libvirt-uri", "", *extra],
                  wrapper=["prlimit", f"--nofile={nofile[0]}:{nofile[1]}"])


def write_and_sync(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # through the loop device, the block view and NBD: gatewayd serves


@pytest.mark.timeout(180)
def test_fd_exhaustion_backs_off_and_mounts_survive(top: Path) -> None:
    tree = top / "tree"
    tree.mkdir()
    (tree / "hello").write_text(HELLO)
    image = make_fs_image(top / "small.raw", 16 * MIB, tree)
    d = make_daemon(top)
    d.start()
    try:
        assert nofile_limits(pid(d)) == (256, 256)
        d.ctl("volume", "add", "small", str(image), "--format", "raw", check=True)
        d.ctl("mount", "small", check=True)
        rootfs = d.run_dir / "rootfs" / "small"
        assert (rootfs / "hello").read_text() == HELLO

        held: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 30
            while len(held) < 300:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                try:
                    s.connect(str(d.socket))  # queued in the backlog while gatewayd cannot accept
                except BlockingIOError:  # the backlog is full for now
                    s.close()
                    assert time.monotonic() < deadline, f"{len(held)} connected"
                    time.sleep(0.01)
                    continue
                held.append(s)
            deadline = time.monotonic() + 20
            while "admin accept failed; backing off" not in log_messages(d):
                assert time.monotonic() < deadline, d.log_tail()
                time.sleep(0.1)
            time.sleep(2)  # a few back-off rounds at the full limit
            assert d.proc is not None and d.proc.poll() is None, d.log_tail()
            assert len(os.listdir(f"/proc/{pid(d)}/fd")) >= 250
        finally:
            for s in held:
                s.close()

        status = d.ctl("status", "--json", timeout=30)
        assert status.returncode == 0, status.stderr + d.log_tail()
        assert json.loads(status.stdout)["mounts"] == 1
        assert (rootfs / "hello").read_text() == HELLO
        write_and_sync(rootfs / "after", "written after the flood\n")
        assert (rootfs / "after").read_text() == "written after the flood\n"
        messages = log_messages(d)
        # once per burst, not once per failed accept
        assert 1 <= messages.count("admin accept failed; backing off") <= 3, messages[-20:]
        assert "admin accept works again" in messages
        d.ctl("umount", "small", check=True)
        d.ctl("volume", "rm", "small", check=True)
    finally:
        code = d.stop()
        leaked = d.cleanup()
    assert code == 0, d.log_tail()
    assert leaked == []


@pytest.mark.timeout(60)
def test_soft_fd_limit_is_raised_to_the_hard_limit(top: Path) -> None:
    d = make_daemon(top, nofile=(256, 4096))
    d.start()
    try:
        assert nofile_limits(pid(d)) == (4096, 4096)
    finally:
        d.stop()
        assert d.cleanup() == []


# Run as the non-root user, with argv SOCKET CAP ANSWERED CLOSED: open CAP connections and call
# status on each (all served); open ANSWERED more and hold them unused, then CLOSED more, which
# gatewayd must close at once (read EOF); call on the ANSWERED ones (each gets the refusal);
# report, hold the served connections until a line on stdin, then call on them again.
CLIENT = """
import json, socket, sys
from gateway.admin.client import Client
from gateway.errors import GatewayError

def call(c):
    try:
        c.call("status")
        return "ok"
    except GatewayError as exc:
        return exc.code + ": " + exc.message

path = sys.argv[1]
cap, answered, closed = (int(a) for a in sys.argv[2:5])
served = [Client(path, timeout=20) for _ in range(cap)]
report = {"served": [call(c) for c in served]}
refused = [Client(path, timeout=20) for _ in range(answered)]
flood = []
for _ in range(closed):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    flood.append(s)
report["flood"] = ["eof" if s.recv(1) == b"" else "data" for s in flood]
report["refused"] = [call(c) for c in refused]
print(json.dumps(report), flush=True)
sys.stdin.readline()
print(json.dumps([call(c) for c in served]), flush=True)
"""


@pytest.mark.timeout(120)
def test_non_root_peer_is_capped_per_uid(top: Path) -> None:
    ensure_user(USER, GROUP)
    uid = pwd.getpwnam(USER).pw_uid
    d = make_daemon(top, "--admin-group", GROUP)
    d.start()
    cap, answered, closed = MAX_CONNECTIONS_PER_UID, MAX_REFUSALS_PER_UID, 3
    argv = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups",
            sys.executable, "-c", CLIENT, str(d.socket), str(cap), str(answered), str(closed)]
    client = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line, client.stderr.read() if client.stderr else ""
        report = json.loads(line)
        message = (f"uid {uid} has too many admin connections open (at most {cap}); "
                   "close some and retry")
        assert report == {"served": ["ok"] * cap, "flood": ["eof"] * closed,
                          "refused": [f"too-many-connections: {message}"] * answered}
        # While the user holds its connections: root is not capped, the user is.
        assert d.ctl("status").returncode == 0
        over = d.ctl("status", user=USER)
        assert over.returncode == 1
        assert over.stderr.strip() == f"gatewayctl: {message}"
        # the connections within the cap still work
        client.stdin.write("\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == ["ok"] * cap
        client.stdin.close()
        assert client.wait(30) == 0
        # once they are closed the user is served again
        deadline = time.monotonic() + 10
        while (proc := d.ctl("status", user=USER)).returncode != 0:
            assert time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        messages = log_messages(d)
        assert messages.count("refused admin peer") == 1, messages[-20:]  # rate-limited
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        code = d.stop()
        leaked = d.cleanup()
    assert code == 0, d.log_tail()
    assert leaked == []
