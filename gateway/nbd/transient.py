"""A private, read-only, one-volume export for tools that run without gatewayd.

    async with transient_export(spec, workdir) as client:
        header = await client.read_at(0, 512)

Starts its own qemu-storage-daemon in `workdir` (no restarts), exports `spec` read-only with its
pinned format, yields a connected NBDClient and stops the daemon on exit, leaving no process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from gateway.nbd.client import NBDClient
from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qsd import StorageDaemon


@asynccontextmanager
async def transient_export(spec: ExportSpec, workdir: Path) -> AsyncIterator[NBDClient]:
    ro = dataclasses.replace(spec, read_only=True)
    daemon = StorageDaemon(Path(workdir), lambda: (), restart=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            await daemon.export(ro)
            async with NBDClient.open(str(daemon.nbd_path), ro.name) as client:
                yield client
        finally:
            nursery.cancel_scope.cancel()
