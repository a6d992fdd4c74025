"""A long-running QSD supervisor keeps no history: its log of QMP commands holds the newest
SENT_LIMIT (for tests and audits), and events are kept only by whoever watches for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.nbd.nodes import ExportSpec
from gateway.nbd.qmp_trio import SENT_LIMIT, QMPClient
from gateway.nbd.qsd import StorageDaemon

pytestmark = pytest.mark.timeout(60)


async def test_the_command_log_is_bounded(qsd: StorageDaemon, tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(1 << 20))
    spec = ExportSpec("a", str(raw), "raw", read_only=True)
    rounds = 0
    while rounds < 5 or len(qsd.sent) < SENT_LIMIT:
        await qsd.export(spec)
        await qsd.unexport("a")
        rounds += 1
    for _ in range(5):  # past the limit: the log stays full, its newest entries last
        await qsd.export(spec)
        await qsd.unexport("a")
    assert len(qsd.sent) == SENT_LIMIT
    assert [c for c, _ in list(qsd.sent)[-3:]] == ["block-export-del", "blockdev-del",
                                                   "blockdev-del"]
    assert len(qsd.argvs) == 1 and len(qsd.events) <= 100
    client = await qsd.wait_ready()
    assert client.sent is qsd.sent
    assert not hasattr(client, "events") and not hasattr(client, "events_send")
    assert isinstance(client, QMPClient)
