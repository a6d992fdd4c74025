"""Issue 14's host-root findings, each performed as the attack it describes, on a real gatewayd.

Real users are created for the attacks of a local user; the daemon's directories sit under a
0755 temporary directory, so that only the gateway's own modes stand between them and the rootfs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admin.client import call
from gateway.errors import PermissionDenied
from gateway.host import mounts
from gateway.testing.daemon import CtlResult, Daemon
from gateway.testing.images import MARKER, build_rootfs_tree, make_fs_image
from tests.test_access import ensure_user

pytestmark = pytest.mark.timeout(180)
LOCAL = "sgw-test-local"  # an ordinary host user, in no gateway group
SECRET = "root-only secret\n"


@pytest.fixture(scope="module")
def local_user() -> str:
    ensure_user(LOCAL)
    return LOCAL


@pytest.fixture
def top() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgw-sec-"))
    os.chmod(path, 0o755)
    (path / "images").mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start(top: Path, *extra: str, umask: int | None = None) -> Daemon:
    daemon = Daemon(state_dir=top / "state", run_dir=top / "run", log_path=top / "gatewayd.log",
                    extra_args=["--libvirt-uri", "", "--allowed-roots", str(top / "images"),
                                *extra])
    if umask is None:
        daemon.start()
        return daemon
    old = os.umask(umask)
    try:
        daemon.start()
    finally:
        os.umask(old)
    return daemon


@pytest.fixture
def gw(top: Path) -> Iterator[Daemon]:
    daemon = start(top)
    try:
        yield daemon
    finally:
        code = daemon.stop()
        leaked = daemon.cleanup()
        assert code == 0, daemon.log_tail()
        assert not leaked, leaked


def ctl_json(daemon: Daemon, *args: str) -> dict[str, object]:
    out = json.loads(daemon.ctl(*args, "--json", check=True).stdout)
    assert isinstance(out, dict)
    return out


def one_line_error(proc: CtlResult) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatewayctl: "), proc.stderr
    return lines[0]


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                           *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def setuid_image(top: Path) -> Path:
    """An ext4 image whose tree has a setuid-root copy of the host's cat (a tenant's sudo)."""
    tree = build_rootfs_tree(top / "tree")
    shutil.copy2("/bin/cat", tree / "bin" / "suidcat")
    os.chown(tree / "bin" / "suidcat", 0, 0)
    os.chmod(tree / "bin" / "suidcat", 0o4755)
    return make_fs_image(top / "images" / "suid.raw", 64 << 20, tree)


def options(path: Path) -> set[str]:
    found = mounts.mounts_at(path)
    assert found, f"{path} is not mounted"
    return set(found[-1].options.split(","))


@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_host_users_cannot_reach_tenant_files_or_setuid_binaries(
        gw: Daemon, top: Path, local_user: str, mode: str) -> None:
    """Findings 3 and 4: a local user ran a tenant's setuid cat from RUN_DIR/rootfs/VOL and
    RUN_DIR/mnt/VOL and read /etc/shadow; host uid N read tenant uid N's files."""
    image = setuid_image(top)
    volume = ctl_json(gw, "volume", "add", "t", str(image), "--format", "raw")
    assert volume["nosuid"] is True  # the default
    rootfs = Path(gw.ctl("mount", "t", "--mode", mode, check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER  # root still reaches it
        assert "nosuid" in options(rootfs)
        targets = [rootfs]
        if mode == "bind":
            assert "nosuid" in options(gw.run_dir / "mnt" / "t")
            targets.append(gw.run_dir / "mnt" / "t")
        for root in targets:
            attack = as_user(local_user, str(root / "bin" / "suidcat"), "/etc/shadow")
            assert attack.returncode != 0 and "Permission denied" in attack.stderr
            peek = as_user(local_user, "cat", str(root / "etc" / "marker"))
            assert peek.returncode != 0 and "Permission denied" in peek.stderr
        listing = as_user(local_user, "ls", str(gw.run_dir))
        assert listing.returncode != 0  # 0711: reachable by name only
        for sub, mode_bits in (("", 0o711), ("mnt", 0o700), ("rootfs", 0o700)):
            st = os.stat(gw.run_dir / sub)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode_bits, 0), sub
        # the block view is a FUSE mount without allow_other: no other user enters it
        assert as_user(local_user, "ls", str(gw.run_dir / "blk")).returncode != 0
    finally:
        gw.ctl("umount", "t", check=True)


def test_setuid_is_an_explicit_opt_in_carried_through_every_maker(gw: Daemon, top: Path) -> None:
    image = setuid_image(top)
    assert ctl_json(gw, "volume", "add", "plain", str(image), "--format", "raw")["nosuid"] is True
    made = {
        "copy": ("volume", "create", "copy", "--from", "plain", "--copy"),
        "overlay": ("volume", "create", "ovl", "--from", "plain", "--overlay"),
        "blank": ("volume", "create", "blank", "--size", "16M", "--format", "raw", "--mkfs",
                  "ext4"),
        "suid-copy": ("volume", "create", "suid-copy", "--from", "plain", "--copy",
                      "--setuid"),
        "suid-blank": ("volume", "create", "suid-blank", "--size", "16M", "--format", "qcow2",
                       "--mkfs", "ext4", "--setuid"),
    }
    tree = build_rootfs_tree(top / "imp-tree")
    tarball = top / "images" / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname=".")
    made["import"] = ("volume", "import", "imp", "--tarball", str(tarball), "--size", "32M")
    made["suid-import"] = ("volume", "import", "suid-imp", "--tarball", str(tarball), "--size",
                           "32M", "--setuid")
    for what, argv in made.items():
        gw.ctl(*argv, check=True)
        name = argv[2]
        shown = ctl_json(gw, "volume", "show", name)
        assert shown["nosuid"] is (not what.startswith("suid")), (what, shown["nosuid"])
    # setuid honoured only where asked for: the kernel mount and the bind lack nosuid
    rootfs = Path(gw.ctl("mount", "suid-copy", check=True).stdout.strip())
    try:
        assert "nosuid" not in options(rootfs)
        assert "nosuid" not in options(gw.run_dir / "mnt" / "suid-copy")
    finally:
        gw.ctl("umount", "suid-copy", check=True)
    # and it can be changed on an unmounted volume only
    assert ctl_json(gw, "volume", "set", "suid-copy", "--no-setuid")["nosuid"] is True
    gw.ctl("mount", "copy", check=True)
    try:
        assert "mounted" in one_line_error(gw.ctl("volume", "set", "copy", "--setuid"))
    finally:
        gw.ctl("umount", "copy", check=True)
    for name in ("suid-imp", "imp", "suid-blank", "suid-copy", "blank", "ovl", "copy", "plain"):
        gw.ctl("volume", "rm", name, check=True)


def test_a_request_cannot_name_a_libvirt_uri(gw: Daemon, top: Path) -> None:
    """Finding 2: `lxc+ext:///system?command=SCRIPT` ran SCRIPT as root."""
    ran = top / "ran"
    script = top / "images" / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    uri = f"lxc+ext:///system?command={script}"
    with pytest.raises(PermissionDenied, match="cannot name a libvirt URI"):
        call(str(gw.socket), "volume-add-pool", {"name": "p", "pool": "default", "vol": "x",
                                                 "format": "raw", "uri": uri}, timeout=30)
    bad = gw.ctl("volume", "add", "p", "--pool", "default", "--vol", "x", "--format", "raw",
                 "--uri", uri)
    assert bad.returncode == 2 and "--uri" in bad.stderr  # the option no longer exists
    assert "--format" in one_line_error(gw.ctl("volume", "add", "p", "--pool", "default",
                                               "--vol", "x"))
    time.sleep(0.2)
    assert not ran.exists()
    assert json.loads(gw.ctl("volume", "ls", "--json", check=True).stdout) == []


def test_daemon_uri_must_be_plain_local() -> None:
    from gateway.libvirt.pools import check_uri
    assert check_uri("lxc:///") == "lxc:///" and check_uri("qemu:///system")
    for uri in ("lxc+ext:///system?command=/x", "lxc:///system?socket=/x", "lxc+ssh://h/",
                "qemu://host/system"):
        with pytest.raises(PermissionDenied):
            check_uri(uri)


def test_symlink_swapped_after_registration_is_never_followed(gw: Daemon, top: Path) -> None:
    """Finding 6: a swapped symlink made a volume serve a root-only image outside the roots,
    and `volume resize` grew a root-only host file."""
    outside = top / "outside"
    outside.mkdir(mode=0o700)
    secret = outside / "disk.raw"
    secret.write_bytes(SECRET.encode().ljust(16 << 20, b"\0"))
    secret.chmod(0o600)
    sub = top / "images" / "sub"
    sub.mkdir()
    make_fs_image(sub / "disk.raw", 16 << 20, None)
    gw.ctl("volume", "add", "victim", str(sub / "disk.raw"), "--format", "raw", check=True)
    # The registered file is kept (moved away, not deleted), so that no new file can reuse
    # its inode number below.
    os.rename(sub, top / "images" / "moved")
    sub.symlink_to(outside)  # the directory on the path is now a symlink out of the roots
    for argv in (("export", "victim"), ("mount", "victim"),
                 ("volume", "resize", "victim", "--size", "80M"),
                 ("volume", "create", "stolen", "--from", "victim", "--copy")):
        line = one_line_error(gw.ctl(*argv))
        assert "symlink" in line, (argv, line)
    assert secret.stat().st_size == 16 << 20  # not grown
    assert secret.read_bytes().startswith(SECRET.encode())
    assert [v["name"] for v in json.loads(gw.ctl("volume", "ls", "--json").stdout)] == ["victim"]
    # the same file name, another file (renamed into place): refused by its identity
    sub.unlink()
    sub.mkdir()
    make_fs_image(sub / "other.raw", 16 << 20, None)
    os.rename(sub / "other.raw", sub / "disk.raw")
    assert "no longer the file registered" in one_line_error(gw.ctl("export", "victim"))
    assert gw.ctl("status").returncode == 0
    gw.ctl("volume", "rm", "victim", check=True)


def test_paths_inside_the_gateway_are_refused_without_hanging(gw: Daemon, top: Path) -> None:
    """Finding 7: `volume import` of a tarball under RUN_DIR/blk, or an export of a volume whose
    path was swapped to RUN_DIR/blk/VOL/disk, hung gatewayd for good."""
    image = top / "images" / "a.raw"
    make_fs_image(image, 16 << 20, None)
    gw.ctl("volume", "add", "a", str(image), "--format", "raw", check=True)
    gw.ctl("export", "a", check=True)
    disk = gw.run_dir / "blk" / "a" / "disk"
    for argv in (("volume", "import", "x", "--tarball", str(disk) + ".tar", "--size", "16M"),
                 ("volume", "add", "y", str(disk), "--format", "raw"),
                 ("volume", "add", "z", str(gw.state_dir / "catalog.db"), "--format", "raw")):
        assert "gateway's own directories" in one_line_error(gw.ctl(*argv, timeout=30))
    # through a link inside the roots: resolved off the trio thread, then refused
    (top / "images" / "via.tar").symlink_to(disk)
    line = one_line_error(gw.ctl("volume", "import", "x", "--tarball",
                                 str(top / "images" / "via.tar"), "--size", "16M", timeout=30))
    assert "gateway's own directories" in line
    # a volume whose image is swapped for a link to another volume's block-view disk
    other = top / "images" / "b.raw"
    make_fs_image(other, 16 << 20, None)
    gw.ctl("volume", "add", "b", str(other), "--format", "raw", check=True)
    gw.ctl("unexport", "a", check=True)
    os.unlink(other)
    other.symlink_to(disk.parent.parent / "a" / "disk")
    gw.ctl("export", "a", check=True)
    assert "symlink" in one_line_error(gw.ctl("export", "b", timeout=30))
    assert gw.ctl("status", timeout=30).returncode == 0
    gw.ctl("unexport", "a", check=True)
    for name in ("a", "b"):
        gw.ctl("volume", "rm", name, check=True)
    # the fixture stops gatewayd with SIGTERM and requires a clean exit


def test_umask_000_leaves_nothing_open_to_other_users(top: Path, local_user: str) -> None:
    """Finding 11: under umask 000 nbd.sock and qsd.qmp were 0777 and a local user read and
    wrote a volume over NBD; the catalog and logs were world-readable."""
    daemon = start(top, umask=0o000)
    try:
        image = top / "images" / "u.raw"
        make_fs_image(image, 16 << 20, None)
        daemon.ctl("volume", "add", "u", str(image), "--format", "raw", check=True)
        daemon.ctl("export", "u", check=True)
        state = daemon.state_dir
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        for path in [state / "catalog.db", daemon.run_dir / "qsd.log",
                     *[daemon.run_dir / s for s in ("nbd.sock", "qsd.qmp")]]:
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
        probe = as_user(local_user, "python3", "-c", (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(daemon.run_dir / 'nbd.sock')!r})\n"))
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
        daemon.ctl("unexport", "u", check=True)
    finally:
        assert daemon.stop() == 0
        assert daemon.cleanup() == []


def test_volume_add_does_not_open_a_fifo(gw: Daemon, top: Path) -> None:
    """Finding 12: `volume add` opened a path before checking its kind (opening some devices
    has side effects). A writer blocked on a FIFO is released by any open for reading."""
    fifo = top / "images" / "pipe"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"echo x > {fifo}"])
    try:
        line = one_line_error(gw.ctl("volume", "add", "f", str(fifo), "--format", "raw"))
        assert "not a regular file or block device" in line
        time.sleep(0.3)
        assert writer.poll() is None  # still blocked: nobody opened the FIFO
    finally:
        writer.kill()
        writer.wait()


def test_status_says_when_the_admin_group_is_root_equivalent(top: Path) -> None:
    daemon = Daemon(state_dir=top / "state", run_dir=top / "run", log_path=top / "log",
                    extra_args=["--libvirt-uri", "", "--admin-group", "root"])
    daemon.start()
    try:
        status = json.loads(daemon.ctl("status", "--json", check=True).stdout)
        assert "root-equivalent" in status["security"]["warning"]
        assert "root-equivalent" in daemon.ctl("status", check=True).stdout
    finally:
        assert daemon.stop() == 0
        assert daemon.cleanup() == []


def test_jobs_never_starve_mounts(gw: Daemon, top: Path) -> None:
    """Finding 9: jobs shared trio's worker threads with mounts; 40 concurrent imports made an
    unrelated mount wait 120 s. Jobs now run at most JOB_THREADS at a time, on their own."""
    from gateway.admin.jobs import JOB_THREADS
    source = top / "images" / "noise.raw"
    with open(source, "wb") as f:
        f.write(os.urandom(48 << 20))  # not sparse: every copy really writes
    gw.ctl("volume", "add", "noise", str(source), "--format", "raw", "--read-only", check=True)
    image = top / "images" / "m.raw"
    make_fs_image(image, 16 << 20, build_rootfs_tree(top / "m-tree"))
    gw.ctl("volume", "add", "m", str(image), "--format", "raw", check=True)
    copies = [f"c{i}" for i in range(16)]
    for name in copies:
        answer = call(str(gw.socket), "volume-create",
                      {"name": name, "from": "noise", "copy": True}, timeout=30)
        assert "job" in answer
    rootfs = Path(gw.ctl("mount", "m", check=True).stdout.strip())
    jobs = call(str(gw.socket), "job-list", {}, timeout=30)
    assert any(j["state"] == "running" for j in jobs), "the mount waited for every job"
    assert (rootfs / "etc" / "marker").read_text() == MARKER
    gw.ctl("umount", "m", check=True)
    deadline = time.monotonic() + 150
    while True:
        jobs = call(str(gw.socket), "job-list", {}, timeout=30)
        started = [j for j in jobs if j["state"] == "running" and j["progress"] > 0]
        assert len(started) <= JOB_THREADS, started
        if all(j["state"] != "running" for j in jobs):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert all(j["state"] == "done" for j in jobs), jobs
    for name in [*copies, "m", "noise"]:
        gw.ctl("volume", "rm", name, check=True)
