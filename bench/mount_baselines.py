"""Baseline mount chains for bench/mount_latency.py: what the gateway is compared against.

Each chain turns an image into a mounted ext4 rootfs showing /etc/marker, without the gateway:

  floor           losetup at the partition offset + mount(8) of the raw image
  floor-syscalls  the same with LOOP_CONFIGURE + mount(2) in process (the kernel's own cost)
  qemu-nbd-nbdfuse  qemu-nbd -f qcow2 -> nbdfuse -> losetup (offset) -> mount
  qsd-fuse        qemu-storage-daemon FUSE export of the qcow2 -> losetup (offset) -> mount
  nbdfuse-fuse2fs qemu-nbd -f qcow2 -> nbdfuse -> fuse2fs -o offset

`mount_chain(name, ...)` returns a Mounted whose `close()` tears everything down (untimed). The
caller wraps both in try/finally; every process started here is a direct child of the bench, and
every mount and loop device is registered for teardown the moment it exists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.host import loopdev, mounts

POLL = 0.002  # seconds between readiness checks (the chains get a tight poll, like a human script)


class ChainError(RuntimeError):
    pass


@dataclass(frozen=True)
class Images:
    raw: Path  # partitioned raw disk (GPT, ext4 first partition)
    qcow2: Path  # the same disk as qcow2
    offset: int  # partition start in bytes
    size: int  # partition size in bytes


@dataclass
class Mounted:
    rootfs: Path
    undo: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Undo in reverse order; keep going on errors and raise the first one at the end."""
        first: BaseException | None = None
        while self.undo:
            step = self.undo.pop()
            try:
                step()
            except BaseException as exc:  # teardown must finish
                first = first or exc
        if first is not None:
            raise first


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ChainError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _wait(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None,
          timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ChainError(f"{what}: process exited {proc.returncode}: {err.strip()[-300:]}")
        if time.monotonic() > deadline:
            raise ChainError(f"{what}: not ready after {timeout}s")
        time.sleep(POLL)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0, grace: float = 0.0) -> None:
    """SIGTERM after `grace` seconds (fuse2fs writes its metadata back after the umount)."""
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _spawn(m: Mounted, argv: list[str], grace: float = 0.0) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    m.undo.append(lambda: _stop(proc, grace=grace))
    return proc


def _is_mounted(path: Path) -> bool:
    return mounts.is_mountpoint(path)


def _umount(path: Path) -> None:
    if _is_mounted(path):
        try:
            mounts.umount(path)
        except Exception:
            mounts.umount(path, lazy=True)


def _losetup(m: Mounted, file: Path, img: Images) -> str:
    dev = _run("losetup", "--find", "--show", "--offset", str(img.offset), "--sizelimit",
               str(img.size), str(file))
    m.undo.append(lambda: _detach(dev, file))
    return dev


def _detach(dev: str, file: Path) -> None:
    if loopdev.backing_file(dev) is not None:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        loopdev.wait_released(dev)


def _kernel_mount(m: Mounted, dev: str, target: Path) -> None:
    _run("mount", "-t", "ext4", dev, str(target))
    m.undo.append(lambda: _umount(target))


def _qemu_nbd(m: Mounted, img: Images, work: Path) -> Path:
    sock = work / "qemu-nbd.sock"
    sock.unlink(missing_ok=True)
    proc = _spawn(m, ["qemu-nbd", "--format", "qcow2", "--socket", str(sock), "--persistent",
                      "--shared", "4", str(img.qcow2)])
    m.undo.append(lambda: sock.unlink(missing_ok=True))
    _wait(sock.exists, "qemu-nbd socket", proc)
    return sock


def _nbdfuse(m: Mounted, sock: Path, work: Path) -> Path:
    mnt = work / "nbdfuse"
    mnt.mkdir(exist_ok=True)
    pidfile = work / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    proc = _spawn(m, ["nbdfuse", "-P", str(pidfile), str(mnt), "--unix", str(sock)])
    m.undo.append(lambda: _fusermount(mnt))
    _wait(lambda: pidfile.exists() and pidfile.stat().st_size > 0, "nbdfuse", proc)
    return mnt / "nbd"


def _fusermount(mnt: Path) -> None:
    if _is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        if _is_mounted(mnt):
            _umount(mnt)


def _marker(rootfs: Path) -> None:
    with open(rootfs / "etc" / "marker", "rb") as f:
        if not f.read():
            raise ChainError(f"{rootfs}/etc/marker is empty")


def floor(img: Images, work: Path, m: Mounted) -> None:
    dev = _losetup(m, img.raw, img)
    _kernel_mount(m, dev, m.rootfs)


def floor_syscalls(img: Images, work: Path, m: Mounted) -> None:
    loop, fd = loopdev.attach(img.raw, offset=img.offset, sizelimit=img.size)
    try:
        m.undo.append(lambda: _detach(loop.path, img.raw))
        mounts.mount(loop.path, m.rootfs, "ext4", mounts.MS_NODEV)
        m.undo.append(lambda: _umount(m.rootfs))
    finally:
        os.close(fd)


def qemu_nbd_nbdfuse(img: Images, work: Path, m: Mounted) -> None:
    sock = _qemu_nbd(m, img, work)
    disk = _nbdfuse(m, sock, work)
    dev = _losetup(m, disk, img)
    _kernel_mount(m, dev, m.rootfs)


def qsd_fuse(img: Images, work: Path, m: Mounted) -> None:
    export = work / "qsd-export"
    export.touch()
    proc = _spawn(m, [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={img.qcow2}",
        "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
        "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={export},writable=on"])
    m.undo.append(lambda: _umount(export))
    _wait(lambda: _is_mounted(export), "qsd fuse export", proc)
    dev = _losetup(m, export, img)
    _kernel_mount(m, dev, m.rootfs)


def nbdfuse_fuse2fs(img: Images, work: Path, m: Mounted) -> None:
    sock = _qemu_nbd(m, img, work)
    disk = _nbdfuse(m, sock, work)
    proc = _spawn(m, ["fuse2fs", str(disk), str(m.rootfs), "-f", "-o",
                      f"offset={img.offset},nodev"], grace=10.0)
    m.undo.append(lambda: _umount(m.rootfs))
    _wait(lambda: _is_mounted(m.rootfs), "fuse2fs", proc)


CHAINS: dict[str, Callable[[Images, Path, Mounted], None]] = {
    "floor": floor,
    "floor-syscalls": floor_syscalls,
    "qemu-nbd+nbdfuse+loop": qemu_nbd_nbdfuse,
    "qsd-fuse+loop": qsd_fuse,
    "nbdfuse+fuse2fs": nbdfuse_fuse2fs,
}


def mount_chain(name: str, img: Images, work: Path) -> Mounted:
    """Bring chain `name` up to a rootfs showing /etc/marker. On failure nothing is left."""
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    m = Mounted(rootfs)
    try:
        CHAINS[name](img, work, m)
        _marker(rootfs)
    except BaseException:
        m.close()
        raise
    return m
