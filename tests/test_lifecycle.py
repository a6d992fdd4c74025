"""Volume lifecycle end to end: overlays, copies, blank filesystems, tarball imports.

A real gatewayd, real qemu-img / qemu-storage-daemon / mkfs / sfdisk, real mounts through the
gateway, driven through the real gatewayctl.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from gateway.testing.daemon import CtlResult, Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image

pytestmark = pytest.mark.timeout(180)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def one_line_error(proc: CtlResult) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def show(daemon: Daemon, name: str) -> dict[str, object]:
    value = json.loads(daemon.ctl("volume", "show", name, "--json", check=True).stdout)
    assert isinstance(value, dict)
    return value


def created(daemon: Daemon, *args: str) -> dict[str, object]:
    """Run `volume create/import ... --json` and return the final JSON line's volume."""
    out = daemon.ctl("volume", *args, "--json", check=True).stdout.strip().splitlines()
    final = json.loads(out[-1])
    assert final["state"] == "done" and final["progress"] == 100.0
    for line in out[:-1]:
        assert 0.0 <= json.loads(line)["progress"] <= 100.0
    result = final["result"]
    assert isinstance(result, dict)
    return result


def rootfs_of(daemon: Daemon, name: str, mode: str = "bind") -> Path:
    out = json.loads(daemon.ctl("mount", name, "--mode", mode, "--json", check=True).stdout)
    return Path(out["rootfs"])


def volume_files(daemon: Daemon) -> list[str]:
    vdir = daemon.state_dir / "volumes"
    return sorted(p.name for p in vdir.iterdir()) if vdir.exists() else []


def test_overlays_diverge_and_leave_the_base_unchanged(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    base_path = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "base.qcow2")
    before = sha256(base_path)
    gatewayd.ctl("volume", "add", "base", str(base_path), "--format", "qcow2", check=True)
    for name in ("ov1", "ov2"):
        out = json.loads(gatewayd.ctl("volume", "create", name, "--from", "base", "--overlay",
                                      "--json", check=True).stdout)
        vol = out["result"]
        assert vol["origin"] == "overlay" and vol["base"] == "base"
        assert vol["format"] == "qcow2"
        assert Path(vol["path"]).parent == gatewayd.state_dir / "volumes"
        assert vol["lineage"]["layers"] == [{"name": "base", "path": str(base_path),
                                             "format": "qcow2"}]
    base = show(gatewayd, "base")
    assert base["read_only"] is True and base["overlays"] == ["ov1", "ov2"]

    root1 = rootfs_of(gatewayd, "ov1")
    assert (root1 / "etc" / "marker").read_text() == MARKER
    (root1 / "etc" / "only-in-ov1").write_text("one\n")
    (root1 / "etc" / "marker").write_text("changed in ov1\n")
    gatewayd.ctl("umount", "ov1", check=True)
    root2 = rootfs_of(gatewayd, "ov2")
    assert (root2 / "etc" / "marker").read_text() == MARKER
    assert not (root2 / "etc" / "only-in-ov1").exists()
    (root2 / "etc" / "only-in-ov2").write_text("two\n")
    gatewayd.ctl("umount", "ov2", check=True)

    # The base itself still mounts (read-only) next to an overlay; nothing changed in it.
    root_base = rootfs_of(gatewayd, "base")
    assert (root_base / "etc" / "marker").read_text() == MARKER
    assert not (root_base / "etc" / "only-in-ov2").exists()
    root1 = rootfs_of(gatewayd, "ov1")
    assert (root1 / "etc" / "only-in-ov1").read_text() == "one\n"
    assert not (root1 / "etc" / "only-in-ov2").exists()
    gatewayd.ctl("umount", "ov1", check=True)
    gatewayd.ctl("umount", "base", check=True)
    gatewayd.ctl("unexport", "base", check=True)
    assert sha256(base_path) == before

    # Removing a base in use is refused; a restart keeps the recorded lineage.
    assert "base of overlays ov1, ov2" in one_line_error(gatewayd.ctl("volume", "rm", "base"))
    gatewayd.stop()
    gatewayd.start()
    again = show(gatewayd, "ov2")
    assert again["origin"] == "overlay" and again["base"] == "base"
    root2 = rootfs_of(gatewayd, "ov2")
    assert (root2 / "etc" / "only-in-ov2").read_text() == "two\n"
    gatewayd.ctl("umount", "ov2", check=True)

    gatewayd.ctl("volume", "rm", "ov1", check=True)
    assert show(gatewayd, "base")["read_only"] is True
    gatewayd.ctl("volume", "rm", "ov2", check=True)
    assert show(gatewayd, "base")["read_only"] is False  # writable again once no overlay is left
    gatewayd.ctl("volume", "rm", "base", check=True)
    assert sha256(base_path) == before


def test_overlay_refusals_leave_nothing_behind(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    base_path = copy_image(image_set.path("none", "raw"), tmp_path / "base.raw")
    gatewayd.ctl("volume", "add", "base", str(base_path), "--format", "raw", check=True)
    gatewayd.ctl("export", "base", check=True)  # writable
    err = one_line_error(gatewayd.ctl("volume", "create", "ov", "--from", "base", "--overlay"))
    assert "exported or mounted writable" in err
    gatewayd.ctl("unexport", "base", check=True)
    assert "no volume named ghost" in one_line_error(
        gatewayd.ctl("volume", "create", "ov", "--from", "ghost", "--overlay"))
    assert "made from itself" in one_line_error(
        gatewayd.ctl("volume", "create", "base", "--from", "base", "--overlay"))
    gatewayd.ctl("volume", "add", "other", str(image_set.path("none", "qcow2")), "--format",
                 "qcow2", "--read-only", check=True)
    assert "already exists" in one_line_error(
        gatewayd.ctl("volume", "create", "other", "--from", "base", "--overlay"))
    gatewayd.ctl("volume", "rm", "other", check=True)
    assert "exactly one of" in one_line_error(
        gatewayd.ctl("volume", "create", "ov", "--from", "base"))
    assert "invalid volume name" in one_line_error(
        gatewayd.ctl("volume", "create", "Bad/Name", "--from", "base", "--overlay"))
    assert [v["name"] for v in json.loads(gatewayd.ctl("volume", "ls", "--json").stdout)] == [
        "base"]
    assert volume_files(gatewayd) == []
    assert show(gatewayd, "base")["read_only"] is False

    # An overlay over a raw base: explicit raw node under the qcow2 node; the overlay's file
    # itself is still refused by `volume add` (it names a backing file).
    ov = created(gatewayd, "create", "ov", "--from", "base", "--overlay")
    assert ov["lineage"]["layers"][0]["format"] == "raw"  # type: ignore[index]
    err = one_line_error(gatewayd.ctl("volume", "add", "sneaky", str(ov["path"]),
                                      "--format", "qcow2"))
    assert "gateway's own directories" in err  # refused before its header is read
    outside = shutil.copy(str(ov["path"]), tmp_path / "ov-copy.qcow2")
    err = one_line_error(gatewayd.ctl("volume", "add", "sneaky", str(outside),
                                      "--format", "qcow2"))
    assert "backing" in err
    gatewayd.ctl("export", "base", check=True)
    assert show(gatewayd, "base")["uri"]
    root = rootfs_of(gatewayd, "ov")
    assert (root / "etc" / "marker").read_text() == MARKER
    gatewayd.ctl("umount", "ov", check=True)
    gatewayd.ctl("unexport", "base", check=True)


def test_copy_flattens_an_overlay_with_progress(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    base_path = copy_image(image_set.path("mbr", "raw"), tmp_path / "base.raw")
    gatewayd.ctl("volume", "add", "base", str(base_path), "--format", "raw", check=True)
    created(gatewayd, "create", "ov", "--from", "base", "--overlay")
    root = rootfs_of(gatewayd, "ov")
    (root / "etc" / "note").write_text("in the overlay\n")
    gatewayd.ctl("umount", "ov", check=True)

    copy = created(gatewayd, "create", "cp", "--from", "ov", "--copy", "--format", "raw")
    assert copy["origin"] == "copy" and copy["base"] is None and copy["format"] == "raw"
    assert [layer["name"] for layer in copy["lineage"]["layers"]] == ["ov", "base"]  # type: ignore[index]
    gatewayd.ctl("volume", "rm", "ov", check=True)
    gatewayd.ctl("volume", "rm", "base", check=True)  # the copy does not depend on them
    root = rootfs_of(gatewayd, "cp")
    assert (root / "etc" / "note").read_text() == "in the overlay\n"
    assert (root / "etc" / "marker").read_text() == MARKER
    gatewayd.ctl("umount", "cp", check=True)

    q = created(gatewayd, "create", "cq", "--from", "cp", "--copy", "--format", "qcow2")
    assert q["format"] == "qcow2" and q["virtual_size"] == copy["virtual_size"]
    human = gatewayd.ctl("volume", "create", "cr", "--from", "cp", "--copy", check=True).stdout
    assert human.startswith("created cr (copy, raw,")


@pytest.mark.parametrize(("fmt", "fs", "partitioned", "size"), [
    ("raw", "ext4", False, "64M"),
    ("qcow2", "ext4", True, "96M"),
    ("qcow2", "xfs", True, "320M"),
])
def test_blank_filesystem_volumes_probe_and_mount(
        gatewayd: Daemon, fmt: str, fs: str, partitioned: bool, size: str) -> None:
    args = ["create", "eph", "--size", size, "--format", fmt, "--mkfs", fs, "--label", "scratch"]
    vol = created(gatewayd, *args, *(["--partitioned"] if partitioned else []))
    assert vol["origin"] == "blank" and vol["format"] == fmt
    assert vol["virtual_size"] == int(size[:-1]) << 20
    assert vol["lineage"]["params"]["mkfs"] == fs  # type: ignore[index]
    gatewayd.ctl("export", "eph", check=True)
    probe = json.loads(gatewayd.ctl("probe", "eph", "--json", check=True).stdout)
    assert probe["table"] == ("gpt" if partitioned else "none")
    assert probe["rootfs"]["fs"] == fs
    if partitioned:
        assert probe["rootfs"]["start"] == 1 << 20
    root = rootfs_of(gatewayd, "eph")
    (root / "hello").write_text("hi\n")
    gatewayd.ctl("umount", "eph", check=True)
    root = rootfs_of(gatewayd, "eph")
    assert (root / "hello").read_text() == "hi\n"
    gatewayd.ctl("umount", "eph", check=True)
    gatewayd.ctl("unexport", "eph", check=True)
    assert show(gatewayd, "eph")["fstype"] == fs


def test_blank_refusals(gatewayd: Daemon) -> None:
    for args, expected in [
        (["--size", "64M", "--format", "vmdk", "--mkfs", "ext4"], "invalid choice"),
        (["--size", "64M", "--format", "raw", "--mkfs", "xfs"], "at least 302 MiB"),
        (["--size", "12345", "--format", "raw", "--mkfs", "ext4"], "multiple of 1 MiB"),
        (["--size", "lots", "--format", "raw", "--mkfs", "ext4"], "invalid size"),
        (["--size", "64M", "--format", "raw", "--mkfs", "ext4", "--label", "x" * 20],
         "invalid label"),
    ]:
        assert expected in one_line_error(gatewayd.ctl("volume", "create", "b", *args))
    assert json.loads(gatewayd.ctl("volume", "ls", "--json").stdout) == []
    assert volume_files(gatewayd) == []


def rootfs_tarball(tmp_path: Path, image_set: ImageSet, compression: str) -> Path:
    """The busybox tree plus a setuid file owned by 1000:1000 and a sticky 1777 directory."""
    suffix = {"gz": ".tar.gz", "xz": ".tar.xz", "zst": ".tar.zst", "": ".tar"}[compression]
    plain = tmp_path / "rootfs.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(image_set.tree, arcname=".")
        data = b"#!/bin/sh\necho suid\n"
        info = tarfile.TarInfo("./usr/bin/suidtool")
        info.size, info.mode, info.uid, info.gid = len(data), 0o4755, 1000, 1000
        import io
        tar.addfile(info, io.BytesIO(data))
        sticky = tarfile.TarInfo("./shared")
        sticky.type, sticky.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(sticky)
    if compression == "":
        return plain
    out = tmp_path / f"rootfs{suffix}"
    tool = {"gz": ["gzip", "-c"], "xz": ["xz", "-c"], "zst": ["zstd", "-q", "-c"]}[compression]
    with open(out, "wb") as f:
        subprocess.run([*tool, str(plain)], stdout=f, check=True)
    plain.unlink()
    return out


@pytest.mark.parametrize(("compression", "fmt"), [("gz", "raw"), ("zst", "qcow2")])
def test_import_tarball_keeps_owners_and_modes(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path, compression: str,
        fmt: str) -> None:
    tar = rootfs_tarball(tmp_path, image_set, compression)
    vol = created(gatewayd, "import", "imp", "--tarball", str(tar), "--size", "64M",
                  "--format", fmt)
    assert vol["origin"] == "import" and vol["lineage"]["source"] == str(tar)  # type: ignore[index]
    root = rootfs_of(gatewayd, "imp")
    assert (root / "etc" / "marker").read_text() == MARKER
    st = os.lstat(root / "usr" / "bin" / "suidtool")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o4755)
    assert os.lstat(root / "shared").st_mode & 0o7777 == 0o1777
    assert os.readlink(root / "bin" / "sh") == "busybox"
    gatewayd.ctl("umount", "imp", check=True)
    assert not [p for p in volume_files(gatewayd) if p.startswith(".")]


def test_import_refuses_unsafe_tarballs(gatewayd: Daemon, tmp_path: Path) -> None:
    import io
    cases = {
        "abs": [("/etc/evil", tarfile.REGTYPE, "")],
        "dotdot": [("a/../../evil", tarfile.REGTYPE, "")],
        "through-link": [("etc", tarfile.SYMTYPE, "/etc"), ("etc/evil", tarfile.REGTYPE, "")],
        "device": [("dev/sda", tarfile.BLKTYPE, "")],
        "hardlink-out": [("x", tarfile.LNKTYPE, "/etc/shadow")],
    }
    for label, members in cases.items():
        path = tmp_path / f"{label}.tar"
        with tarfile.open(path, "w") as tar:
            for name, kind, link in members:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, link
                tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        proc = gatewayd.ctl("volume", "import", "bad", "--tarball", str(path), "--size", "32M")
        assert "tarball member" in one_line_error(proc), label
    assert "not a tarball" in one_line_error(gatewayd.ctl(
        "volume", "import", "bad", "--tarball", "/etc/hostname", "--size", "32M"))
    assert json.loads(gatewayd.ctl("volume", "ls", "--json").stdout) == []
    assert volume_files(gatewayd) == []
    assert not Path("/etc/evil").exists()


@pytest.mark.parametrize(("fmt", "table", "fs"), [("raw", "gpt", "ext4"), ("qcow2", "none", "ext4"),
                                                  ("qcow2", "gpt", "xfs")])
def test_resize_grows_image_partition_and_filesystem(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path, fmt: str, table: str,
        fs: str) -> None:
    if fs == "ext4":
        path = copy_image(image_set.path(table, fmt), tmp_path / f"v.{fmt}")
        gatewayd.ctl("volume", "add", "v", str(path), "--format", fmt, check=True)
        old = show(gatewayd, "v")["virtual_size"]
        new = "128M"
    else:
        created(gatewayd, "create", "v", "--size", "320M", "--format", fmt, "--mkfs", "xfs",
                "--partitioned")
        old, new = 320 << 20, "400M"
    root = rootfs_of(gatewayd, "v")
    (root / "keep").write_text("kept\n")
    small = os.statvfs(root)
    gatewayd.ctl("umount", "v", check=True)
    assert "shrinking" in one_line_error(gatewayd.ctl("volume", "resize", "v", "--size", "32M"))
    out = json.loads(gatewayd.ctl("volume", "resize", "v", "--size", new, "--json",
                                  check=True).stdout)
    assert out["virtual_size"] == int(new[:-1]) << 20 > int(str(old))
    assert out["filesystem"] == {"fs": fs, "grown": True, "table": table}
    assert out["exported"] is False and out["attachment"] is None
    root = rootfs_of(gatewayd, "v")
    grown = os.statvfs(root)
    assert grown.f_blocks * grown.f_frsize > small.f_blocks * small.f_frsize
    assert (root / "keep").read_text() == "kept\n"
    gatewayd.ctl("umount", "v", check=True)


def test_resize_refusals(gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    path = copy_image(image_set.path("none", "raw"), tmp_path / "b.raw")
    gatewayd.ctl("volume", "add", "b", str(path), "--format", "raw", check=True)
    size = path.stat().st_size
    rootfs_of(gatewayd, "b", "fuse")
    assert "mounted or exported" in one_line_error(
        gatewayd.ctl("volume", "resize", "b", "--size", "256M"))
    gatewayd.ctl("umount", "b", check=True)
    created(gatewayd, "create", "o", "--from", "b", "--overlay")
    assert "base of overlays" in one_line_error(
        gatewayd.ctl("volume", "resize", "b", "--size", "256M"))
    assert path.stat().st_size == size
