"""Loop devices through ioctls on /dev/loop-control and /dev/loopN (no losetup on the hot path).

attach() uses LOOP_CONFIGURE (one atomic ioctl), falling back to LOOP_SET_FD + LOOP_SET_STATUS64 on
kernels without it. A free device comes from LOOP_CTL_GET_FREE; another process may grab the same
device first, so EBUSY retries with a fresh one.

Auto-clear: attach(autoclear=True) (the default) sets LO_FLAGS_AUTOCLEAR, so the device frees itself
when its last opener (the mount on it) goes away. A crash between attach and mount therefore leaks
nothing once the caller's fd is closed, and unmounting the filesystem releases the backing file
(the block-view file) without a separate step; detach() stays idempotent for the explicit path.

Blocking calls: never run them on the trio thread serving the block view (deadlock rule).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import time
from dataclasses import dataclass

from gateway.errors import BackendError, Conflict, NotFound

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
BLKFLSBUF = 0x1261

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = "/sys/block"


class LoopError(BackendError):
    """A loop-device operation failed (`.errno` says why, when the kernel said)."""


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


@dataclass(frozen=True)
class LoopDevice:
    path: str  # /dev/loopN
    backing_file: str
    read_only: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _fail(what: str, exc: OSError) -> LoopError:
    return LoopError(f"loop: {what}: {exc.strerror or exc}", errno=exc.errno or 0)


def _get_free() -> str:
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(f"open {LOOP_CONTROL}", exc) from exc
    try:
        number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise _fail("no free loop device", exc) from exc
    finally:
        os.close(ctl)
    return f"/dev/loop{number}"


def _info(path: str, flags: int, offset: int, sizelimit: int) -> _LoopInfo64:
    info = _LoopInfo64()
    info.lo_flags = flags
    info.lo_offset = offset
    info.lo_sizelimit = sizelimit
    info.lo_file_name = os.fsencode(path)[: LO_NAME_SIZE - 1]
    return info


def _configure(dev_fd: int, file_fd: int, info: _LoopInfo64) -> None:
    config = _LoopConfig()
    config.fd = file_fd
    config.info = info
    try:
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)  # type: ignore[call-overload]
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, info)  # type: ignore[call-overload]
    except OSError:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
        raise


def attach(path: str | os.PathLike[str], *, read_only: bool = False, autoclear: bool = True,
           offset: int = 0, sizelimit: int = 0, direct_io: bool = False,
           attempts: int = 200) -> tuple[LoopDevice, int]:
    """Attach `path` to a free loop device.

    Returns the device and an open fd on it. With autoclear the device lives while that fd (or a
    mount on the device) exists: close the fd once the device is mounted, or to abandon it.
    """
    file_path = os.path.abspath(os.fspath(path))
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        file_fd = os.open(file_path, mode | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(f"open backing file {file_path}", exc) from exc
    flags = ((LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
             | (LO_FLAGS_DIRECT_IO if direct_io else 0))
    info = _info(file_path, flags, offset, sizelimit)
    try:
        last: OSError | None = None
        for attempt in range(attempts):
            if attempt:
                # Concurrent attachers are all handed the same free device and all but one get
                # EBUSY; a short random backoff spreads them out (seen with 16 parallel mounts).
                time.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))
            dev = _get_free()
            try:
                dev_fd = os.open(dev, mode | os.O_CLOEXEC)
            except OSError as exc:
                last = exc
                continue
            try:
                _configure(dev_fd, file_fd, info)
            except OSError as exc:
                os.close(dev_fd)
                if exc.errno == errno.EBUSY:  # raced with another attacher; take a new device
                    last = exc
                    continue
                raise _fail(f"attach {file_path} to {dev}", exc) from exc
            return LoopDevice(dev, file_path, read_only), dev_fd
        raise LoopError(f"loop: attach {file_path}: no device after {attempts} attempts: "
                        f"{last.strerror if last else 'unknown'}", errno=errno.EBUSY)
    finally:
        os.close(file_fd)


def _sys_dir(dev: str) -> str:
    return f"{SYS_BLOCK}/{os.path.basename(dev)}/loop"


def backing_file(dev: str) -> str | None:
    """The backing file of a bound loop device, or None when it is free."""
    try:
        with open(os.path.join(_sys_dir(dev), "backing_file"), "rb") as f:
            name = os.fsdecode(f.read()).rstrip("\n")
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return None  # the device went away while we looked (auto-clear, another detach)
        raise _fail(f"read backing file of {dev}", exc) from exc
    return name.removesuffix(" (deleted)") if name else None


def bound_devices() -> dict[str, str]:
    """Every bound loop device and its backing file: {'/dev/loopN': path}.

    One open per device (the `loop` directory of a free one does not exist): a glob costs two
    stats per device and its pattern matching, 2 ms with the hundred devices of a busy host, and
    every teardown check calls this."""
    result: dict[str, str] = {}
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        return result
    for name in names:
        if name.startswith("loop") and name[4:].isdigit():
            dev = "/dev/" + name
            backing = backing_file(dev)
            if backing is not None:
                result[dev] = backing
    return result


def devices_backed_by(path: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is `path`, or lies under `path` if it is a directory."""
    target = os.path.normpath(os.path.abspath(os.fspath(path)))
    prefix = target.rstrip("/") + "/"
    return sorted(dev for dev, name in bound_devices().items()
                  if name == target or name.startswith(prefix))


def detach(dev: str, *, wait: float = 5.0) -> None:
    """Unbind `dev` and wait until the kernel released its backing file. Idempotent.

    If the device is still open (mounted), the kernel defers the release to its last close; after
    `wait` seconds LoopError (Conflict when busy) says so.
    """
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"loop: no device {dev}") from None
    except OSError as exc:
        raise _fail(f"open {dev}", exc) from exc
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: already free
            raise _fail(f"detach {dev}", exc) from exc
    finally:
        os.close(fd)
    deadline = time.monotonic() + wait
    while backing_file(dev) is not None:
        if time.monotonic() >= deadline:
            raise Conflict(f"loop: {dev} still bound to {backing_file(dev)} (device busy)")
        time.sleep(0.02)


def in_use(dev: str) -> bool:
    """Whether a filesystem (in any mount namespace) or another exclusive opener holds `dev`."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise _fail(f"open {dev}", exc) from exc
    os.close(fd)
    return False


def drop_cache(dev_fd: int) -> None:
    """Write back and forget the device's page cache (BLKFLSBUF), so the next reads go to the
    backing file: a device kept bound while nothing used it may cache bytes since rewritten."""
    try:
        fcntl.ioctl(dev_fd, BLKFLSBUF, 0)
    except OSError as exc:
        raise _fail("drop the page cache", exc) from exc


def wait_released(dev: str, timeout: float = 5.0) -> bool:
    """Wait until `dev` has no backing file; True if released in time."""
    deadline = time.monotonic() + timeout
    while backing_file(dev) is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
