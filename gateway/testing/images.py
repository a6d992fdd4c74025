"""Builders for the disk images the tests boot and probe.

Everything is made from Debian tools on the host (busybox-static, mkfs, sfdisk, qemu-img) into a
directory the caller owns; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gateway import command
from gateway.cli.demo import busybox_tree

MARKER = "storage-gateway marker\n"
MIB = 1024 * 1024


def run(*argv: str | os.PathLike[str], stdin: bytes | None = None) -> None:
    command.run(argv, input=stdin, timeout=600.0)


def build_rootfs_tree(root: Path) -> Path:
    """A minimal busybox rootfs with /etc/marker (the demo's builder, with the tests' marker)."""
    return busybox_tree(root, marker=MARKER, hostname="gateway-test")


def make_fs_image(path: Path, size: int, tree: Path | None, fs: str = "ext4",
                  label: str = "rootfs") -> Path:
    """A filesystem image of `size` bytes filled from `tree` (ext2/3/4 only take a tree)."""
    with open(path, "wb") as f:
        f.truncate(size)
    if fs in ("ext2", "ext3", "ext4"):
        argv: list[str] = ["mkfs." + fs, "-q", "-F", "-L", label]
        if tree is not None:
            argv += ["-d", str(tree)]
        run(*argv, path)
    elif fs == "xfs":
        run("mkfs.xfs", "-q", "-f", "-L", label, path)
    elif fs == "btrfs":
        run("mkfs.btrfs", "-q", "-f", "-L", label, path)
    elif fs == "vfat":
        run("mkfs.vfat", "-n", label.upper()[:11], path)
    elif fs == "swap":
        run("mkswap", "-L", label, path)
    else:
        raise ValueError(f"unknown fs {fs}")
    return path


@dataclass(frozen=True)
class Layout:
    """A partition table description for sfdisk."""

    table: str  # "none", "mbr" or "gpt"
    start_mib: int = 1


def make_disk(path: Path, fs_image: Path, table: str, start_mib: int = 1,
              tail_mib: int = 1) -> Path:
    """A disk with `fs_image` as its first partition (or as the whole disk when table='none')."""
    fs_size = fs_image.stat().st_size
    if table == "none":
        shutil.copyfile(fs_image, path)
        return path
    total = start_mib * MIB + fs_size + tail_mib * MIB
    with open(path, "wb") as f:
        f.truncate(total)
    sectors = fs_size // 512
    start = start_mib * MIB // 512
    if table == "mbr":
        script = f"label: dos\nstart={start}, size={sectors}, type=83\n"
    elif table == "gpt":
        script = (f"label: gpt\nstart={start}, size={sectors}, "
                  "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    else:
        raise ValueError(f"unknown table {table}")
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, stdin=script.encode())
    run("dd", f"if={fs_image}", f"of={path}", "bs=1M", f"seek={start_mib}", "conv=notrunc,sparse",
        "status=none")
    return path


def to_qcow2(raw: Path, out: Path) -> Path:
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


@dataclass(frozen=True)
class ImageSet:
    """The standard images: busybox ext4 rootfs, whole disk and partitioned, raw and qcow2."""

    root: Path
    tree: Path

    def path(self, table: str, fmt: str) -> Path:
        return self.root / f"{table}.{fmt}"


def build_image_set(root: Path, fs_size: int = 64 * MIB) -> ImageSet:
    root.mkdir(parents=True, exist_ok=True)
    tree = build_rootfs_tree(root / "tree")
    fs = make_fs_image(root / "rootfs.ext4", fs_size, tree)
    for table in ("none", "mbr", "gpt"):
        raw = make_disk(root / f"{table}.raw", fs, table)
        to_qcow2(raw, root / f"{table}.qcow2")
    return ImageSet(root=root, tree=tree)


def copy_image(src: Path, dst: Path) -> Path:
    """A private copy (sparse where possible) that a test may write."""
    run("cp", "--sparse=always", src, dst)
    return dst
