"""Issue 18: snapshots and saved images of volumes, made inside QSD, formats pinned on both sides.

- The seed scenario, in process (so that what was sent to QSD and every qemu-img command line
  can be read): a raw volume whose first bytes are a qcow2 header naming a host file with a
  secret, snapshotted and saved to raw and to qcow2. No output holds the secret; raw outputs are
  byte-identical to the volume, qcow2 outputs compare equal with explicit formats; every node
  names its driver, qcow2 nodes have no backing, every qemu-img names its format.
- Through a real gatewayd: snapshots of a bind mount (frozen, then thawed; its length in the
  job and in metrics) and of a fuse mount (crash-consistent, checked before its first fuse
  mount), a cancel in the middle of a slow copy (no partial file, no catalog row, a thawed
  filesystem, nothing left in QSD), and the output rules of `volume save`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import command
from gateway.admin import client
from gateway.admin.gateway import Gateway
from gateway.nbd.backup import HELD_SPEED, BackupTarget, run_backup
from gateway.nbd.nodes import ExportSpec, node_names
from gateway.nbd.qsd import StorageDaemon
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, MIB, ImageSet, copy_image, make_fs_image
from tests.conftest import InProcessGateway

SECRET = b"SNAPSHOT-SEED-HOST-SECRET-0123456789"


def evil_image(tmp_path: Path) -> Path:
    """A file whose bytes are a valid qcow2 header naming a host secret as its backing file."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes((SECRET + b"\n") * (MIB // 64))
    evil = tmp_path / "images" / "evil.img"
    evil.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(evil), "1M"], check=True)
    with open(evil, "r+b") as f:  # whole sectors, as `volume add` wants (the header is intact)
        f.truncate(-(-os.path.getsize(evil) // 512) * 512)
    data = evil.read_bytes()
    assert data[:4] == b"QFI\xfb" and SECRET not in data and len(data) % 512 == 0
    return evil


def compare(raw: Path, qcow2: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw),
                           str(qcow2)], capture_output=True, text=True, timeout=60)


def backing_of(qcow2: Path) -> object:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(qcow2)],
        capture_output=True, text=True, check=True, timeout=30).stdout)
    return info.get("backing-filename")


# ---- in process: what is sent ------------------------------------------------------------------


@pytest.fixture
def gateways(monkeypatch: pytest.MonkeyPatch) -> list[Gateway]:
    """The Gateway objects an in-process gatewayd completes (to read its QSD's command log)."""
    seen: list[Gateway] = []
    original = Gateway.attach

    def attach(self: Gateway, components: Any) -> None:
        seen.append(self)
        original(self, components)
    monkeypatch.setattr(Gateway, "attach", attach)
    return seen


@pytest.fixture
def qemu_img_argvs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every qemu-img command line run in this process (gatewayd's worker threads included)."""
    seen: list[list[str]] = []
    lock = threading.Lock()
    run = command.run

    def recording(argv: Any, *args: Any, **kwargs: Any) -> Any:
        words = [os.fspath(a) for a in argv]
        if words and os.path.basename(words[0]) == "qemu-img":
            with lock:
                seen.append(words)
        return run(argv, *args, **kwargs)
    monkeypatch.setattr(command, "run", recording)
    return seen


async def run_job(gw: InProcessGateway, op: str, args: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = await gw.call(op, args)
    with trio.fail_after(60):
        while job["state"] == "running":
            await trio.sleep(0.05)
            job = await gw.call("job-status", {"id": job["job"]})
    assert job["state"] == "done", job
    return job


@pytest.mark.timeout(120)
async def test_seed_snapshots_and_saves_are_the_volume_bytes_and_never_the_secret(
        in_process_gateway: InProcessGateway, gateways: list[Gateway],
        qemu_img_argvs: list[list[str]], tmp_path: Path) -> None:
    gw = in_process_gateway
    await gw.start()
    evil = evil_image(tmp_path)
    own = evil.read_bytes()
    await gw.call("volume-add", {"name": "evil", "path": str(evil), "format": "raw"})
    out = tmp_path / "out"
    out.mkdir()
    snaps = {fmt: (await run_job(gw, "volume-snapshot", {"name": "evil", "to": f"s-{fmt}",
                                                         "format": fmt}))["result"]
             for fmt in ("raw", "qcow2")}
    saves = {}
    for fmt, compress in (("raw", False), ("qcow2", False), ("qcow2", True)):
        target = out / f"evil-{fmt}{'-z' if compress else ''}.img"
        job = await run_job(gw, "volume-save", {"name": "evil", "file": str(target),
                                                "format": fmt, "compress": compress})
        assert job["result"]["file"] == str(target) and job["result"]["consistency"] == "unmounted"
        saves[target] = fmt

    def check_files() -> None:
        for fmt, volume in snaps.items():
            assert volume["origin"] == "snapshot" and volume["format"] == fmt
            assert volume["lineage"]["snapshot_of"] == "evil"
            assert volume["lineage"]["consistency"] == "unmounted"
            assert volume["virtual_size"] == len(own)
        outputs = {Path(v["path"]): fmt for fmt, v in snaps.items()} | saves
        for path, fmt in outputs.items():
            data = path.read_bytes()
            assert SECRET not in data, path
            if fmt == "raw":
                assert data == own, path
            else:
                assert backing_of(path) is None, path
                done = compare(evil, path)
                assert done.returncode == 0, (path, done.stdout, done.stderr)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saves)  # no partial
    await gw.blocking(check_files)

    # a raw snapshot is pinned raw too: exported, it serves its own bytes, not the secret
    exported = await gw.call("export", {"name": "s-raw"})
    served = await gw.blocking(lambda: subprocess.run(
        ["nbdcopy", exported["uri"], "-"], capture_output=True, timeout=60, check=True).stdout)
    assert served == own
    await gw.call("unexport", {"name": "s-raw"})

    # what was actually sent: explicit drivers, no backing, full copies from the pinned node
    (gateway,) = gateways
    sent = list(gateway.qsd.sent)
    adds = {a["node-name"]: a for c, a in sent if c == "blockdev-add"}
    assert adds and {a["driver"] for a in adds.values()} <= {"file", "raw", "qcow2"}
    for args in adds.values():
        if args["driver"] == "qcow2":
            assert "backing" in args and args["backing"] is None, args
        if args["driver"] in ("raw", "qcow2"):
            assert adds[args["file"]]["driver"] == "file", args
    backups = [a for c, a in sent if c == "blockdev-backup"]
    assert len(backups) == 5
    source = node_names(ExportSpec("evil", str(evil), "raw", read_only=False)).fmt
    for args in backups:
        assert args["sync"] == "full"
        assert args["device"] == source and adds[source]["driver"] == "raw"  # as pinned
        assert adds[args["target"]]["driver"] in ("raw", "qcow2")
    assert [a["compress"] for a in backups] == [False, False, False, False, True]
    # every qemu-img names the format of what it writes (nothing is read by qemu-img here)
    assert len(qemu_img_argvs) == 5
    for argv in qemu_img_argvs:
        assert argv[1] == "create" and argv[argv.index("-f") + 1] in ("raw", "qcow2"), argv
        assert not {"-b", "-F", "-o"} & set(argv), argv


# ---- through a real gatewayd -------------------------------------------------------------------


def ctl_json(gw: Daemon, *args: str) -> Any:
    """A command's JSON answer (a job's: the last of its JSON lines, the finished job)."""
    out = gw.ctl(*args, "--json", check=True).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


def e2fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(180)
def test_snapshots_of_mounted_volumes_bind_frozen_fuse_crash_consistent(
        gatewayd: Daemon, image_set: ImageSet, tmp_path: Path) -> None:
    gw = gatewayd
    image = copy_image(image_set.path("none", "qcow2"), tmp_path / "v.qcow2")
    gw.ctl("volume", "add", "v", str(image), "--format", "qcow2", "--noexec", check=True)
    rootfs = Path(gw.ctl("mount", "v", check=True).stdout.strip())
    (rootfs / "root" / "bind").write_text("written in bind mode\n")
    job = ctl_json(gw, "volume", "snapshot", "v", "--to", "s-bind", "--format", "raw")
    lineage = job["result"]["lineage"]
    assert job["kind"] == "snapshot" and job["state"] == "done"
    assert lineage["snapshot_of"] == "v" and lineage["consistency"] == "frozen"
    assert isinstance(lineage["freeze_ms"], float) and lineage["freeze_ms"] > 0
    assert job["result"]["noexec"] is True and job["result"]["nosuid"] is True
    # thawed: the source takes writes at once
    subprocess.run(["sh", "-c", f"echo after > {rootfs}/root/after && sync {rootfs}/root/after"],
                   check=True, timeout=60)
    metrics = gw.ctl("metrics", check=True).stdout
    assert "gateway_snapshot_freeze_seconds_count 1.0" in metrics
    assert 'gateway_snapshots_total{consistency="frozen"} 1.0' in metrics
    gw.ctl("umount", "v", check=True)

    rootfs = Path(gw.ctl("mount", "v", "--mode", "fuse", check=True).stdout.strip())
    (rootfs / "root" / "fuse").write_text("written in fuse mode\n")
    job = ctl_json(gw, "volume", "snapshot", "v", "--to", "s-fuse")
    assert job["result"]["lineage"]["consistency"] == "crash-consistent"
    assert job["result"]["lineage"]["freeze_ms"] is None
    assert job["result"]["format"] == "qcow2"
    gw.ctl("umount", "v", check=True)

    # the frozen snapshot is a clean filesystem; both mount and show what was written
    assert (checked := e2fsck(Path(ctl_json(gw, "volume", "show", "s-bind")["path"]))) \
        .returncode == 0, checked.stdout
    snap = Path(gw.ctl("mount", "s-bind", check=True).stdout.strip())
    assert (snap / "etc" / "marker").read_text() == MARKER
    assert (snap / "root" / "bind").read_text() == "written in bind mode\n"
    assert not (snap / "root" / "after").exists()  # written after the instant
    gw.ctl("umount", "s-bind", check=True)
    snap = Path(gw.ctl("mount", "s-fuse", "--mode", "fuse", check=True).stdout.strip())
    assert (snap / "root" / "fuse").read_text() == "written in fuse mode\n"
    gw.ctl("umount", "s-fuse", check=True)


def big_volume(tmp_path: Path) -> Path:
    """A 96 MiB ext4 image holding 64 MiB of random data (a copy of it cannot skip zeros)."""
    tree = tmp_path / "tree"
    (tree / "root").mkdir(parents=True)
    with open(tree / "root" / "big", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MIB))
    image = make_fs_image(tmp_path / "images" / "big.raw", 96 * MIB, tree)
    shutil.rmtree(tree)
    return image


def start_job(gw: Daemon, op: str, args: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = client.call(gw.socket, op, args)
    deadline = time.monotonic() + 60
    while job["progress"] <= 0:  # the copy is under way
        assert job["state"] == "running", job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = client.call(gw.socket, "job-status", {"id": job["job"]})
    return job


def cancel(gw: Daemon, job: dict[str, Any]) -> dict[str, Any]:
    ended: dict[str, Any] = ctl_json(gw, "job", "cancel", job["job"])
    assert ended["state"] == "failed" and ended["error"]["code"] == "cancelled", ended
    assert ended["progress"] < 100, ended
    return ended


@pytest.fixture
def rooted(tmp_path: Path) -> Iterator[Daemon]:
    """A gatewayd whose allowed roots are tmp/images and tmp/out."""
    for sub in ("images", "out"):
        (tmp_path / sub).mkdir()
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "gatewayd.log",
                    extra_args=["--libvirt-uri", "", "--allowed-roots",
                                f"{tmp_path / 'images'}:{tmp_path / 'out'}"])
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        leaked = daemon.cleanup()
        assert code == 0, f"gatewayd exited {code}:\n{daemon.log_tail()}"
        assert not leaked, f"leaked: {leaked}"


@pytest.mark.timeout(180)
def test_cancel_mid_copy_leaves_nothing_and_a_thawed_filesystem(rooted: Daemon,
                                                                tmp_path: Path) -> None:
    gw = rooted
    image = big_volume(tmp_path)
    gw.ctl("volume", "add", "big", str(image), "--format", "raw", check=True)
    rootfs = Path(gw.ctl("mount", "big", check=True).stdout.strip())
    volumes = tmp_path / "state" / "volumes"
    before = sorted(os.listdir(volumes)) if volumes.exists() else []

    job = start_job(gw, "volume-snapshot", {"name": "big", "to": "half", "format": "qcow2",
                                            "rate_limit": 4 * MIB})
    cancel(gw, job)
    assert sorted(os.listdir(volumes)) == before  # no partial file
    assert gw.ctl("volume", "show", "half").returncode != 0  # no catalog row
    assert "half" not in {v["name"] for v in json.loads(gw.ctl("volume", "ls", "--json",
                                                               check=True).stdout)}
    # thawed: a write and its fsync go through
    subprocess.run(["sh", "-c", f"echo after > {rootfs}/root/after && sync {rootfs}/root/after"],
                   check=True, timeout=60)

    out = tmp_path / "out" / "big.qcow2"
    job = start_job(gw, "volume-save", {"name": "big", "file": str(out), "format": "qcow2",
                                        "rate_limit": 4 * MIB})
    cancel(gw, job)
    assert os.listdir(tmp_path / "out") == []  # no partial output file

    # nothing stays in QSD: the volume's nodes go with its export, and the name is free again
    gw.ctl("umount", "big", check=True)
    gw.ctl("unexport", "big", check=True)
    ctl_json(gw, "volume", "snapshot", "big", "--to", "half")
    gw.ctl("volume", "rm", "half", check=True)
    gw.ctl("volume", "rm", "big", check=True)


@pytest.mark.timeout(180)
def test_a_stopping_gatewayd_stops_the_copies_and_leaves_no_partial_file(
        rooted: Daemon, tmp_path: Path) -> None:
    gw = rooted
    image = big_volume(tmp_path)
    gw.ctl("volume", "add", "big", str(image), "--format", "raw", check=True)
    gw.ctl("mount", "big", check=True)
    start_job(gw, "volume-snapshot", {"name": "big", "to": "half", "rate_limit": 4 * MIB})
    queued = client.call(gw.socket, "volume-save", {  # waits for the snapshot (the volume lock)
        "name": "big", "file": str(tmp_path / "out" / "big.raw"), "format": "raw",
        "rate_limit": 4 * MIB})
    assert queued["state"] == "running"
    assert gw.stop() == 0  # shutdown --all --force: the jobs stop, then the volume goes
    assert os.listdir(tmp_path / "out") == []
    assert [n for n in os.listdir(tmp_path / "state" / "volumes") if "half" in n] == []
    assert image.read_bytes()[:4096]  # the source is still there, and free again
    subprocess.run(["qemu-img", "info", "-f", "raw", str(image)], check=True,
                   capture_output=True, timeout=30)


@pytest.mark.timeout(120)
def test_save_writes_only_new_files_under_the_allowed_roots(rooted: Daemon,
                                                             tmp_path: Path) -> None:
    gw = rooted
    image = tmp_path / "images" / "v.raw"
    image.write_bytes(os.urandom(2 * MIB))
    gw.ctl("volume", "add", "v", str(image), "--format", "raw", check=True)
    out = tmp_path / "out"
    first = out / "v.raw"
    saved = ctl_json(gw, "volume", "save", "v", str(first), "--format", "raw")["result"]
    assert saved["bytes"] == 2 * MIB and first.read_bytes() == image.read_bytes()
    assert first.stat().st_mode & 0o777 == 0o600

    def refused(*args: str) -> str:
        proc = gw.ctl("volume", "save", "v", *args)
        assert proc.returncode != 0, proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    first.write_bytes(b"the admin's own file")
    assert "--force" in refused(str(first), "--format", "raw")
    assert first.read_bytes() == b"the admin's own file"
    ctl_json(gw, "volume", "save", "v", str(first), "--format", "qcow2", "--force")
    assert compare(image, first).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not to be touched")
    (out / "link").symlink_to(elsewhere)
    assert "not a regular file" in refused(str(out / "link"), "--format", "raw", "--force")
    (out / "dir").symlink_to(tmp_path)  # a directory link leading out of the roots
    assert "outside the allowed image roots" in refused(str(out / "dir" / "x.raw"), "--format",
                                                        "raw")
    assert elsewhere.read_bytes() == b"not to be touched"
    assert "outside the allowed image roots" in refused(str(tmp_path / "x.raw"), "--format",
                                                        "raw")
    assert "gateway's own" in refused(str(tmp_path / "run" / "x.raw"), "--format", "raw")
    assert "--compress needs --format qcow2" in refused(str(out / "z.raw"), "--format", "raw",
                                                        "--compress")
    assert sorted(p.name for p in out.iterdir()) == ["dir", "link", "v.raw"]


# ---- the freeze: bounded, always thawed -------------------------------------------------------


@pytest.fixture
def kernel_mount(tmp_path: Path) -> Iterator[Path]:
    """An ext4 image mounted through a loop device (as a bind-mode kernel mount is)."""
    image = make_fs_image(tmp_path / "fs.raw", 32 * MIB, None)
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True, timeout=60)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)


def write_and_sync(path: Path) -> None:
    subprocess.run(["sh", "-c", f"echo x >> {path} && sync {path}"], check=True, timeout=60)


@pytest.mark.timeout(60)
async def test_a_freeze_is_bounded_and_thawed_once(kernel_mount: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.errors import Conflict
    from gateway.host import freeze
    from gateway.volumes import snapshot

    monkeypatch.setattr(snapshot, "FREEZE_LIMIT", 0.3)
    held: list[float] = []
    instant = snapshot.Instant(kernel_mount, held.append)
    await instant.freeze()
    assert instant.frozen is not None
    with pytest.raises(Conflict, match="already frozen"):
        await trio.to_thread.run_sync(freeze.freeze, kernel_mount)
    # a writer waits while the filesystem is frozen, and goes on once the limit thaws it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, write_and_sync, kernel_mount / "f")
        await instant.bound()
    assert instant.by_limit and instant.at is None and instant.frozen is None
    assert len(held) == 1 and held[0] >= 0.3
    await instant.started()  # the job starting later thaws nothing twice
    await instant.thaw()
    assert len(held) == 1 and instant.at is not None
    assert (kernel_mount / "f").read_text() == "x\n"

    # the job started in time: thawed by the start, not by the limit
    instant = snapshot.Instant(kernel_mount, held.append)
    await instant.freeze()
    await instant.started()
    assert not instant.by_limit and len(held) == 2
    await trio.to_thread.run_sync(write_and_sync, kernel_mount / "f")


# ---- the backup job in a real QSD ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_run_backup_holds_its_start_and_never_leaves_a_job_behind(
        qsd: StorageDaemon, tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(32 * MIB))
    spec = ExportSpec("src", str(source), "raw", read_only=False)
    await qsd.export(spec)
    qmp = await qsd.wait_ready()
    node = node_names(spec).fmt

    def blank(path: Path) -> Path:
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(32 * MIB)],
                       check=True)
        return path

    # held: the job waits at HELD_SPEED until the instant's callback returns, then runs free
    held = await trio.to_thread.run_sync(blank, tmp_path / "held.raw")
    speeds: list[int] = []

    async def started() -> None:
        speeds.extend(j["speed"] for j in await qmp.execute("query-block-jobs"))
    await run_backup(qmp, node, BackupTarget("held", str(held), "raw"), on_started=started,
                     hold=True)
    assert speeds == [HELD_SPEED]
    assert ("block-job-set-speed", {"device": "held", "speed": 0}) in list(qsd.sent)
    assert await trio.to_thread.run_sync(held.read_bytes) == source.read_bytes()

    # the caller's own cancellation (gatewayd stopping) stops QSD's job too
    slow = await trio.to_thread.run_sync(blank, tmp_path / "slow.raw")
    target = BackupTarget("slow", str(slow), "raw", rate_limit=MIB)
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(run_backup, qmp, node, target,
                                             progress=done.append))
        with trio.fail_after(20):
            while not any(p > 0 for p in done):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert await qmp.execute("query-jobs") == []
    nodes = {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
    assert not set(target.nodes) & nodes
    assert ("block-job-cancel", {"device": "slow", "force": True}) in list(qsd.sent)
    await qsd.unexport("src")


# ---- async jobs ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_async_jobs_are_cancelled_through_their_event() -> None:
    from gateway.admin.jobs import JobTable
    from gateway.errors import Cancelled, InternalError

    table = JobTable()

    async def waits(progress: Any, cancel: trio.Event) -> dict[str, Any]:
        progress(40.0)
        await cancel.wait()
        raise Cancelled("stopped by the test")

    async def done(progress: Any, cancel: trio.Event) -> dict[str, Any]:
        return {"ok": True}

    async def ended(job_id: str) -> dict[str, Any]:
        with trio.fail_after(10):
            while (job := table.get(job_id)).state == "running":
                await trio.sleep(0.01)
        return job.to_json()

    async with trio.open_nursery() as nursery:
        await nursery.start(table.run)
        with pytest.raises(InternalError, match="not reserved"):
            table.start_async("snapshot", "new", done)
        table.reserve("new")
        first = table.start_async("snapshot", "new", waits)
        with trio.fail_after(10):
            while table.get(first.id).progress < 40:
                await trio.sleep(0.01)
        table.cancel(first.id)
        out = await ended(first.id)
        assert out["state"] == "failed" and out["error"] == {
            "code": "cancelled", "message": f"job {first.id} cancelled"}
        assert not table.is_reserved("new")  # released when the job ended
        second = table.start_async("save", "v", done, reserved=False)
        assert (await ended(second.id))["result"] == {"ok": True}
        third = table.start_async("save", "v", waits, reserved=False)
        table.halt_all()
        assert (await ended(third.id))["error"]["code"] == "cancelled"
        nursery.cancel_scope.cancel()
