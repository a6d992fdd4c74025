"""The supervised qemu-storage-daemon: real QSD, real libnbd, nbdinfo as an outside client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.errors import Conflict, InvalidArgument, NotFound
from gateway.nbd.client import NBDClient, NBDError
from gateway.nbd.nodes import ExportSpec, node_names
from gateway.nbd.qsd import StorageDaemon

MIB = 1 << 20


def make_raw(path: Path, size: int = 4 * MIB) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[StorageDaemon]:
    sd = StorageDaemon(tmp_path / "run", lambda: [])
    pids: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sd.run)
            yield sd
            pids = [p for p in [sd.pid] if p is not None]
            nursery.cancel_scope.cancel()
    finally:
        for pid in pids:  # the supervisor's own teardown must have stopped it
            assert not alive(pid), "qemu-storage-daemon left running"


def assert_never_probed(sd: StorageDaemon) -> None:
    for argv in sd.argvs:
        joined = " ".join(argv)
        assert "-drive" not in argv and "--blockdev" not in argv and "--export" not in argv
        assert "file=" not in joined and "format" not in joined
    adds = [args for cmd, args in sd.sent if cmd == "blockdev-add"]
    assert adds, "nothing was added"
    for args in adds:
        assert args.get("driver") in ("file", "host_device", "raw", "qcow2"), args
        assert isinstance(args.get("file", ""), str), "child nodes must be named, not inline"
        if args["driver"] == "qcow2":
            assert "backing" in args and args["backing"] is None
            assert json.dumps(args).count('"backing": null') == 1
        if args["driver"] in ("file", "host_device"):
            assert args["locking"] == "on"
        assert args["auto-read-only"] is False


@pytest.mark.timeout(30)
async def test_start_export_and_no_probing(daemon: StorageDaemon, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "a.raw")
    qcow = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    uri = await daemon.export(ExportSpec("vol-a", str(raw), "raw", read_only=False))
    assert uri == f"nbd+unix:///vol-a?socket={daemon.nbd_path}"
    await daemon.export(ExportSpec("0q", str(qcow), "qcow2", read_only=True))
    assert daemon.exported() == {"vol-a", "0q"}
    info = json.loads(subprocess.run(["nbdinfo", "--json", daemon.uri("0q")],
                                     capture_output=True, check=True).stdout)
    export = info["exports"][0]
    assert export["is_read_only"] is True and export["export-size"] == 4 * MIB
    assert export["can_multi_conn"] is True
    ro_adds = [a for c, a in daemon.sent if c == "blockdev-add" and a["read-only"]]
    assert {a["driver"] for a in ro_adds} == {"file", "qcow2"}
    assert_never_probed(daemon)
    assert daemon.health()["ready"] is True and daemon.health()["restarts"] == 0


@pytest.mark.timeout(30)
async def test_export_unexport_idempotence_and_unknown(daemon: StorageDaemon,
                                                       tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "b.raw")
    spec = ExportSpec("b", str(raw), "raw", read_only=True)
    uri1 = await daemon.export(spec)
    n_sent = len(daemon.sent)
    assert await daemon.export(spec) == uri1
    assert len(daemon.sent) == n_sent, "a repeated export must not touch QSD"
    with pytest.raises(Conflict):
        await daemon.export(ExportSpec("b", str(raw), "raw", read_only=False))
    await daemon.unexport("b")
    assert daemon.exported() == set()
    with pytest.raises(NotFound):
        await daemon.unexport("b")
    await daemon.unexport("b", missing_ok=True)
    with pytest.raises(NotFound):
        daemon.uri("nope")
    with pytest.raises(NotFound):
        await daemon.unexport("nope")
    # teardown order: export deleted (event awaited), then the nodes top-down
    tail = [c for c, _ in list(daemon.sent)[-3:]]
    assert tail == ["block-export-del", "blockdev-del", "blockdev-del"]
    assert any(e.name == "BLOCK_EXPORT_DELETED" for e in daemon.events)
    # exporting again after removal works, and nbdinfo can no longer see a removed export
    assert await daemon.export(spec) == uri1
    await daemon.unexport("b")
    r = subprocess.run(["nbdinfo", uri1], capture_output=True)
    assert r.returncode != 0
    with pytest.raises(NBDError):
        async with NBDClient.open(uri1):
            pass


@pytest.mark.timeout(30)
async def test_bad_specs(daemon: StorageDaemon, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        ExportSpec("Bad Name", "/x", "raw", True)
    with pytest.raises(InvalidArgument):
        ExportSpec("ok", "relative", "raw", True)
    with pytest.raises(NotFound):
        await daemon.export(ExportSpec("ghost", str(tmp_path / "missing"), "raw", True))
    raw = make_raw(tmp_path / "r.raw")
    from gateway.errors import FormatError
    with pytest.raises(FormatError):
        await daemon.export(ExportSpec("notq", str(raw), "qcow2", True))
    assert daemon.exported() == set()
    # the failed attempts left no nodes behind: the same node names can be added again
    nodes = node_names(ExportSpec("notq", str(raw), "qcow2", True))
    await daemon.export(ExportSpec("notq", str(raw), "raw", True))  # names are free again
    assert nodes.fmt.startswith("gwf-")


@pytest.mark.timeout(30)
async def test_read_only_export_refuses_writes(daemon: StorageDaemon, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "ro.raw")
    before = raw.read_bytes()
    uri = await daemon.export(ExportSpec("ro", str(raw), "raw", read_only=True))
    async with NBDClient.open(uri) as c:
        assert c.read_only
        with pytest.raises(NBDError) as info:
            await c.write_at(0, b"x" * 512)
        assert info.value.errno is not None
        c.read_only = False  # bypass the client-side check: the server must refuse too
        with pytest.raises(NBDError):
            await c.write_at(0, b"x" * 512)
    r = subprocess.run(["nbdcopy", "--", "[", "nbdkit", "-s", "memory", "1M", "]", uri],
                       capture_output=True)
    assert r.returncode != 0
    assert raw.read_bytes() == before


@pytest.mark.timeout(30)
async def test_two_writable_exports_of_one_file_are_refused(daemon: StorageDaemon,
                                                            tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "shared.raw")
    await daemon.export(ExportSpec("w1", str(raw), "raw", read_only=False))
    # inside one QSD every export shares all permissions, so the gateway refuses it itself
    with pytest.raises(Conflict, match="in use"):
        await daemon.export(ExportSpec("w2", str(raw), "raw", read_only=False))
    with pytest.raises(Conflict, match="in use"):
        await daemon.export(ExportSpec("r2", str(tmp_path / "." / "shared.raw"), "raw", True))
    # qemu's image lock on a raw export only keeps out resizes (an NBD export shares write!)
    r = subprocess.run(["qemu-img", "resize", "-f", "raw", raw, "8M"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "lock" in r.stderr
    # a qcow2 node does not share writes on its file: qemu's lock refuses the second one
    qcow = tmp_path / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "1M"], check=True)
    await daemon.export(ExportSpec("q1", str(qcow), "qcow2", read_only=False))
    r = subprocess.run(["qemu-img", "info", "-f", "qcow2", qcow], capture_output=True, text=True)
    assert r.returncode != 0 and "lock" in r.stderr
    daemon._specs.pop("q1")  # hide it from the gateway's own check to reach qemu's lock
    try:
        with pytest.raises(Conflict, match="lock"):
            await daemon.export(ExportSpec("q2", str(qcow), "qcow2", read_only=False))
    finally:
        daemon._specs["q1"] = ExportSpec("q1", str(qcow), "qcow2", read_only=False)
    assert daemon.exported() == {"w1", "q1"}


@pytest.mark.timeout(60)
async def test_kill_9_restarts_and_keeps_flushed_writes(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "k.raw")
    ro_raw = make_raw(tmp_path / "k2.raw")
    desired = [ExportSpec("from-catalog", str(ro_raw), "raw", read_only=True)]
    sd = StorageDaemon(tmp_path / "run", lambda: desired)
    async with trio.open_nursery() as nursery:
        await nursery.start(sd.run)
        assert sd.exported() == {"from-catalog"}
        uri = await sd.export(ExportSpec("k", str(raw), "raw", read_only=False))
        async with NBDClient.open(uri) as c:
            payload = os.urandom(3 * MIB + 123)
            await c.write_at(4096, payload)
            await c.flush()
            old_pid = sd.pid
            assert old_pid is not None
            t0 = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            with pytest.raises(NBDError):  # the server went away under the client
                for _ in range(1000):
                    await c.read_at(0, 4096)
                    await trio.sleep(0.01)
            while not (sd.health()["ready"] and sd.pid not in (None, old_pid)):
                await trio.sleep(0.005)
            elapsed = time.monotonic() - t0
            print(f"restart+re-export took {elapsed * 1000:.0f} ms "
                  f"(supervisor measured {sd.last_restart_seconds})")
            assert elapsed < 5
            assert sd.restarts == 1 and not alive(old_pid)
            assert sd.exported() == {"from-catalog", "k"}
            await c.reconnect()
            assert await c.read_at(4096, len(payload)) == payload
        assert raw.read_bytes()[4096:4096 + len(payload)] == payload
        assert_never_probed(sd)
        pid = sd.pid
        nursery.cancel_scope.cancel()
    assert pid is not None and not alive(pid)


@pytest.mark.timeout(30)
async def test_cancellation_leaves_no_process_and_stale_state_is_cleaned(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a stale QSD from a "crashed gatewayd", plus stale sockets
    qmp_path = run_dir / "qsd.qmp"
    stale = subprocess.Popen(
        ["qemu-storage-daemon", "--chardev",
         f"socket,id=gwqmp,path={qmp_path},server=on,wait=off",
         "--monitor", "chardev=gwqmp,mode=control", "--pidfile", str(run_dir / "qsd.pid")],
        start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (run_dir / "qsd.pid").exists() and (run_dir / "qsd.pid").read_text().strip():
                break
            time.sleep(0.01)
        (run_dir / "nbd.sock").write_text("stale")
        sd = StorageDaemon(run_dir, lambda: [])
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(sd.run)
                assert stale.poll() is not None or not alive(stale.pid)
                pid = sd.pid
                assert pid is not None and pid != stale.pid
                await sd.export(ExportSpec("x", str(make_raw(tmp_path / "x.raw")), "raw", True))
                nursery.cancel_scope.cancel()
        assert pid is not None and not alive(pid)
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()
