"""The block view as the export and rootfs managers use it, wherever it runs.

Implementations: gateway.dataplane.view.RemoteView (the data-plane process: what gatewayd
uses) and gateway.dataplane.view.LocalView (an in-process BlockView, for tests and tools).
"""

from __future__ import annotations

from typing import Protocol


class View(Protocol):
    async def plug(self, name: str, socket: str, export: str) -> None:
        """Connect to the NBD `export` on `socket` and show it as NAME/disk (idempotent)."""

    async def unplug(self, name: str, *, force: bool = False) -> None:
        """Remove NAME; refused (Conflict) while its files are open, unless `force`."""

    async def set_window(self, name: str, start: int, size: int) -> None:
        """Show bytes [start, start+size) of NAME's disk as NAME/rootfs."""

    async def close_window(self, name: str) -> None:
        """Remove NAME/rootfs, once nothing holds it open."""

    async def writes(self, name: str) -> int:
        """Write requests NAME's disk has served so far (standby caches compare it)."""

    def window(self, name: str) -> tuple[int, int] | None:
        """NAME's window as last set, or None."""

    def volumes(self) -> list[str]:
        """The plugged volumes."""
