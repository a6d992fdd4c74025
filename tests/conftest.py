from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from gateway.nbd.qsd import StorageDaemon
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, build_image_set


@pytest.fixture(scope="session")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageSet]:
    """The standard busybox images, built once per test session (read-only: copy before writing)."""
    yield build_image_set(tmp_path_factory.mktemp("images"))


@pytest.fixture
def gatewayd(tmp_path: Path) -> Iterator[Daemon]:
    """A running gatewayd with private state and run dirs, stopped (and checked) afterwards."""
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "gatewayd.log", extra_args=["--libvirt-uri", ""])
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        leaked = daemon.cleanup()
        assert code == 0, f"gatewayd exited {code}:\n{daemon.log_tail()}"
        assert not leaked, f"leaked: {leaked}"


@pytest.fixture
async def qsd(tmp_path: Path) -> AsyncIterator[StorageDaemon]:
    """A running qemu-storage-daemon supervisor with no exports, stopped afterwards."""
    daemon = StorageDaemon(tmp_path / "run", lambda: [])
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        yield daemon
        nursery.cancel_scope.cancel()
