"""Issue 14 finding 10: only the gateway's own fuse2fs processes and mounts are the gateway's.

A process that merely calls itself fuse2fs and names paths under the run dir (another user's, or
root's running another binary), and root's real fuse2fs mounted outside RUN_DIR/rootfs, must
survive reconcile, the start-up sweep and a real gatewayd start untouched. And a volume the
catalog calls mounted is only reported mounted while its rootfs really is that mount.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.attach import attachment
from gateway.host import fuse2fs, mounts
from gateway.testing.daemon import Daemon
from gateway.testing.images import MIB, make_fs_image

USER = "sgw-test-fakefuse"
MARKER = "the gateway's own volume\n"


def ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True)


def state_of(pid: int) -> str | None:
    """The process's state letter, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def top() -> Iterator[Path]:
    # Under /tmp with a 0755 top, so that the unprivileged user reaches its fake binary.
    path = Path(tempfile.mkdtemp(prefix="sgw-trust-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


class Foreign:
    """The processes and the mount that are not the gateway's."""

    def __init__(self, top: Path, run_dir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        fake_dir = top / "fake"
        fake_dir.mkdir()
        self.fake = fake_dir / "fuse2fs"  # a copy of sh that calls itself fuse2fs
        shutil.copy("/bin/sh", self.fake)
        os.chmod(self.fake, 0o755)
        script = fake_dir / "idle.sh"
        script.write_text("while :; do sleep 1; done\n")
        os.chmod(script, 0o644)
        # The gateway's argv shape, `fuse2fs IMAGE TARGET -f -o OPTS`, with a target under
        # RUN_DIR/rootfs: sh runs IMAGE as a script and ignores the rest.
        self.user_fake = self._spawn(["setpriv", f"--reuid={USER}", f"--regid={USER}",
                                      "--clear-groups", str(self.fake), str(script),
                                      str(run_dir / "rootfs" / "fakevol"), "-f", "-o", "ro"])
        self.root_fake = self._spawn([str(self.fake), str(script),
                                      str(run_dir / "rootfs" / "rootfake"), "-f", "-o", "ro"])
        # root's real fuse2fs, its image under the run dir, mounted outside it
        tree = top / "foreign-tree"
        tree.mkdir()
        (tree / "foreign").write_text("not the gateway's\n")
        image = make_fs_image(run_dir / "foreign.ext4", 8 * MIB, tree)
        self.mnt = top / "foreign-mnt"
        self.mnt.mkdir()
        self.real = self._spawn(["fuse2fs", str(image), str(self.mnt), "-f", "-o", "ro"])
        wait_for("the foreign fuse2fs mount", lambda: mounts.is_mountpoint(self.mnt))

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def assert_untouched(self) -> None:
        for proc in self.procs:
            assert proc.poll() is None, f"pid {proc.pid} exited {proc.returncode}"
            assert state_of(proc.pid) in ("S", "R"), state_of(proc.pid)
        assert [m.fstype.split(".")[0] for m in mounts.mounts_at(self.mnt)] == ["fuse"]
        assert (self.mnt / "foreign").read_text() == "not the gateway's\n"

    def close(self) -> None:
        if mounts.is_mountpoint(self.mnt):
            mounts.umount(self.mnt)
        for proc in self.procs:
            if proc is not self.real and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the fake and its sleep
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def claims(text: str, foreign: Foreign) -> list[str]:
    """What of `foreign` the text (a report) mentions."""
    found = [f"pid {pid}" for pid in foreign.pids if f"pid {pid}" in text]
    return found + [str(foreign.mnt)] * (str(foreign.mnt) in text)


@pytest.mark.timeout(120)
def test_foreign_fuse2fs_processes_and_mounts_are_left_alone(top: Path) -> None:
    ensure_user(USER)
    run_dir = top / "run"
    for name in ("fakevol", "rootfake"):
        (run_dir / "rootfs" / name).mkdir(parents=True)
    foreign = Foreign(top, run_dir)
    d = Daemon(state_dir=top / "state", run_dir=run_dir, log_path=top / "gatewayd.log",
               extra_args=["--libvirt-uri", ""])
    try:
        for fake in (foreign.user_fake, foreign.root_fake):
            assert fuse2fs.identify(fake.pid) is None  # not root's, or not the real binary
        # root's real fuse2fs is trusted, but its target lies outside the rootfs root
        real = fuse2fs.identify(foreign.real.pid)
        assert real is not None and real.target == str(foreign.mnt)
        assert fuse2fs.adopt(foreign.real.pid, foreign.mnt,
                             confine=run_dir / "rootfs") is None
        assert fuse2fs.processes_mounted_under(run_dir / "rootfs") == {}

        reports = [
            attachment.reconcile(run_dir, "fakevol", [("fuse2fs", {
                "phase": "done", "pid": foreign.user_fake.pid,
                "target": str(run_dir / "rootfs" / "fakevol")})]),
            attachment.reconcile(run_dir, "rootfake", [("fuse2fs", {
                "phase": "done", "pid": foreign.root_fake.pid})]),
            attachment.reconcile(run_dir, "foreign", [("fuse2fs", {
                "phase": "done", "pid": foreign.real.pid, "target": str(foreign.mnt)})]),
            attachment.sweep(run_dir),
        ]
        for report in reports:
            assert vars(report) == {"found": [], "done": [], "remaining": [], "errors": []}
        foreign.assert_untouched()

        d.start()  # its reconcile and sweep, on the same run dir
        status = json.loads(d.ctl("status", "--json", check=True).stdout)
        assert status["reconcile"]["found"] == 0, status["reconcile"]
        assert claims(json.dumps(status["reconcile"]), foreign) == []
        time.sleep(0.5)
        foreign.assert_untouched()
        assert foreign.user_fake.pid not in fuse2fs.processes_under(run_dir)
    finally:
        foreign.close()
        d.stop()
        leaked = d.cleanup()
    assert leaked == []


def add_volume(d: Daemon, tmp_path: Path, name: str) -> Path:
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    (tree / "marker").write_text(MARKER)
    image = make_fs_image(tmp_path / f"{name}.raw", 16 * MIB, tree)
    d.ctl("volume", "add", name, str(image), "--format", "raw", check=True)
    return d.run_dir / "rootfs" / name


def mount(d: Daemon, name: str, mode: str) -> dict[str, str]:
    out: dict[str, str] = json.loads(d.ctl("mount", name, "--mode", mode, "--json",
                                           check=True).stdout)
    return out


@pytest.mark.timeout(120)
def test_bind_rootfs_unmounted_behind_the_gateway_is_mounted_again(gatewayd: Daemon,
                                                                  tmp_path: Path) -> None:
    rootfs = add_volume(gatewayd, tmp_path, "vanished")
    mount(gatewayd, "vanished", "bind")
    assert (rootfs / "marker").read_text() == MARKER
    subprocess.run(["umount", str(rootfs)], check=True)
    assert os.listdir(rootfs) == []  # what `mount` used to hand out as mounted
    assert mount(gatewayd, "vanished", "bind") == {"rootfs": str(rootfs), "mode": "bind"}
    assert (rootfs / "marker").read_text() == MARKER
    shown = json.loads(gatewayd.ctl("volume", "show", "vanished", "--json", check=True).stdout)
    assert shown["attachment"]["state"] == "mounted"
    assert "a mounted volume's rootfs is gone; mounting it afresh" in gatewayd.log_tail(200)
    # a mount that is there is still returned as it is
    assert mount(gatewayd, "vanished", "bind") == {"rootfs": str(rootfs), "mode": "bind"}
    gatewayd.ctl("umount", "vanished", check=True)
    gatewayd.ctl("volume", "rm", "vanished", check=True)


@pytest.mark.timeout(150)
def test_fuse_rootfs_detached_behind_the_gateway_is_mounted_again(gatewayd: Daemon,
                                                                  tmp_path: Path) -> None:
    rootfs = add_volume(gatewayd, tmp_path, "detached")
    mount(gatewayd, "detached", "fuse")
    (old_pid,) = fuse2fs.processes_mounted_under(rootfs)
    # A file held open keeps the detached filesystem, and so its fuse2fs, alive: the pid lives
    # on, the catalog still says mounted, and the rootfs is an empty directory.
    held = os.open(rootfs / "marker", os.O_RDONLY)
    try:
        subprocess.run(["umount", "-l", str(rootfs)], check=True)
        assert os.listdir(rootfs) == [] and state_of(old_pid) in ("S", "R")
        assert mount(gatewayd, "detached", "fuse") == {"rootfs": str(rootfs), "mode": "fuse"}
        assert (rootfs / "marker").read_text() == MARKER
        (new_pid,) = fuse2fs.processes_mounted_under(rootfs)
        assert new_pid != old_pid and state_of(old_pid) is None
    finally:
        os.close(held)
    assert [m.fstype for m in mounts.mounts_at(rootfs)] == ["fuse"]
    gatewayd.ctl("umount", "detached", check=True)
    gatewayd.ctl("volume", "rm", "detached", check=True)
