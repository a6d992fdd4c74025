"""The block view over the real NBD client and qemu-storage-daemon (qcow2), with a bind attach.

The attach runs in a worker thread: this process serves FUSE on its trio thread.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.attach import attachment
from gateway.fuse.blockview import BlockView
from gateway.nbd.client import NBDClient
from gateway.testing.images import MARKER, MIB, ImageSet, copy_image


@pytest.fixture
def qsd(tmp_path: Path, image_set: ImageSet) -> Iterator[Path]:
    img = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "vol.qcow2")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={img},node-name=file0",
         "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=fmt0,name=vol,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert sock.exists(), proc.stderr.read() if proc.stderr else b""
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(90)
async def test_block_view_over_nbd(qsd: Path, image_set: ImageSet, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "blk").mkdir(parents=True)
    expected = image_set.path("gpt", "raw").read_bytes()
    view = BlockView()
    async with NBDClient.open(str(qsd), "vol") as client, trio.open_nursery() as nursery:
        await nursery.start(view.run, run_dir / "blk")
        view.add_volume("vol", client)
        view.set_window("vol", MIB, 64 * MIB)
        rootfs = run_dir / "blk" / "vol" / "rootfs"
        data = await trio.to_thread.run_sync(rootfs.read_bytes)
        assert data == expected[MIB:MIB + 64 * MIB]
        await trio.to_thread.run_sync(attachment.prepare_rootfs_root, run_dir)
        try:
            att = await trio.to_thread.run_sync(
                lambda: attachment.attach_bind(run_dir, "vol", "ext4"))
            try:
                marker = await trio.to_thread.run_sync((att.rootfs / "etc" / "marker").read_text)
                assert marker == MARKER
            finally:
                await trio.to_thread.run_sync(attachment.detach, att)
        finally:
            def cleanup() -> None:
                try:
                    attachment.sweep(run_dir, block_view=False)
                finally:
                    attachment.release_rootfs_root(run_dir)

            await trio.to_thread.run_sync(cleanup)
        await view.remove_volume("vol")
        await client.flush()
        nursery.cancel_scope.cancel()
    assert attachment.leftovers(run_dir, "vol") == []
