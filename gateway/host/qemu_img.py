"""qemu-img, always with explicit formats (`-f`, `-O`, `-F`): nothing is ever probed.

Blocking: call from a worker thread. `convert` reports progress (qemu-img's `-p` output, which it
prints even without a terminal) through a callback and stops early when `cancel` is set.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import command
from gateway.errors import CommandError, InvalidArgument

QEMU_IMG = "qemu-img"
FORMATS = ("raw", "qcow2")
PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
Progress = Callable[[float], None]


class QemuImgError(CommandError):
    pass


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r}: choose raw or qcow2")
    return fmt


def create(path: Path, fmt: str, size: int | None = None, *, backing: Path | None = None,
           backing_fmt: str | None = None) -> None:
    """Create an image; an overlay names its backing file with its pinned format (-F always) and
    its size, and qemu-img never opens the backing file (-u): the name is only written into the
    header, and the gateway opens every layer itself, explicitly, when it serves the chain."""
    argv: list[str | os.PathLike[str]] = [QEMU_IMG, "create", "-q", "-f", _fmt(fmt)]
    if backing is not None:
        if backing_fmt is None or size is None:
            raise InvalidArgument("an overlay needs the backing file's format and size")
        argv += ["-u", "-F", _fmt(backing_fmt), "-b", str(backing)]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    command.run(argv, error=QemuImgError)


def resize(path: str, fmt: str, size: int) -> None:
    """Grow one layer: an explicit tree (pinned driver, no backing opened), never `-f FMT PATH`,
    which would open the backing file an overlay's header names."""
    tree = layer(path, fmt, None, read_only=False)
    command.run([QEMU_IMG, "resize", "-q", "json:" + json.dumps(tree, separators=(",", ":")),
                 str(size)], error=QemuImgError)


def info(path: Path, fmt: str) -> dict[str, object]:
    """`qemu-img info` of one layer only (-U: no lock needed; --backing-chain is never used)."""
    result = command.run([QEMU_IMG, "info", "-U", "--output=json", "-f", _fmt(fmt), path],
                         error=QemuImgError)
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def layer(path: str, fmt: str, backing: dict[str, Any] | None = None, *,
          read_only: bool = True) -> dict[str, Any]:
    """A source image as an explicit block tree: the pinned format driver over a file node, and
    for qcow2 the backing layer given explicitly (None -> no backing at all)."""
    tree: dict[str, Any] = {"driver": _fmt(fmt), "read-only": read_only,
                            "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        tree["backing"] = backing
    elif backing is not None:
        raise InvalidArgument("a raw image cannot have a backing layer")
    return tree


def convert(source: dict[str, Any], dst: Path, dst_fmt: str, *,
            progress: Progress | None = None, cancel: threading.Event | None = None,
            timeout: float = 3600.0) -> None:
    """`qemu-img convert -p json:{SOURCE} -O DST_FMT`, following its progress output.

    The source is a `layer()` tree rather than `-f FMT PATH`: it pins the format of every layer
    and never lets qemu open a backing file named in a header."""
    src = "json:" + json.dumps(source, separators=(",", ":"))
    with tempfile.NamedTemporaryFile(prefix="qemu-img-", suffix=".log") as log:
        proc = command.spawn([QEMU_IMG, "convert", "-p", src, "-O", _fmt(dst_fmt), dst],
                             stderr_path=log.name, error=QemuImgError)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if cancel is not None and cancel.is_set():
                    raise QemuImgError("qemu-img convert: cancelled")
                if time.monotonic() > deadline:
                    raise QemuImgError(f"qemu-img convert: timed out after {timeout:g}s")
                if progress is not None:
                    found = PROGRESS.findall(Path(log.name).read_bytes()[-256:])
                    if found:
                        progress(float(found[-1]))
                time.sleep(0.1)
        finally:
            command.stop(proc, grace=0, kill_wait=60.0)
        output = Path(log.name).read_bytes()
    if proc.returncode != 0:
        lines = [ln.strip() for ln in PROGRESS.sub(b"", output).decode(errors="replace")
                 .splitlines() if ln.strip()]
        raise QemuImgError(f"qemu-img convert failed: {lines[-1] if lines else proc.returncode}")
    if progress is not None:
        progress(100.0)
