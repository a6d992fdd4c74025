"""`gatewayctl probe-image`: probe an image file without a daemon, with its format pinned.

A raw image is read directly. A qcow2 image is read through a private, read-only
qemu-storage-daemon export whose qcow2 node has no backing file, so qemu does the format work and
nothing is ever probed. The header inspector runs first, so a file that is not what the caller
declared is refused before any tool opens it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import trio

from gateway.probe.core import probe_file, probe_reader_async
from gateway.volumes.register import examine


def probe_image(path: str, fmt: str) -> dict[str, Any]:
    volume = examine("probe", path, fmt, read_only=True)
    if volume.format == "raw":
        return probe_file(volume.path).to_json()
    return trio.run(_probe_qcow2, volume.path, volume.block_device)


async def _probe_qcow2(path: str, block_device: bool) -> dict[str, Any]:
    from gateway.nbd.nodes import ExportSpec
    from gateway.nbd.transient import transient_export
    spec = ExportSpec(name="probe", path=path, fmt="qcow2", read_only=True,
                      block_device=block_device)
    workdir = Path(tempfile.mkdtemp(prefix="sgw-probe-"))
    try:
        async with transient_export(spec, workdir) as client:
            result = await probe_reader_async(client.read_at, client.size)
        return result.to_json()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
