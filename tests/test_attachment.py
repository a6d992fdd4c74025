"""Attachment steps over a block view served by a child process (real FUSE, loop, mount).

The child (`python -m tests.test_attachment serve ...`) serves the block view, so this process may
call mount, loop and fuse2fs freely; killing it with SIGKILL simulates a daemon crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.attach import attachment
from gateway.errors import Conflict, FormatError, GatewayError, InvalidArgument
from gateway.host import fuse2fs, loopdev, mounts
from gateway.testing.images import MARKER, MIB, ImageSet, copy_image

ROOT = Path(__file__).resolve().parent.parent


def window_of(table: str, path: Path) -> tuple[int, int]:
    return (MIB, 64 * MIB) if table != "none" else (0, path.stat().st_size)


@dataclass
class ViewProcess:
    run_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, volumes: dict[str, tuple[Path, int, int, bool]]) -> None:
        args = [f"{name}={path}:{start}:{size}:{'ro' if ro else 'rw'}"
                for name, (path, start, size, ro) in volumes.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_attachment", "serve", str(self.run_dir / "blk"),
             *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", line

    def stop(self) -> None:
        """Clean stop: closing stdin makes the child unmount and exit."""
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Env:
    run_dir: Path
    view: ViewProcess
    journal: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def record(self, step: str, detail: dict[str, object]) -> None:
        self.journal.append((step, dict(detail)))


def no_leaks(run_dir: Path) -> list[str]:
    """Mounts (except the shared rootfs root), loop devices and fuse2fs processes of run_dir."""
    found = [f"mount {m.mount_point}" for m in mounts.mountinfo()
             if m.mount_point.startswith(str(run_dir))
             and m.mount_point != str(run_dir / "rootfs")]
    found += [f"loop {d}" for d in loopdev.devices_backed_by(run_dir)]
    found += [f"fuse2fs {p}" for p in fuse2fs.processes_under(run_dir)]
    return found


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    run_dir = tmp_path / "run"
    (run_dir / "blk").mkdir(parents=True)
    attachment.prepare_rootfs_root(run_dir)
    view = ViewProcess(run_dir)
    try:
        yield Env(run_dir, view)
    finally:
        attachment.sweep(run_dir, block_view=False)
        view.stop()
        if view.proc is not None and view.proc.poll() is None:
            view.crash()
        attachment.sweep(run_dir)
        attachment.release_rootfs_root(run_dir)
        assert no_leaks(run_dir) == []
        assert not mounts.is_mountpoint(run_dir / "rootfs")


def start_view(env: Env, image_set: ImageSet, table: str, name: str = "vol",
               read_only: bool = False) -> Path:
    img = copy_image(image_set.path(table, "raw"), env.run_dir.parent / f"{name}.raw")
    start, size = window_of(table, img)
    env.view.start({name: (img, start, size, read_only)})
    return img


def read_marker(att: attachment.Attachment) -> str:
    return (att.rootfs / "etc" / "marker").read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("table", ["none", "mbr", "gpt"])
def test_bind_mode(env: Env, image_set: ImageSet, table: str) -> None:
    start_view(env, image_set, table)
    att = attachment.attach_bind(env.run_dir, "vol", "ext4", journal=env.record)
    assert read_marker(att) == MARKER
    assert [(s, d["phase"]) for s, d in env.journal] == [
        ("loop", "start"), ("loop", "done"), ("mount", "start"), ("mount", "done"),
        ("bind", "start"), ("bind", "done")]
    assert env.journal[1][1]["device"] == att.loop
    opts = mounts.mounts_at(att.rootfs)[0].options.split(",")
    assert "nodev" in opts and "nosuid" in opts
    attachment.detach(att)
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(60)
def test_a_standby_loop_outlives_the_umount_and_takes_the_next_mount(
        env: Env, image_set: ImageSet) -> None:
    start_view(env, image_set, "gpt")
    att = attachment.attach_bind(env.run_dir, "vol", "ext4", journal=env.record)
    device = att.loop
    standby = attachment.detach(att, keep_loop=True)
    assert standby is not None and standby.device == device
    assert not mounts.mounts_under(env.run_dir / "mnt")
    assert attachment.leftovers(env.run_dir, "vol") == [
        f"loop {device} on {env.run_dir / 'blk' / 'vol' / 'rootfs'}"]
    assert attachment.leftovers(env.run_dir, "vol", keep=device) == []
    env.journal.clear()
    again = attachment.attach_bind(env.run_dir, "vol", "ext4", journal=env.record,
                                   standby=standby, standby_cache=True)
    assert again.loop == device and standby.fd == -1  # the mount holds it now
    assert env.journal[0][1]["standby"] == device and env.journal[1][1]["cache"] is True
    assert read_marker(again) == MARKER
    attachment.detach(again)  # no keep_loop: auto-clear frees it with the umount
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(60)
def test_no_standby_while_the_filesystem_is_mounted_elsewhere(env: Env, image_set: ImageSet,
                                                              tmp_path: Path) -> None:
    start_view(env, image_set, "gpt")
    att = attachment.attach_bind(env.run_dir, "vol", "ext4")
    elsewhere = tmp_path / "elsewhere"  # as a container's namespace would keep it
    elsewhere.mkdir()
    mounts.bind(env.run_dir / "mnt" / "vol", elsewhere)
    try:
        with pytest.raises(GatewayError):
            attachment.detach(att, keep_loop=True)  # the device stays busy: no standby
    finally:
        mounts.umount(elsewhere)
    assert att.loop is not None and loopdev.wait_released(att.loop)
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(60)
def test_a_failed_mount_on_a_standby_frees_it(env: Env, image_set: ImageSet) -> None:
    start_view(env, image_set, "gpt")
    standby = attachment.detach(attachment.attach_bind(env.run_dir, "vol", "ext4"),
                                keep_loop=True)
    assert standby is not None
    with pytest.raises(GatewayError):
        attachment.attach_bind(env.run_dir, "vol", "xfs", standby=standby)  # not an xfs
    assert standby.fd == -1
    assert loopdev.wait_released(standby.device)
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("table", ["none", "gpt"])
def test_fuse_mode(env: Env, image_set: ImageSet, table: str) -> None:
    start_view(env, image_set, table)
    att = attachment.attach_fuse(env.run_dir, "vol", "ext4", journal=env.record,
                                 stderr_path=str(env.run_dir.parent / "fuse2fs.log"))
    assert read_marker(att) == MARKER
    assert env.journal[-1] == ("fuse2fs", {"phase": "done", "pid": att.fuse2fs_pid,
                                           "target": str(att.rootfs)})
    m = mounts.mounts_at(att.rootfs)[0]
    assert m.fstype.startswith("fuse") and "nodev" in m.options.split(",")
    attachment.detach(att)
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(30)
def test_fuse_mode_refuses_other_fs(env: Env) -> None:
    with pytest.raises(FormatError, match="xfs"):
        attachment.attach_fuse(env.run_dir, "vol", "xfs", journal=env.record)
    with pytest.raises(InvalidArgument, match="vfat"):
        attachment.attach_bind(env.run_dir, "vol", "vfat", journal=env.record)
    assert env.journal == []


def extract_fs(img: Path, table: str, out: Path) -> Path:
    start, size = window_of(table, img)
    with open(img, "rb") as src, open(out, "wb") as dst:
        src.seek(start)
        dst.write(src.read(size))
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("mode", "table"), [("bind", "mbr"), ("fuse", "gpt"), ("fuse", "none")])
def test_write_persists_and_fsck_clean(env: Env, image_set: ImageSet, mode: str,
                                       table: str) -> None:
    img = start_view(env, image_set, table)
    attach = attachment.attach_bind if mode == "bind" else attachment.attach_fuse
    att = attach(env.run_dir, "vol", "ext4", journal=env.record)
    payload = f"written in {mode} mode\n".encode()
    with open(att.rootfs / "root" / "note", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    attachment.detach(att)
    env.view.stop()
    fs = extract_fs(img, table, env.run_dir.parent / "fs.ext4")
    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    cat = subprocess.run(["debugfs", "-R", "cat /root/note", str(fs)], capture_output=True)
    assert cat.stdout == payload


@pytest.mark.timeout(60)
def test_read_only_bind(env: Env, image_set: ImageSet) -> None:
    start_view(env, image_set, "gpt", read_only=True)
    att = attachment.attach_bind(env.run_dir, "vol", "ext4", journal=env.record, read_only=True)
    assert read_marker(att) == MARKER
    with pytest.raises(OSError):
        (att.rootfs / "root" / "x").write_text("nope")
    attachment.detach(att)


@pytest.mark.timeout(60)
def test_teardown_refuses_busy_mount_without_force(env: Env, image_set: ImageSet) -> None:
    start_view(env, image_set, "mbr")
    att = attachment.attach_bind(env.run_dir, "vol", "ext4", journal=env.record)
    held = open(att.rootfs / "etc" / "marker", "rb")
    try:
        with pytest.raises(Conflict):
            attachment.detach(att)
    finally:
        held.close()
    attachment.detach(att)
    assert attachment.leftovers(env.run_dir, "vol") == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_reconcile_after_daemon_crash(env: Env, image_set: ImageSet, mode: str) -> None:
    start_view(env, image_set, "gpt")
    attach = attachment.attach_bind if mode == "bind" else attachment.attach_fuse
    att = attach(env.run_dir, "vol", "ext4", journal=env.record)
    assert read_marker(att) == MARKER
    (att.rootfs / "root" / "unsynced").write_bytes(b"d" * 65536)  # dirty data at crash time
    env.view.crash()
    assert attachment.leftovers(env.run_dir, "vol") != []
    report = attachment.reconcile(env.run_dir, "vol", env.journal)
    print(report)
    assert report.remaining == [] and report.errors == []
    assert report.found and report.done
    swept = attachment.sweep(env.run_dir)
    print(swept)
    assert swept.remaining == [] and swept.errors == []
    assert any("stale block view" in f for f in swept.found)
    assert no_leaks(env.run_dir) == []


@pytest.mark.timeout(60)
def test_sweep_without_journal(env: Env, image_set: ImageSet) -> None:
    start_view(env, image_set, "none")
    attachment.attach_bind(env.run_dir, "vol", "ext4")
    report = attachment.sweep(env.run_dir)
    assert report.remaining == [f"live block view at {env.run_dir / 'blk'} (not touched)"]
    assert report.errors == []
    assert attachment.leftovers(env.run_dir, "vol") == []


# ---- the block view server used by these tests ------------------------------------------------

def _serve(mountpoint: str, specs: list[str]) -> None:
    import trio

    from gateway.fuse.backend import FileBackend
    from gateway.fuse.blockview import BlockView

    async def main() -> None:
        view = BlockView()
        async with trio.open_nursery() as nursery:
            await nursery.start(view.run, mountpoint)
            for spec in specs:
                name, rest = spec.split("=", 1)
                path, start, size, mode = rest.rsplit(":", 3)
                view.add_volume(name, FileBackend(path, read_only=mode == "ro"))
                view.set_window(name, int(start), int(size))
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2], sys.argv[3:])
