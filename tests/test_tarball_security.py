"""Tarball import security (issue 14, finding 1): hostile archives never touch the host.

Malicious tarballs are built here with tarfile and imported for real: through a real gatewayd
and gatewayctl, and through lifecycle.build_import directly. Extraction and mkfs.ext4 run in the
import worker's user namespace; the tests check the refusals, that host files and directories
stay as they were, that nothing is left behind, that a compressed bomb is stopped at about the
volume size, and that the extraction runs under the mapped host ids, never as root.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import Volume
from gateway.errors import FormatError, GatewayError, InvalidArgument
from gateway.testing.daemon import CtlResult, Daemon
from gateway.volumes import import_worker, lifecycle, tarball

MIB = 1 << 20
ID_BASE = import_worker.ID_BASE
VICTIM_DATA = b"host secret\n"


# --- building tarballs -------------------------------------------------------------------------

@dataclass
class M:
    """One archive member: name, type, link target, data, mode, owner."""

    name: str
    type: bytes = tarfile.REGTYPE
    link: str = ""
    data: bytes | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int | None = None  # data size if the data comes from `source` instead
    source: Callable[[], io.BufferedIOBase] | None = field(default=None, repr=False)

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type, info.linkname, info.mode = self.type, self.link, self.mode
        info.uid, info.gid, info.mtime = self.uid, self.gid, 1_600_000_000
        if self.type == tarfile.REGTYPE:
            info.size = self.size if self.size is not None else len(self.data or b"")
        return info

    def fileobj(self) -> io.BufferedIOBase | None:
        if self.type != tarfile.REGTYPE:
            return None
        return self.source() if self.source is not None else io.BytesIO(self.data or b"")


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zeros(size: int) -> Callable[[], io.BufferedIOBase]:
    return lambda: io.BufferedReader(Zeros(size), MIB)


COMPRESSORS = {"": None, "gz": ["gzip", "-c"], "xz": ["xz", "-T1", "-c"], "bz2": ["bzip2", "-c"],
               "zst": ["zstd", "-q", "-c"]}


def make_tar(path: Path, members: list[M], compression: str = "") -> Path:
    """Write the members (in this order) as a tarball, compressed by the real tools."""
    plain = path.with_name(path.name + ".plain") if compression else path
    with tarfile.open(plain, "w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            tar.addfile(member.info(), member.fileobj())
    tool = COMPRESSORS[compression]
    if tool is not None:
        with open(path, "wb") as out:
            subprocess.run([*tool, str(plain)], stdout=out, check=True)
        plain.unlink()
    return path


def gzip_bomb(path: Path, size: int) -> Path:
    """One member of `size` zero bytes, gzip-compressed as it is written (nothing big on disk)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        member = M("zero", size=size, source=zeros(size))
        tar.addfile(member.info(), member.fileobj())
    return path


# --- host state --------------------------------------------------------------------------------

@dataclass
class Host:
    """A root-only victim file and a root-only directory, as an attacker would aim at them."""

    victim: Path
    rootdir: Path

    def snapshot(self) -> tuple[object, ...]:
        st, dt = os.lstat(self.victim), os.lstat(self.rootdir)
        return (self.victim.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                st.st_mtime_ns, dt.st_mode, dt.st_uid, dt.st_gid, sorted(os.listdir(self.rootdir)))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM_DATA)
    os.chown(victim, 0, 0)
    victim.chmod(0o600)
    rootdir = tmp_path / "rootonly"
    rootdir.mkdir(mode=0o700)
    (rootdir / "existing").write_text("kept\n")
    return Host(victim, rootdir)


def attacks(host: Host) -> dict[str, tuple[list[M], str]]:
    """Hostile member lists and the refusal each must get."""
    victim, rootdir = str(host.victim), str(host.rootdir)

    def suid(name: str) -> M:
        return M(name, data=b"#!/bin/sh\nid\n", mode=0o4755, uid=0, gid=0)

    return {
        # (a) a file, the same name again as a symlink to a host file, a hard link to that
        # name, then a setuid file written over the hard link.
        "a-relink": ([M("d", data=b"x"), M("d", tarfile.SYMTYPE, victim),
                      M("h", tarfile.LNKTYPE, "d"), suid("h")], "'d' appears twice"),
        "a-link-to-symlink": ([M("s", tarfile.SYMTYPE, victim), M("h", tarfile.LNKTYPE, "s"),
                               suid("h")], "not an earlier regular file"),
        "a-rewrite-link": ([M("d", data=b"x"), M("h", tarfile.LNKTYPE, "d"), suid("h")],
                           "'h' appears twice"),
        # (b) a symlink to a root-only host directory, a hard link to it, a file below that.
        "b-link-to-dir-symlink": ([M("e", tarfile.SYMTYPE, rootdir), M("g", tarfile.LNKTYPE, "e"),
                                   suid("g/x")], "not an earlier regular file"),
        "b-through-symlink": ([M("e", tarfile.SYMTYPE, rootdir), suid("e/x")],
                              "passes through 'e', which is a symlink"),
        "b-through-hardlink": ([M("f", data=b"x"), M("g", tarfile.LNKTYPE, "f"),
                                suid("g/x")], "passes through 'g', which is a hard link"),
        "b-dir-then-symlink": ([M("e", tarfile.DIRTYPE, mode=0o755),
                                M("e", tarfile.SYMTYPE, rootdir), suid("e/x")],
                               "'e' appears twice"),
        "through-file": ([M("f", data=b"x"), M("f/x", data=b"y")],
                         "passes through 'f', which is a regular file"),
        "through-fifo": ([M("p", tarfile.FIFOTYPE), M("p/x", data=b"y")],
                         "passes through 'p', which is a FIFO"),
        "dup-after-clean": ([M("./etc/x", data=b"1"), M("etc//x", data=b"2")],
                            "appears twice"),
        "implied-dir-then-file": ([M("etc/x", data=b"1"), M("etc", data=b"2")],
                                  "'etc' appears twice"),
        "link-to-later": ([M("h", tarfile.LNKTYPE, "later"), M("later", data=b"x")],
                          "not an earlier regular file"),
        "link-to-dir": ([M("dir", tarfile.DIRTYPE), M("h", tarfile.LNKTYPE, "dir")],
                        "not an earlier regular file"),
        "link-to-link": ([M("f", data=b"x"), M("h1", tarfile.LNKTYPE, "f"),
                          M("h2", tarfile.LNKTYPE, "h1")], "not an earlier regular file"),
        "link-outside": ([M("h", tarfile.LNKTYPE, victim)], "absolute paths are refused"),
        "link-dotdot": ([M("h", tarfile.LNKTYPE, "../victim")], "'..' is refused"),
        "absolute": ([M(victim, data=b"x")], "absolute paths are refused"),
        "dotdot": ([M("a/../../victim", data=b"x")], "'..' is refused"),
        "chardev": ([M("dev/null", tarfile.CHRTYPE)], "device nodes are refused"),
        "blockdev": ([M("dev/sda", tarfile.BLKTYPE)], "device nodes are refused"),
        "unsupported": ([M("vol", b"V")], "unsupported type"),
        "uid-too-big": ([M("f", data=b"x", uid=65536)], "owner 65536:0 is outside 0..65535"),
        "gid-too-big": ([M("f", data=b"x", gid=1 << 31)], "is outside 0..65535"),
        "root-not-dir": ([M(".", tarfile.SYMTYPE, "/")], "the root is not a directory"),
    }


# --- observing the import ----------------------------------------------------------------------

def disk_use(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Sampler:
    """Samples something in a thread until stopped (peak disk use, running processes, ...)."""

    def __init__(self, sample: Callable[[], None], interval: float = 0.005) -> None:
        self.sample, self.interval = sample, interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.sample()
                time.sleep(self.interval)
        except BaseException as exc:
            self.failed = exc

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        if self.failed is not None:
            raise self.failed
        self.sample()


def worker_processes(under: Path) -> dict[int, str]:
    """pid -> /proc/PID/status of every process whose working directory is under `under`."""
    found = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(pid_dir / "cwd")
            status = (pid_dir / "status").read_text()
        except OSError:
            continue
        if cwd.startswith(f"{under}/"):
            found[int(pid_dir.name)] = status
    return found


def status_ids(status: str, key: str) -> set[int]:
    line = next(ln for ln in status.splitlines() if ln.startswith(f"{key}:"))
    return {int(v) for v in line.split()[1:]}


def debugfs_stat(image: str, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", image], capture_output=True,
                         text=True, check=True).stdout
    assert "Inode:" in out, f"{path} not in {image}"
    return out


def debugfs_owner_mode(image: str, path: str) -> tuple[int, int, int]:
    fields = debugfs_stat(image, path).split()
    return (int(fields[fields.index("User:") + 1]), int(fields[fields.index("Group:") + 1]),
            int(fields[fields.index("Mode:") + 1], 8))


# --- helpers for the two ways in ---------------------------------------------------------------

def state_of(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return state


def leftovers(state: Path) -> list[str]:
    vdir = state / "volumes"
    return sorted(p.name for p in vdir.iterdir()) if vdir.exists() else []


def import_direct(state: Path, source: Path, size: int = 16 * MIB, fmt: str = "raw",
                  **kwargs: Any) -> Volume:
    final = lifecycle.new_image_path(state, "imp", fmt)
    return lifecycle.build_import("imp", final, source, size, fmt, **kwargs)


def refused_direct(state: Path, source: Path, **kwargs: Any) -> str:
    with pytest.raises(GatewayError) as info:
        import_direct(state, source, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    assert leftovers(state) == [], "scratch or partial files left behind"
    assert worker_processes(state) == {}
    return message


def one_line_error(proc: CtlResult) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def refused_by_gatewayd(daemon: Daemon, tar: Path, size: str = "16M") -> str:
    error = one_line_error(daemon.ctl("volume", "import", "bad", "--tarball", str(tar),
                                      "--size", size))
    assert json.loads(daemon.ctl("volume", "ls", "--json", check=True).stdout) == []
    assert leftovers(daemon.state_dir) == []
    assert worker_processes(daemon.state_dir) == {}
    return error


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["a-relink", "a-link-to-symlink", "b-link-to-dir-symlink",
                                  "b-through-hardlink"])
def test_gatewayd_refuses_host_writing_tarballs(
        gatewayd: Daemon, host: Host, tmp_path: Path, case: str) -> None:
    members, expected = attacks(host)[case]
    before = host.snapshot()
    tar = make_tar(tmp_path / f"{case}.tar.gz", members, "gz")
    error = refused_by_gatewayd(gatewayd, tar)
    assert expected in error and "tarball member" in error
    assert host.snapshot() == before
    assert host.victim.read_bytes() == VICTIM_DATA
    assert os.listdir(host.rootdir) == ["existing"]


@pytest.mark.timeout(300)
def test_build_import_refuses_every_unsafe_member(host: Host, tmp_path: Path) -> None:
    before = host.snapshot()
    state = state_of(tmp_path)
    for case, (members, expected) in attacks(host).items():
        tar = make_tar(tmp_path / f"{case}.tar", members)
        message = refused_direct(state, tar)
        assert expected in message, (case, message)
        assert host.snapshot() == before, case
    assert os.listdir(host.rootdir) == ["existing"]


@pytest.mark.timeout(60)
def test_check_members_streams_and_stops_at_the_first_bad_member(host: Host) -> None:
    members, _ = attacks(host)["a-relink"]
    consumed = []

    def stream() -> Iterator[tarfile.TarInfo]:
        for member in members:
            consumed.append(member.name)
            yield member.info()

    checked = tarball.check_members(stream())
    assert next(checked).name == "d" and consumed == ["d"]  # nothing read ahead
    with pytest.raises(FormatError, match="'d' appears twice"):
        next(checked)
    assert consumed == ["d", "d"]
    good = [M("./", tarfile.DIRTYPE), M("bin", tarfile.DIRTYPE), M("./bin/busybox", data=b"x"),
            M("bin/sh", tarfile.SYMTYPE, "/bin/busybox"), M("ln", tarfile.LNKTYPE, "./bin/busybox"),
            M("a/b/c", tarfile.DIRTYPE), M("a/b", tarfile.DIRTYPE), M("run/p", tarfile.FIFOTYPE)]
    names = [(m.name, m.linkname) for m in tarball.check_members(m.info() for m in good)]
    assert names == [("bin", ""), ("bin/busybox", ""), ("bin/sh", "/bin/busybox"),
                     ("ln", "bin/busybox"), ("a/b/c", ""), ("a/b", ""), ("run/p", "")]


@pytest.mark.timeout(60)
def test_member_cap(tmp_path: Path) -> None:
    assert tarball.MAX_MEMBERS == 200_000
    infos = [M(f"f{i}", data=b"").info() for i in range(6)]
    assert len(list(tarball.check_members(infos, max_members=6))) == 6
    with pytest.raises(FormatError, match="more than 5 members"):
        list(tarball.check_members(infos, max_members=5))
    state = state_of(tmp_path)
    tar = make_tar(tmp_path / "many.tar.gz", [M(f"d/f{i}", data=b"x") for i in range(60)], "gz")
    assert "tarball has more than 50 members" in refused_direct(state, tar, max_members=50)
    vol = import_direct(state, tar, max_members=60)  # the implied directory d is no member
    assert vol.lineage["params"]["members"] == 60


@pytest.mark.timeout(180)
def test_gatewayd_stops_a_gzip_bomb_at_the_volume_size(
        gatewayd: Daemon, tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", 1 << 30)
    assert bomb.stat().st_size < 8 * MIB
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], disk_use(gatewayd.state_dir))

    with Sampler(sample):
        error = refused_by_gatewayd(gatewayd, bomb)
    assert "exceed the volume size (16 MiB)" in error and "'zero'" in error
    assert peak[0] < 16 * MIB, f"{peak[0]} bytes used under the state dir"


@pytest.mark.timeout(180)
def test_many_members_bomb_stops_at_about_the_volume_size(tmp_path: Path) -> None:
    # 64 files of 1 MiB (xz-compressed to almost nothing) for a 16 MiB volume: refused at the
    # member that crosses 16 MiB; the scratch directory never holds much more than that.
    members = [M(f"big/f{i:02}", size=MIB, source=zeros(MIB)) for i in range(64)]
    tar = make_tar(tmp_path / "many.tar.xz", members, "xz")
    state = state_of(tmp_path)
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], disk_use(state))

    with Sampler(sample):
        message = refused_direct(state, tar)
    assert "exceed the volume size (16 MiB) at member 'big/f15'" in message
    assert 0 < peak[0] <= 17 * MIB, peak[0]


def good_members() -> list[M]:
    return [
        M("./", tarfile.DIRTYPE, mode=0o755),
        M("./bin", tarfile.DIRTYPE, mode=0o755),
        M("./bin/busybox", data=b"\x7fELF fake busybox\n", mode=0o755),
        M("./bin/sh", tarfile.SYMTYPE, "busybox", mode=0o777),
        M("./bin/ash", tarfile.SYMTYPE, "/bin/busybox", mode=0o777),
        M("./usr/bin/suidtool", data=b"#!/bin/sh\necho suid\n", mode=0o4755, uid=1234,
          gid=1234),
        M("./usr/bin/suidlink", tarfile.LNKTYPE, "./usr/bin/suidtool"),
        M("./usr/bin/sgid", data=b"x", mode=0o2711, uid=65535, gid=42),
        M("./run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8),
        M("./shared", tarfile.DIRTYPE, mode=0o1777),
        M("./home/u", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000),
        M("./home/u/.profile", data=b"export A=1\n", mode=0o600, uid=1000, gid=1000),
    ]


def check_good_image(image: str) -> None:
    assert debugfs_owner_mode(image, "/usr/bin/suidtool") == (1234, 1234, 0o4755)
    assert "Links: 2" in debugfs_stat(image, "/usr/bin/suidtool")
    assert debugfs_owner_mode(image, "/usr/bin/sgid") == (65535, 42, 0o2711)
    assert debugfs_owner_mode(image, "/run/fifo") == (7, 8, 0o620)
    assert "Type: FIFO" in debugfs_stat(image, "/run/fifo")
    assert debugfs_owner_mode(image, "/shared") == (0, 0, 0o1777)
    assert debugfs_owner_mode(image, "/home/u") == (1000, 1000, 0o700)
    assert debugfs_owner_mode(image, "/home/u/.profile") == (1000, 1000, 0o600)
    assert debugfs_owner_mode(image, "/usr") == (0, 0, 0o755)  # implied directories
    assert debugfs_owner_mode(image, "/") == (0, 0, 0o755)
    sh = debugfs_stat(image, "/bin/sh")
    assert "Type: symlink" in sh and 'Fast link dest: "busybox"' in sh
    assert 'Fast link dest: "/bin/busybox"' in debugfs_stat(image, "/bin/ash")


@pytest.mark.timeout(180)
def test_gatewayd_imports_a_good_tarball_with_owners_and_modes(
        gatewayd: Daemon, tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "good.tar.gz", good_members(), "gz")
    out = gatewayd.ctl("volume", "import", "good", "--tarball", str(tar), "--size", "32M",
                       "--label", "rootfs", "--json", check=True).stdout.strip().splitlines()
    progress = [json.loads(line)["progress"] for line in out]
    assert progress == sorted(progress) and progress[-1] == 100.0
    vol = json.loads(out[-1])["result"]
    assert vol["origin"] == "import" and vol["lineage"]["params"]["members"] == 11
    image = vol["path"]
    check_good_image(image)
    assert os.stat(image).st_uid == 0 and os.stat(image).st_mode & 0o777 == 0o600
    assert "rootfs" in subprocess.run(["e2label", image], capture_output=True, text=True,
                                      check=True).stdout
    subprocess.run(["e2fsck", "-fn", image], check=True, capture_output=True)
    assert [p for p in leftovers(gatewayd.state_dir) if p.startswith(".")] == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("compression", "fmt", "partitioned"), [
    ("", "raw", False), ("gz", "raw", True), ("xz", "qcow2", False), ("bz2", "raw", False),
    ("zst", "qcow2", True),
])
def test_build_import_every_compression_and_layout(
        tmp_path: Path, compression: str, fmt: str, partitioned: bool) -> None:
    suffix = f".tar.{compression}" if compression else ".tar"
    tar = make_tar(tmp_path / f"good{suffix}", good_members(), compression)
    state = state_of(tmp_path)
    seen: list[float] = []
    vol = import_direct(state, tar, 32 * MIB, fmt, partitioned=partitioned,
                        progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 100.0
    image = vol.path
    if fmt == "qcow2":
        image = str(tmp_path / "flat.raw")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", vol.path, image],
                       check=True)
    if partitioned:
        image += f"?offset={1 << 20}"
    check_good_image(image)
    assert leftovers(state) == [Path(vol.path).name]


@pytest.mark.timeout(120)
def test_extraction_runs_as_the_mapped_ids_never_root(tmp_path: Path) -> None:
    # The worker's credentials are checked by gatewayd before it may read the tarball, and
    # reported; a sampler also looks at every process working in the scratch directory and
    # at the owners of the files being extracted, as the host sees them.
    members = [M(f"d{i % 20}/f{i}", data=b"x" * 100, uid=i % 3, gid=5) for i in range(4000)]
    tar = make_tar(tmp_path / "slow.tar.gz", members, "gz")
    state = state_of(tmp_path)
    uids: set[int] = set()
    owners: set[int] = set()
    mkfs_uids: set[int] = set()

    def sample() -> None:
        for status in worker_processes(state).values():
            ids = status_ids(status, "Uid")
            if "Name:\tmkfs.ext4" in status:
                mkfs_uids.update(ids)
            else:
                uids.update(ids)
        for tree in state.glob("volumes/.*.work/tree/d1"):
            try:
                with os.scandir(tree) as entries:
                    owners.update(e.stat(follow_symlinks=False).st_uid for e in entries)
            except FileNotFoundError:
                pass  # the import finished and removed its scratch directory

    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    assert import_worker.host_ids(os.getpid())[0] == (0, 0, 0, 0)
    built = import_worker.build_filesystem(tar, scratch, 64 * MIB,
                                           import_worker.Options(64 * MIB))
    assert (built.host_uid, built.host_gid) == (ID_BASE, ID_BASE) and built.members == 4000
    fs = os.stat(scratch / import_worker.FS_FILE)
    assert (fs.st_uid, fs.st_gid, fs.st_mode & 0o777) == (0, 0, 0o600)
    assert debugfs_owner_mode(str(scratch / "fs.raw"), "/d2/f22") == (1, 5, 0o644)

    with Sampler(sample, interval=0.001):
        import_direct(state, tar, 64 * MIB)
    assert ID_BASE in uids, "no worker seen"  # before the id maps it is still host root
    assert mkfs_uids == {ID_BASE}, mkfs_uids
    assert owners and owners <= {ID_BASE, ID_BASE + 1, ID_BASE + 2}, owners


@pytest.mark.timeout(120)
def test_cancel_kills_the_worker_and_leaves_nothing(tmp_path: Path) -> None:
    members = [M(f"d{i % 50}/f{i}", data=b"y" * 10) for i in range(30000)]
    tar = make_tar(tmp_path / "slow.tar.gz", members, "gz")
    state = state_of(tmp_path)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            import_direct(state, tar, 512 * MIB, cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (pids := worker_processes(state)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pids, "the worker never started"
    cancel.set()
    thread.join(30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and "cancelled" in str(outcome[0])
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert leftovers(state) == [] and worker_processes(state) == {}


@pytest.mark.timeout(60)
def test_tarball_must_be_a_regular_file(tmp_path: Path) -> None:
    state = state_of(tmp_path)
    real = make_tar(tmp_path / "real.tar", [M("f", data=b"x")])
    link = tmp_path / "link.tar"
    link.symlink_to(real)
    with pytest.raises(InvalidArgument, match="cannot open the tarball"):
        import_direct(state, link)
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        import_direct(state, fifo)
    with pytest.raises(InvalidArgument, match="not a tarball"):
        import_direct(state, tmp_path / "x.zip")
    assert leftovers(state) == []


@pytest.mark.timeout(60)
def test_corrupt_archives_are_format_errors(tmp_path: Path) -> None:
    state = state_of(tmp_path)
    good = make_tar(tmp_path / "good.tar.gz", [M("f", size=4 * MIB, source=zeros(4 * MIB))],
                    "gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:2000])
    assert "corrupt tarball" in refused_direct(state, cut)
    garbage = tmp_path / "garbage.tar.zst"
    garbage.write_bytes(b"not zstd at all" * 100)
    assert "cannot decompress the tarball" in refused_direct(state, garbage)
    empty = tmp_path / "empty.tar.xz"
    empty.write_bytes(b"")
    assert "cannot read the tarball" in refused_direct(state, empty)


@pytest.mark.timeout(120)
def test_a_huge_pax_header_is_refused_without_exhausting_memory(tmp_path: Path) -> None:
    # tarfile reads a PAX header into memory before any member can be checked: the worker's
    # address space is capped while it parses the archive, so 1.5 GiB of header fails cleanly.
    size = 1536 * MIB
    tar = tmp_path / "pax.tar.gz"
    with tarfile.open(tar, "w:gz", compresslevel=1) as out:
        header = M("PaxHeader", size=size, source=zeros(size))
        info = header.info()
        info.type = tarfile.XHDTYPE
        out.addfile(info, header.fileobj())
        out.addfile(M("f").info(), io.BytesIO(b""))
    state = state_of(tmp_path)
    assert "out of memory" in refused_direct(state, tar)


@pytest.mark.timeout(60)
def test_no_user_namespace_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    # unshare(CLONE_NEWUSER) fails with EINVAL in a multi-threaded process: run the worker's
    # entry point here while a second thread is alive, so it cannot make its namespace (and
    # this process stays where it is). It reports one clear line and does not fall back.
    hold = threading.Event()
    other = threading.Thread(target=hold.wait)
    other.start()
    control_r, control_w = os.pipe()
    try:
        code = import_worker.main(["--control", str(control_r), "--max-bytes", str(16 * MIB)])
    finally:
        hold.set()
        other.join()
        os.close(control_r)
        os.close(control_w)
    assert code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in lines] == [{
        "error": "cannot make a user namespace for the import: Invalid argument",
        "code": "command-failed"}]
