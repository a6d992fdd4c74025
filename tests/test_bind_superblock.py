"""Issue 14 finding 5: in bind mode the tenant's ext superblock must not steer the host kernel.

Real images, real loop devices, real mount(2): an image asking for errors=panic (tune2fs -e panic)
is mounted errors=remount-ro; an image carrying its own mount options (tune2fs -E mount_opts=) is
refused; an image whose journal is on another device is refused by the probe, directly and through
a real gatewayd. No test ever provokes a filesystem error.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.attach import attachment
from gateway.errors import FormatError, ProbeError
from gateway.host import loopdev, mounts
from gateway.probe.core import probe_reader
from gateway.testing.daemon import Daemon
from gateway.testing.probe_images import MIB, make_ext_external_journal, sh

VOLUME = "vol"
REFUSED_OPTS = "bind mode refuses; clear them with `tune2fs -E mount_opts= IMAGE`"


def make_ext(path: Path, fstype: str, size_mib: int = 16) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    sh("mkfs." + fstype, "-q", "-F", path)
    return path


def superblock_field(image: Path, name: str) -> str:
    """One line of `dumpe2fs -h`, e.g. 'Errors behavior' -> 'Panic'."""
    for line in sh("dumpe2fs", "-h", image).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def set_mount_opts(image: Path, opts: str) -> None:
    """tune2fs takes one option; debugfs writes a comma list (and fixes the superblock csum)."""
    if "," in opts:
        sh("debugfs", "-w", "-R", f"ssv mount_opts {opts}", image)
    else:
        sh("tune2fs", "-E", f"mount_opts={opts}", image)
    assert superblock_field(image, "Mount options") == opts


def bound_to(*paths: Path) -> list[str]:
    """Loop devices whose backing file is one of `paths` (wherever they are)."""
    wanted = {str(p) for p in paths}
    return sorted(dev for dev, name in loopdev.bound_devices().items() if name in wanted)


def mounted_under(run: Path) -> list[str]:
    """Mounts under a run dir but its blk (a daemon's block view) and the shared rootfs root."""
    keep = {str(run / "blk"), str(run / "rootfs")}
    return [m.mount_point for m in mounts.mounts_under(run) if m.mount_point not in keep]


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A run dir whose window RUN_DIR/blk/vol/rootfs is a plain image file (no block view)."""
    run = tmp_path / "run"
    (run / "blk" / VOLUME).mkdir(parents=True)
    attachment.prepare_rootfs_root(run)
    try:
        yield run
    finally:
        swept = attachment.sweep(run, block_view=False)
        attachment.release_rootfs_root(run)
        assert swept.remaining == [] and swept.errors == [], swept
        assert attachment.leftovers(run, VOLUME) == []
        assert mounted_under(run) == [] and loopdev.devices_backed_by(run) == []


def window(run: Path) -> Path:
    return run / "blk" / VOLUME / "rootfs"


def super_options(att: attachment.Attachment) -> list[str]:
    assert att.mnt is not None
    kernel = mounts.mounts_at(att.mnt)
    bound = mounts.mounts_at(att.rootfs)
    assert len(kernel) == 1 and len(bound) == 1
    assert kernel[0].super_options == bound[0].super_options  # one superblock, two mounts
    return kernel[0].super_options.split(",")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_image_errors_panic_is_mounted_remount_ro(run_dir: Path, fstype: str) -> None:
    image = make_ext(window(run_dir), fstype)
    sh("tune2fs", "-e", "panic", image)
    assert superblock_field(image, "Errors behavior") == "Panic"
    steps: list[tuple[str, dict[str, object]]] = []
    att = attachment.attach_bind(run_dir, VOLUME, fstype,
                                 journal=lambda step, detail: steps.append((step, detail)))
    try:
        opts = super_options(att)
        assert "errors=remount-ro" in opts and "errors=panic" not in opts, opts
        assert [d.get("data") for s, d in steps if s == "mount"] == ["errors=remount-ro", None]
    finally:
        attachment.detach(att)
    assert superblock_field(image, "Errors behavior") == "Panic"  # the image itself is untouched


@pytest.mark.timeout(60)
def test_caller_data_is_kept_but_errors_is_always_remount_ro(run_dir: Path) -> None:
    image = make_ext(window(run_dir), "ext4")
    sh("tune2fs", "-e", "panic", image)
    att = attachment.attach_bind(run_dir, VOLUME, "ext4", data="errors=panic,commit=7")
    try:
        opts = super_options(att)
        assert "commit=7" in opts and "errors=remount-ro" in opts, opts
        assert "errors=panic" not in opts, opts
    finally:
        attachment.detach(att)


@pytest.mark.timeout(60)
def test_the_kernel_does_apply_superblock_mount_options(run_dir: Path, tmp_path: Path) -> None:
    """The control for the refusal below: a mount that does not check obeys s_mount_opts."""
    image = make_ext(tmp_path / "control.ext4", "ext4")
    set_mount_opts(image, "commit=4242")  # harmless and visible in mountinfo
    target = tmp_path / "control"
    target.mkdir()
    loop, fd = loopdev.attach(image)
    try:
        mounts.mount(loop.path, target, "ext4", mounts.MS_NODEV, "errors=remount-ro")
        try:
            assert "commit=4242" in mounts.mounts_at(target)[0].super_options.split(",")
        finally:
            mounts.umount(target)
    finally:
        os.close(fd)  # auto-clear: the device goes with its last opener
        assert loopdev.wait_released(loop.path)
    assert bound_to(image) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opts", ["errors=panic", "noload,nobarrier,journal_path=/dev/loop0"])
def test_image_mount_options_are_refused(run_dir: Path, opts: str) -> None:
    image = make_ext(window(run_dir), "ext4")
    set_mount_opts(image, opts)
    steps: list[tuple[str, dict[str, object]]] = []
    with pytest.raises(FormatError) as info:
        attachment.attach_bind(run_dir, VOLUME, "ext4",
                               journal=lambda step, detail: steps.append((step, detail)))
    message = str(info.value)
    assert message == (f"attachment {VOLUME}: the ext4 superblock carries its own mount options "
                       f"('{opts}'), which {REFUSED_OPTS} or use fuse mode")
    assert "\n" not in message and info.value.code == "format-error"
    assert [s for s, _ in steps] == ["loop", "loop"]  # refused before any mount was tried
    assert attachment.leftovers(run_dir, VOLUME) == []
    assert mounted_under(run_dir) == [] and bound_to(image) == []

    sh("tune2fs", "-E", "mount_opts=", image)  # the fix the message names
    att = attachment.attach_bind(run_dir, VOLUME, "ext4")
    try:
        assert "errors=remount-ro" in super_options(att)
    finally:
        attachment.detach(att)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opts", ["journal_data", "nobarrier", "debug", "discard"])
def test_image_default_mount_options_are_refused(run_dir: Path, opts: str) -> None:
    """`tune2fs -o` sets s_default_mount_opts: applied by the kernel, hidden in mountinfo."""
    image = make_ext(window(run_dir), "ext4")
    sh("tune2fs", "-o", opts, image)
    with pytest.raises(FormatError, match=r"sets default mount options 0x[0-9a-f]+ \(tune2fs -o\)"):
        attachment.attach_bind(run_dir, VOLUME, "ext4")
    assert attachment.leftovers(run_dir, VOLUME) == []
    assert mounted_under(run_dir) == [] and bound_to(image) == []
    sh("tune2fs", "-o", "^" + opts, image)  # the fix the message names
    att = attachment.attach_bind(run_dir, VOLUME, "ext4")
    attachment.detach(att)


@pytest.mark.timeout(60)
def test_unprintable_mount_options_stay_one_line(run_dir: Path) -> None:
    image = make_ext(window(run_dir), "ext4")
    set_mount_opts(image, "x")
    with open(image, "r+b") as f:  # raw bytes past tune2fs: the kernel only needs byte 0 != NUL
        f.seek(1024 + 0x200)
        f.write(b"a\nb\x1b[2Jc")
    with pytest.raises(FormatError) as info:
        attachment.attach_bind(run_dir, VOLUME, "ext4")
    assert "('a?b?[2Jc')" in str(info.value) and "\n" not in str(info.value)
    assert attachment.leftovers(run_dir, VOLUME) == []


# ---- external journal -----------------------------------------------------------------------


@pytest.fixture
def external_journal(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real ext4 made with `-J device=/dev/loopN` over a journal_dev image; the loop is gone."""
    image = make_ext_external_journal(tmp_path / "extj.ext4", "ext4")
    journal = image.with_suffix(".journal")
    try:
        assert superblock_field(image, "Journal device") not in ("", "0x0000")
        assert superblock_field(image, "Journal UUID")
        assert bound_to(image, journal) == []
        yield image, journal
    finally:
        for dev in bound_to(image, journal):
            loopdev.detach(dev)


@pytest.mark.timeout(60)
def test_the_probe_refuses_an_external_journal(external_journal: tuple[Path, Path]) -> None:
    image, journal = external_journal
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ProbeError) as info:
            probe_reader(lambda offset, length: os.pread(fd, length, offset),
                         os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert str(info.value).startswith("whole disk: ext4 with an external journal is refused; ")
    assert "\n" not in str(info.value)
    with open(journal, "rb") as f:
        data = f.read()
    with pytest.raises(ProbeError, match=r"^whole disk: jbd is not a mountable rootfs$"):
        probe_reader(lambda offset, length: data[offset:offset + length], len(data))


def assert_refused(gatewayd: Daemon, name: str, args: list[str], expected: str,
                   *images: Path) -> None:
    refused = gatewayd.ctl("mount", name, *args)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], refused.stderr
    assert [m for m in mounted_under(gatewayd.run_dir) if m.endswith(f"/{name}")] == []
    assert loopdev.devices_backed_by(gatewayd.run_dir / "blk" / name) == []
    assert bound_to(*images) == []
    shown = json.loads(gatewayd.ctl("volume", "show", name, "--json", check=True).stdout)
    assert shown["attachment"] is None


@pytest.mark.timeout(120)
def test_gatewayd_refuses_an_external_journal(gatewayd: Daemon,
                                              external_journal: tuple[Path, Path]) -> None:
    image, journal = external_journal
    gatewayd.ctl("volume", "add", "extj", str(image), "--format", "raw", check=True)
    for mode in ("bind", "fuse"):
        assert_refused(gatewayd, "extj", ["--mode", mode],
                       "whole disk: ext4 with an external journal is refused", image, journal)
    gatewayd.ctl("volume", "rm", "extj", check=True)


@pytest.mark.timeout(120)
def test_gatewayd_refuses_image_mount_options_in_bind_mode(gatewayd: Daemon,
                                                           tmp_path: Path) -> None:
    image = make_ext(tmp_path / "opts.ext4", "ext4")
    set_mount_opts(image, "errors=panic")
    gatewayd.ctl("volume", "add", "opts", str(image), "--format", "raw", check=True)
    assert_refused(gatewayd, "opts", ["--mode", "bind"], REFUSED_OPTS, image)
    gatewayd.ctl("mount", "opts", "--mode", "fuse", check=True)  # fuse2fs ignores the field
    gatewayd.ctl("umount", "opts", check=True)
    gatewayd.ctl("unexport", "opts", check=True)
    sh("tune2fs", "-E", "mount_opts=", image)
    gatewayd.ctl("mount", "opts", "--mode", "bind", check=True)
    rootfs = gatewayd.run_dir / "rootfs" / "opts"
    assert "errors=remount-ro" in mounts.mounts_at(rootfs)[0].super_options.split(",")
    gatewayd.ctl("umount", "opts", check=True)
    gatewayd.ctl("volume", "rm", "opts", check=True)
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
