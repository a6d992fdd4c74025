"""Disk images for the probe tests, made with real tools (sfdisk, sgdisk, mkfs.*, cryptsetup,
pvcreate) plus a few deliberate corruptions. Built once per session into a directory; sparse."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway import command

MIB = 1024 * 1024
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
FS_SIZES = {"ext2": 8, "ext3": 8, "ext4": 8, "xfs": 320, "btrfs": 128, "vfat12": 2, "vfat16": 16,
            "vfat32": 40, "squashfs": 0, "swap": 4, "luks1": 8, "luks2": 20, "lvm": 8}


def sh(*argv: str | os.PathLike[str], stdin: bytes | None = None) -> str:
    proc = command.run(argv, input=stdin, timeout=600.0, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return proc.stdout.decode(errors="replace")


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def make_fs(path: Path, kind: str) -> Path:
    """One small filesystem/container image of `kind` (a FS_SIZES key)."""
    size = FS_SIZES[kind] * MIB
    if kind == "squashfs":
        src = path.parent / "squash-src"
        (src / "etc").mkdir(parents=True, exist_ok=True)
        (src / "etc" / "marker").write_text("probe\n")
        sh("mksquashfs", src, path, "-noappend", "-quiet", "-no-progress")
        return path
    _sparse_file(path, size)
    if kind in ("ext2", "ext3", "ext4"):
        sh("mkfs." + kind, "-q", "-F", path)
    elif kind == "xfs":
        sh("mkfs.xfs", "-q", "-f", path)
    elif kind == "btrfs":
        sh("mkfs.btrfs", "-q", "-f", path)
    elif kind.startswith("vfat"):
        sh("mkfs.vfat", "-F", kind[4:], path)
    elif kind == "swap":
        sh("mkswap", path)
    elif kind.startswith("luks"):
        sh("cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
           "--pbkdf-force-iterations", "1000", "--key-file", "-", path, stdin=b"secret")
    elif kind == "lvm":
        loop = sh("losetup", "-f", "--show", path).strip()
        try:
            sh("pvcreate", "-q", loop)
        finally:
            sh("losetup", "-d", loop)
    else:
        raise ValueError(kind)
    return path


def blkid_name(kind: str) -> str:
    return {"luks1": "crypto_LUKS", "luks2": "crypto_LUKS", "lvm": "LVM2_member"}.get(
        kind, "vfat" if kind.startswith("vfat") else kind)


@dataclass
class Case:
    """One image: how it was made and what the rootfs rule must say about it."""

    name: str
    path: Path
    table: str
    sector_size: int = 512
    rootfs: tuple[int, str] | None = None  # (number, fs) when the probe must succeed
    error: str | None = None  # substring of the ProbeError message otherwise
    crosscheck: bool = True  # compare with pyparted / sfdisk / blkid
    notes: list[str] = field(default_factory=list)


class Builder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fs_dir = root / "fs"
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        self._fs: dict[str, Path] = {}
        self.cases: dict[str, Case] = {}

    def fs(self, kind: str) -> Path:
        if kind not in self._fs:
            self._fs[kind] = make_fs(self.fs_dir / f"{kind}.img", kind)
        return self._fs[kind]

    def add_fs(self, kind: str, path: Path) -> Path:
        """A filesystem image made elsewhere, for `disk(fills=...)` to copy under `kind`."""
        self._fs[kind] = path
        return path

    def add(self, case: Case) -> Case:
        self.cases[case.name] = case
        return case

    def disk(self, name: str, size_mib: int, table_cmd: list[str] | str, fills: dict[int, str],
             sector_size: int = 512, **kw: object) -> Case:
        """A disk made by sfdisk (script string) or sgdisk (argv); fills: start MiB -> fs kind."""
        path = self.root / f"{name}.img"
        _sparse_file(path, size_mib * MIB)
        if isinstance(table_cmd, str):
            target, loop = str(path), None
            if sector_size != 512:  # this sfdisk has no --sector-size: use a 4Kn loop device
                loop = target = sh("losetup", "-f", "--show", "-b", str(sector_size),
                                   path).strip()
            try:
                sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", target,
                   stdin=table_cmd.encode())
            finally:
                if loop:
                    sh("losetup", "-d", loop)
        else:
            sh("sgdisk", "-o", *table_cmd, path)
        for start_mib, kind in fills.items():
            sh("dd", f"if={self.fs(kind)}", f"of={path}", "bs=1M", f"seek={start_mib}",
               "conv=notrunc,sparse", "status=none")
        return self.add(Case(name=name, path=path, sector_size=sector_size,
                             **kw))  # type: ignore[arg-type]


def _mbr_script(lines: list[str]) -> str:
    return "label: dos\n" + "".join(line + "\n" for line in lines)


def _s(mib: int) -> int:
    return mib * MIB // 512


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy(src: Path, dst: Path) -> Path:
    sh("cp", "--sparse=always", src, dst)
    return dst


def rewrite_gpt_header(path: Path, header_off: int, **fields: int) -> None:
    """Change num_entries/entry_size in a GPT header and fix its CRC (a well-formed lie)."""
    with open(path, "r+b") as f:
        f.seek(header_off)
        hdr = bytearray(f.read(92))
        if "num_entries" in fields:
            struct.pack_into("<I", hdr, 80, fields["num_entries"])
        struct.pack_into("<I", hdr, 16, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
        f.seek(header_off)
        f.write(hdr)


def ebr_chain(path: Path, ext_start: int) -> list[int]:
    """The sectors of an EBR chain, read the plain way (test helper, no loop protection needed)."""
    out: list[int] = []
    with open(path, "rb") as f:
        ebr = ext_start
        while len(out) < 64:
            out.append(ebr)
            f.seek(ebr * 512 + 446 + 16)
            entry = f.read(16)
            link = struct.unpack_from("<I", entry, 8)[0]
            if entry[4] not in (0x05, 0x0F, 0x85) or link == 0:
                break
            ebr = ext_start + link
    return out


def build_probe_images(root: Path) -> dict[str, Case]:
    b = Builder(root)
    fs_kinds = ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat12", "vfat16", "vfat32", "squashfs",
                "swap", "luks1", "luks2", "lvm"]
    mountable = {"ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs", "vfat"}
    for kind in fs_kinds:
        name = blkid_name(kind)
        ok = name in mountable
        b.add(Case(name=f"whole-{kind}", path=b.fs(kind), table="none",
                   rootfs=(0, name) if ok else None,
                   error=None if ok else f"whole disk: {name} is not a mountable rootfs"))

    b.disk("mbr-basic", 12, _mbr_script([f"start={_s(1)}, size={_s(8)}, type=83"]),
           {1: "ext4"}, table="mbr", rootfs=(1, "ext4"))
    b.disk("mbr-logical", 40, _mbr_script([
        f"start={_s(1)}, size={_s(8)}, type=83",
        f"start={_s(10)}, size={_s(28)}, type=5",
        f"start={_s(11)}, size={_s(8)}, type=83",
        f"start={_s(20)}, size={_s(4)}, type=82",
        f"start={_s(25)}, size={_s(8)}, type=83",
        f"start={_s(34)}, size={_s(3)}, type=83",
    ]), {1: "ext2", 11: "ext3", 20: "swap", 25: "ext4", 34: "vfat12"}, table="mbr",
        rootfs=(1, "ext2"))
    b.disk("mbr-ext-0f", 24, _mbr_script([
        f"start={_s(1)}, size={_s(20)}, type=f",
        f"start={_s(2)}, size={_s(8)}, type=83",
        f"start={_s(11)}, size={_s(8)}, type=83",
    ]), {2: "ext4", 11: "ext3"}, table="mbr", rootfs=(5, "ext4"))
    case = b.disk("mbr-empty-slot", 24, _mbr_script([
        f"start={_s(1)}, size={_s(8)}, type=83",
        f"start={_s(10)}, size={_s(8)}, type=83",
        f"start={_s(19)}, size={_s(4)}, type=82",
    ]), {10: "ext3", 19: "swap"}, table="mbr", rootfs=(2, "ext3"))
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", "--delete", case.path, "1")
    b.disk("mbr-out-of-order", 24, _mbr_script([
        f"start={_s(12)}, size={_s(8)}, type=83",
        f"start={_s(1)}, size={_s(8)}, type=83",
    ]), {12: "xfs" if False else "ext4", 1: "ext2"}, table="mbr", rootfs=(1, "ext4"))
    b.disk("mbr-swap-first", 16, _mbr_script([
        f"start={_s(1)}, size={_s(4)}, type=82",
        f"start={_s(6)}, size={_s(8)}, type=83",
    ]), {1: "swap", 6: "ext4"}, table="mbr", error="partition 1: swap is not a mountable rootfs")
    b.disk("mbr-xfs", 330, _mbr_script([f"start={_s(1)}, size={_s(320)}, type=83"]),
           {1: "xfs"}, table="mbr", rootfs=(1, "xfs"))

    b.disk("gpt-basic", 12, ["-n", "1:2048:+8M", "-t", "1:8300"], {1: "ext4"}, table="gpt",
           rootfs=(1, "ext4"))
    b.disk("gpt-multi", 520, [
        "-n", "1:1M:+2M", "-t", "1:ef00", "-n", "2:4M:+8M", "-n", "4:13M:+320M",
        "-n", "5:334M:+128M", "-n", "6:463M:+4M", "-n", "7:468M:+4M", "-t", "7:8200",
        "-n", "8:473M:+20M", "-n", "9:494M:+8M", "-t", "9:8e00", "-n", "10:503M:+8M",
        "-n", "11:512M:+2M",
    ], {1: "vfat12", 4: "ext4", 13: "xfs", 334: "btrfs", 463: "squashfs", 468: "swap",
        473: "luks2", 494: "lvm", 503: "luks1"}, table="gpt", rootfs=(1, "vfat"))
    b.disk("gpt-out-of-order", 24, ["-n", "4:12M:+8M", "-n", "2:1M:+8M"],
           {12: "ext4", 1: "vfat16" if False else "ext3"}, table="gpt", rootfs=(2, "ext3"))
    b.disk("gpt-luks-first", 32, ["-n", "1:1M:+20M", "-n", "2:22M:+8M"], {1: "luks2", 22: "ext4"},
           table="gpt", error="partition 1: crypto_LUKS is not a mountable rootfs")
    b.disk("gpt-lvm-first", 24, ["-n", "1:1M:+8M", "-n", "2:10M:+8M"], {1: "lvm", 10: "ext4"},
           table="gpt", error="partition 1: LVM2_member is not a mountable rootfs")
    b.disk("gpt-empty-first", 24, ["-n", "1:1M:+8M", "-n", "2:10M:+8M"], {10: "ext4"},
           table="gpt", error="partition 1: no filesystem found")
    b.disk("gpt-hybrid", 24, ["-n", "1:1M:+8M", "-n", "2:10M:+8M", "-h", "2"],
           {1: "ext4", 10: "ext3"}, table="gpt", rootfs=(1, "ext4"), crosscheck=False)
    b.disk("gpt-4k", 16, "label: gpt\nstart=256, size=2048, type=" + LINUX_GUID + "\n",
           {1: "ext4"}, table="gpt", sector_size=4096, rootfs=(1, "ext4"), crosscheck=False)

    _corrupt_cases(b)
    _external_journal_cases(b)
    return b.cases


def _corrupt_cases(b: Builder) -> None:
    base = b.cases["gpt-basic"].path
    p = copy(base, b.root / "gpt-bad-primary.img")
    corrupt(p, 512 + 40, b"\xff")  # header CRC no longer matches
    b.add(Case("gpt-bad-primary", p, "gpt", rootfs=(1, "ext4"), crosscheck=False))
    p = copy(base, b.root / "gpt-bad-primary-sig.img")
    corrupt(p, 512, b"XXXXXXXX")
    b.add(Case("gpt-bad-primary-sig", p, "gpt", rootfs=(1, "ext4"), crosscheck=False))
    p = copy(base, b.root / "gpt-bad-entries.img")
    corrupt(p, 1024 + 60, b"\x01")  # entry array CRC no longer matches
    b.add(Case("gpt-bad-entries", p, "gpt", rootfs=(1, "ext4"), crosscheck=False))
    p = copy(base, b.root / "gpt-both-bad.img")
    corrupt(p, 512 + 40, b"\xff")
    corrupt(p, p.stat().st_size - 512 + 40, b"\xff")
    b.add(Case("gpt-both-bad", p, "gpt", error="neither the primary nor the backup",
               crosscheck=False))
    p = copy(base, b.root / "gpt-absurd.img")
    rewrite_gpt_header(p, 512, num_entries=1 << 31)
    b.add(Case("gpt-absurd", p, "gpt", error="refusing an entry array of 2147483648 entries",
               crosscheck=False))

    # EBR loop: the last EBR's link points back at the second EBR of the chain
    p = copy(b.cases["mbr-logical"].path, b.root / "mbr-ebr-loop.img")
    ext_start = _s(10)
    chain = ebr_chain(p, ext_start)
    assert len(chain) >= 3, chain
    link = struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 0x05, 0, 0, 0, chain[1] - ext_start, 1)
    corrupt(p, chain[-1] * 512 + 446 + 16, link)
    b.add(Case("mbr-ebr-loop", p, "mbr", error="EBR chain loops", crosscheck=False))

    # partition past the end: a correct table on a disk that was later cut short
    p = copy(b.cases["mbr-basic"].path, b.root / "mbr-past-end.img")
    os.truncate(p, 6 * MIB)
    b.add(Case("mbr-past-end", p, "mbr", error="partition 1: runs past the end of the disk",
               crosscheck=False))

    p = b.root / "all-zero.img"
    _sparse_file(p, 8 * MIB)
    b.add(Case("all-zero", p, "none", error="whole disk: no filesystem found"))

    # garbage in front of 0x55AA on a whole-disk ext4: not a partition table
    p = copy(b.fs("ext4"), b.root / "garbage-55aa.img")
    junk = bytes((i * 37 + 11) & 0xFF for i in range(510))
    corrupt(p, 0, junk + b"\x55\xaa")
    b.add(Case("garbage-55aa", p, "none", rootfs=(0, "ext4")))
    # garbage whose boot flags happen to look valid must still not crash anything
    p = copy(b.fs("ext4"), b.root / "garbage-55aa-flags.img")
    sector = bytearray(junk + b"\x55\xaa")
    for slot in range(4):
        sector[446 + slot * 16] = 0x80 if slot == 0 else 0
        sector[446 + slot * 16 + 4] = 0x83 if slot == 0 else 0
    struct.pack_into("<II", sector, 446 + 8, 0xFFFFFF00, 0xFFFFFFFF)
    corrupt(p, 0, bytes(sector))
    b.add(Case("garbage-55aa-flags", p, "mbr",
               error="partition 1: runs past the end of the disk", crosscheck=False))


def make_journal_dev(path: Path, size_mib: int = 4) -> Path:
    """An external ext journal (mke2fs -O journal_dev), 4 KiB blocks."""
    _sparse_file(path, size_mib * MIB)
    sh("mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096", path)
    return path


def make_ext_external_journal(path: Path, kind: str, *, crafted: bool = False,
                              size_mib: int = 8) -> Path:
    """An ext3/ext4 (`kind`) whose superblock puts its journal on another device.

    By default the real thing: a journal device on a loop device, `mkfs.KIND -J device=/dev/loopN`,
    then the loop is detached again (s_journal_dev keeps its number, s_journal_uuid its UUID).
    `crafted`: an ordinary image whose superblock was rewritten (debugfs) to journal inode 0 and
    a journal UUID, without a device number.
    """
    _sparse_file(path, size_mib * MIB)
    if crafted:
        sh("mkfs." + kind, "-q", "-F", "-b", "4096", path)
        sh("debugfs", "-w", "-R", "ssv journal_inum 0", path)
        sh("debugfs", "-w", "-R", "ssv journal_uuid 0b1e3c5d-7f00-4a11-9c22-33445566aa77", path)
        return path
    journal = make_journal_dev(path.with_suffix(".journal"))
    loop = sh("losetup", "-f", "--show", journal).strip()
    try:
        sh("mkfs." + kind, "-q", "-F", "-b", "4096", "-J", f"device={loop}", path)
    finally:
        sh("losetup", "-d", loop)
    return path


def _external_journal_cases(b: Builder) -> None:
    """Issue 14: a journal outside the image would make the host kernel open a host device."""
    ext4 = b.add_fs("ext4-extjournal", make_ext_external_journal(
        b.fs_dir / "ext4-extjournal.img", "ext4"))
    b.add(Case("whole-ext4-extjournal", ext4, "none",
               error="whole disk: ext4 with an external journal is refused"))
    b.add(Case("whole-jbd", ext4.with_suffix(".journal"), "none",
               error="whole disk: jbd is not a mountable rootfs"))
    b.add_fs("ext3-extjournal-crafted", make_ext_external_journal(
        b.fs_dir / "ext3-extjournal-crafted.img", "ext3", crafted=True))
    b.disk("gpt-ext3-extjournal", 24, ["-n", "1:1M:+8M", "-n", "2:10M:+8M"],
           {1: "ext3-extjournal-crafted", 10: "ext4"}, table="gpt",
           error="partition 1: ext3 with an external journal is refused")


def first_bytes(path: Path, length: int = 0x11000) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def which(tool: str) -> bool:
    return shutil.which(tool) is not None


_SESSION_CASES: dict[str, Case] | None = None


def session_cases(make_dir: Callable[[], Path]) -> dict[str, Case]:
    """Build the probe images once per process, whichever test module asks first."""
    global _SESSION_CASES
    if _SESSION_CASES is None:
        _SESSION_CASES = build_probe_images(make_dir())
    return _SESSION_CASES
