"""Hostile input through the daemon: each gets a one-line error, the catalog stays as it was, and a
mounted volume keeps serving. Header-level and probe-level unit coverage lives in test_inspect.py
and test_probe*.py; the admin-socket peer checks in test_access.py; here it all goes through
gatewayctl or raw protocol requests against a real gatewayd.

Path audit ("nothing in the protocol can name a path outside the allowed roots"): the only op that
takes a filesystem path is volume-add (`path`). Every other op takes a volume name, which
volumes.check_name limits to [a-z0-9._-] (no "/", not "." or ".."), and the run-dir paths built
from it (RUN_DIR/blk/NAME, RUN_DIR/rootfs/NAME) are re-checked in attachment._layout. The domain
and lifecycle ops also take only names.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import errors
from gateway.admin.client import Client
from gateway.testing.daemon import CtlResult, Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image

pytestmark = pytest.mark.timeout(180)
MIB = 1024 * 1024


def one_line_error(proc: CtlResult) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def catalog_snapshot(daemon: Daemon) -> Any:
    return json.loads(daemon.ctl("volume", "ls", "--json", check=True).stdout)


@pytest.fixture
def served(tmp_path: Path, image_set: ImageSet) -> Iterator[tuple[Daemon, Path]]:
    """A gatewayd with allowed roots = tmp_path/images and one mounted volume `good`."""
    images = tmp_path / "images"
    images.mkdir()
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log",
                    extra_args=["--libvirt-uri", "", "--allowed-roots", str(images)])
    good = copy_image(image_set.path("gpt", "qcow2"), images / "good.qcow2")
    daemon.start()
    try:
        daemon.ctl("volume", "add", "good", str(good), "--format", "qcow2", check=True)
        daemon.ctl("mount", "good", check=True)
        yield daemon, images
        assert (daemon.run_dir / "rootfs" / "good" / "etc" / "marker").read_text() == MARKER
        assert daemon.ctl("status", "--json", check=True).stdout.count('"healthy": true') == 1
        daemon.ctl("umount", "good", check=True)
    finally:
        daemon.stop()
        assert daemon.cleanup() == []


def still_serving(daemon: Daemon) -> None:
    assert (daemon.run_dir / "rootfs" / "good" / "etc" / "marker").read_text() == MARKER


def test_hostile_images_are_refused_at_volume_add(served: tuple[Daemon, Path],
                                                  image_set: ImageSet) -> None:
    daemon, images = served
    plain = copy_image(image_set.path("none", "qcow2"), images / "plain.qcow2")
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, path: Path, expected: str) -> None:
        cases[name] = (path, expected)

    for keep, expected in ((50, "truncated qcow2"), (200, "qcow2 header extension")):
        cut = images / f"cut{keep}.qcow2"
        cut.write_bytes(plain.read_bytes()[:keep])
        case(f"truncated-{keep}", cut, expected)
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(plain),
             str(images / "backing.qcow2"))
    case("backing", images / "backing.qcow2", "names a backing file")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={images / 'data.raw'}",
             str(images / "datafile.qcow2"), "16M")
    case("data-file", images / "datafile.qcow2", "external data file")
    qemu_img("create", "-f", "qcow2", "--object", "secret,id=s0,data=123456", "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", str(images / "enc.qcow2"), "16M")
    case("encrypted", images / "enc.qcow2", "encrypt")
    bits = copy_image(plain, images / "bits.qcow2")
    poke(bits, 72, struct.pack(">Q", 1 << 40))
    case("incompatible-bits", bits, "unknown incompatible feature bits")
    l1 = copy_image(plain, images / "l1.qcow2")
    poke(l1, 40, struct.pack(">Q", 1 << 40))
    case("l1-past-end", l1, "L1 table lies outside the file")
    zero = images / "zero.raw"
    zero.touch()
    case("zero-length", zero, "empty")
    os.mkfifo(images / "fifo")
    case("fifo", images / "fifo", "not a regular file or block device")
    os.mknod(images / "null", 0o600 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
    case("char-device-in-root", images / "null", "not a regular file or block device")
    case("dev-null", Path("/dev/null"), "outside the allowed image roots")
    (images / "to-dev-null").symlink_to("/dev/null")
    case("symlink-to-dev-null", images / "to-dev-null", "outside the allowed image roots")
    (images / "escape.raw").symlink_to(image_set.path("none", "raw"))
    case("symlink-out-of-root", images / "escape.raw", "outside the allowed image roots")
    (images / "loop-a").symlink_to(images / "loop-b")
    (images / "loop-b").symlink_to(images / "loop-a")
    case("symlink-loop", images / "loop-a", "Too many levels of symbolic links")

    before = catalog_snapshot(daemon)
    for name, (path, expected) in cases.items():
        fmt = "raw" if name in ("zero-length", "fifo", "char-device-in-root", "dev-null",
                                "symlink-to-dev-null", "symlink-loop") else "qcow2"
        line = one_line_error(daemon.ctl("volume", "add", name, str(path), "--format", fmt,
                                         timeout=30))
        assert line.startswith("gatewayctl: ") and expected in line, (name, line)
        still_serving(daemon)
    assert catalog_snapshot(daemon) == before


def ebr_loop_disk(path: Path) -> Path:
    """An MBR disk whose extended partition's second EBR links to itself."""
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    ext = 2048
    mbr = bytearray(512)
    struct.pack_into("<BBBBBBBBII", mbr, 446, 0, 0, 0, 0, 0x05, 0, 0, 0, ext, 60000)
    mbr[510:512] = b"\x55\xaa"
    ebr1 = bytearray(512)
    struct.pack_into("<BBBBBBBBII", ebr1, 446, 0, 0, 0, 0, 0x83, 0, 0, 0, 63, 1000)
    struct.pack_into("<BBBBBBBBII", ebr1, 462, 0, 0, 0, 0, 0x05, 0, 0, 0, 2048, 2000)
    ebr1[510:512] = b"\x55\xaa"
    ebr2 = bytearray(ebr1)
    struct.pack_into("<BBBBBBBBII", ebr2, 462, 0, 0, 0, 0, 0x05, 0, 0, 0, 2048, 2000)  # itself
    poke(path, 0, bytes(mbr))
    poke(path, ext * 512, bytes(ebr1))
    poke(path, (ext + 2048) * 512, bytes(ebr2))
    return path


def gpt_num_entries(path: Path, header_off: int, entries: int) -> None:
    with open(path, "r+b") as f:
        f.seek(header_off)
        hdr = bytearray(f.read(92))
        struct.pack_into("<I", hdr, 80, entries)
        struct.pack_into("<I", hdr, 16, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
        f.seek(header_off)
        f.write(hdr)


def test_hostile_partition_tables_fail_mount_with_a_probe_error(
        served: tuple[Daemon, Path], image_set: ImageSet) -> None:
    daemon, images = served
    disks: dict[str, tuple[Path, str]] = {}
    both = copy_image(image_set.path("gpt", "raw"), images / "gpt-both-bad.raw")
    poke(both, 512 + 40, b"\xff")
    poke(both, both.stat().st_size - 512 + 40, b"\xff")
    disks["gpt-both-bad"] = (both, "neither the primary nor the backup")
    absurd = copy_image(image_set.path("gpt", "raw"), images / "gpt-absurd.raw")
    gpt_num_entries(absurd, 512, 1 << 31)
    disks["gpt-absurd"] = (absurd, "2147483648 entries")
    short = copy_image(image_set.path("mbr", "raw"), images / "mbr-short.raw")
    os.truncate(short, 6 * MIB)
    disks["mbr-past-end"] = (short, "runs past the end of the disk")
    disks["mbr-ebr-loop"] = (ebr_loop_disk(images / "ebr-loop.raw"), "EBR chain loops")
    zeros = images / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(8 * MIB)
    disks["no-filesystem"] = (zeros, "no filesystem found")

    for name, (path, _) in disks.items():
        daemon.ctl("volume", "add", name, str(path), "--format", "raw", check=True)
    before = catalog_snapshot(daemon)
    for name, (_, expected) in disks.items():
        for mode in ("bind", "fuse"):
            line = one_line_error(daemon.ctl("mount", name, "--mode", mode, timeout=60))
            assert expected in line, (name, mode, line)
            still_serving(daemon)
    assert catalog_snapshot(daemon) == before  # no attachment, no export, no pinned fstype
    status = json.loads(daemon.ctl("status", "--json", check=True).stdout)
    assert status["mounts"] == 1 and status["exports"] == 1
    found = daemon.leftovers()
    assert sum(1 for x in found if x.startswith("loop ")) == 1  # good's own loop device
    leaks = [x for x in found if "/good" not in x and not x.startswith("loop ") and not x.endswith(
        ("/run/blk", "/run/rootfs")) and "qemu-storage-daemon" not in x
             and "bin/gatewayd " not in x and "gateway.dataplane" not in x]
    assert leaks == []


def raw_request(daemon: Daemon, op: str, args: Any) -> errors.GatewayError:
    with Client(daemon.socket, timeout=30) as client, pytest.raises(errors.GatewayError) as info:
        client.call(op, args)
    return info.value


def test_no_request_can_name_a_path_outside_the_roots(served: tuple[Daemon, Path],
                                                      image_set: ImageSet,
                                                      tmp_path: Path) -> None:
    daemon, images = served
    outside = image_set.path("none", "raw")
    inside = copy_image(image_set.path("none", "raw"), images / "in.raw")
    (images / "sub").mkdir()
    (images / "sub" / "up").symlink_to("..")
    (images / "dirlink").symlink_to(outside.parent)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "x.raw").symlink_to(outside)
    (images / "via-evil").symlink_to(tmp_path / "evil")
    fd = os.open(outside, os.O_RDONLY)
    try:
        hostile_paths: list[Any] = [
            str(outside), f"{images}/../{outside.name}", f"{images}/sub/up/../{outside.name}",
            f"{images}/dirlink/{outside.name}", f"{images}/via-evil/x.raw",
            f"/proc/self/root{outside}", f"/proc/{os.getpid()}/fd/{fd}", "/proc/self/fd/0",
            f"/proc/self/cwd/{outside.name}", f"{images}//..//{outside.name}",
            "/", "/etc/shadow", "/dev/sda", f"{images}\0/../../etc/passwd", "relative.raw",
            f"..{images}", "", None, 7, [str(inside)], {"path": str(inside)}, True,
            "/" + "a" * 5000,
        ]
        before = catalog_snapshot(daemon)
        for i, path in enumerate(hostile_paths):
            err = raw_request(daemon, "volume-add", {"name": f"h{i}", "path": path,
                                                     "format": "raw"})
            assert err.code in ("permission-denied", "invalid-argument", "not-found"), (path, err)
            assert "\n" not in err.message
        for name in ("../good", "good/../good", "/etc", "..", ".", "a/b", "x\0", "", None, 3,
                     "../../" + str(outside), "A", "-x", "good ", "x" * 64):
            for op in ("volume-add", "volume-show", "volume-remove", "export", "unexport",
                       "probe", "mount", "umount"):
                err = raw_request(daemon, op, {"name": name, "path": str(inside),
                                               "format": "raw", "mode": "bind"})
                assert err.code == "invalid-argument", (op, name, err)
        assert raw_request(daemon, "mount", {"name": "good", "mode": "../x"}).code in (
            "invalid-argument",)
        assert catalog_snapshot(daemon) == before
        # the one path that is fine still works through a symlink that stays inside the root
        (images / "alias.raw").symlink_to(inside)
        with Client(daemon.socket) as client:
            added = client.call("volume-add", {"name": "alias", "path": str(images / "alias.raw"),
                                               "format": "raw"})
            assert added["path"] == str(inside)
            client.call("volume-remove", {"name": "alias"})
        still_serving(daemon)
    finally:
        os.close(fd)


def test_malformed_requests_get_bad_request(served: tuple[Daemon, Path]) -> None:
    daemon, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        for line in (b"not json", b"[]", b'{"op":"status"}', b'{"id":true,"op":"status"}',
                     b'{"id":1}', b'{"id":1,"op":"status","args":[]}', b"\xff\xfe",
                     b'{"id":1,"op":"no-such-op"}'):
            sock.sendall(line + b"\n")
            reply = json.loads(sock.makefile("rb").readline())
            assert reply["ok"] is False
            assert reply["error"]["code"] in ("bad-request", "invalid-argument")
    still_serving(daemon)


def test_deeply_nested_request_does_not_kill_the_daemon(tmp_path: Path) -> None:
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""])
    daemon.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(daemon.socket))
            sock.sendall(b"[" * 100_000 + b"\n")
            reply = sock.makefile("rb").readline()
        assert daemon.proc is not None and daemon.proc.poll() is None, "gatewayd died"
        assert json.loads(reply)["error"]["code"] == "bad-request"
        assert daemon.ctl("status").returncode == 0
    finally:
        if daemon.proc is not None:
            try:
                daemon.proc.wait(5)  # a crash may still be under way
            except subprocess.TimeoutExpired:
                pass
        if daemon.proc is not None and daemon.proc.poll() is not None:
            daemon.proc = None
            daemon.start()  # a successor reconciles what the crashed one left (QSD, mounts)
        daemon.stop()
        assert daemon.cleanup() == []
