"""Shared fixtures, and the markers that say what a test needs.

Markers (registered in pyproject.toml) are applied here, by module or by fixture, so that test
files need not repeat them:

- `integration`: runs gatewayd or libvirtd as a process, or takes long. `make test-fast` runs
  `-m "not integration"`: pure cores and in-process tests.
- `root`, `fuse`, `libvirtd`, `clang`: a test skips, saying why, on a host without root,
  /dev/fuse, a libvirtd binary or clang.
- `soak`: tests/soak runs only when named (`make soak`), never in `make test`.

`in_process_gateway` runs gatewayd's own `serve` on the test's trio loop (no gatewayd process),
so a test may set the clock: trio's MockClock drives the export linger and its retirement.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import trio

from gateway.admin.client import call as admin_call
from gateway.config import Settings
from gateway.errors import DaemonUnavailable, InvalidArgument
from gateway.nbd.qsd import StorageDaemon
from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, build_image_set

TESTS = Path(__file__).resolve().parent
SOAK = TESTS / "soak"
T = TypeVar("T")

# What each requirement marker checks, and the reason a test skips without it.
REQUIREMENTS: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0,
             "not root: the test mounts, attaches loop devices or serves the block view"),
    "fuse": (lambda: os.path.exists("/dev/fuse"), "no /dev/fuse on this host"),
    "libvirtd": (lambda: shutil.which("libvirtd") is not None
                 or os.path.exists("/usr/sbin/libvirtd"), "no libvirtd binary on this host"),
    "clang": (lambda: shutil.which("clang") is not None, "no clang on this host"),
}

GATEWAYD = ("integration", "root", "fuse")  # a gatewayd process: mounts, loop devices, FUSE
# Marks by module, for what the rules below do not see.
MODULE_MARKS: dict[str, tuple[str, ...]] = {
    "test_attachment": GATEWAYD,  # real attach/detach, with a server process of its own
    "test_bench_smoke": GATEWAYD,
    "test_blockview": ("root", "fuse"),
    "test_blockview_nbd": ("root", "fuse"),
    "test_dataplane": GATEWAYD,
    "test_e2e_lxc": (*GATEWAYD, "libvirtd"),
    "test_export_linger": ("root", "fuse"),  # an in-process gateway
    "test_lifecycle_lxc": (*GATEWAYD, "libvirtd"),
    "test_lifecycle_pools": (*GATEWAYD, "libvirtd"),
    "test_loop": ("root",),
    "test_lxc_libvirt": ("integration", "root", "libvirtd"),
    "test_mounts": ("root",),
    "test_packaging": ("integration",),  # builds a wheel and a virtualenv
    "test_probe": ("root",),  # loop devices for LVM, LUKS and 4K-sector images
    "test_probe_native": ("integration", "root", "clang"),  # loop-made images; a libFuzzer run
    "test_rss": ("integration", "soak", "root", "fuse"),
}


def _uses_gatewayd_process(module: ModuleType | None) -> bool:
    """A module that imports the gatewayd process harness runs gatewayd as a process (unless
    MODULE_MARKS says otherwise: then only its tests that take the `gatewayd` fixture do)."""
    return module is not None and getattr(module, "Daemon", None) is Daemon


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/soak only when a path inside it was named on the command line."""
    if collection_path != SOAK:
        return None
    base = config.invocation_params.dir
    named = [(base / arg.split("::")[0]).resolve() for arg in config.args]
    return not any(path == SOAK or SOAK in path.parents for path in named)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
        marks = set(MODULE_MARKS.get(name, ()))
        if name not in MODULE_MARKS and _uses_gatewayd_process(module):
            marks.update(GATEWAYD)
        if "gatewayd" in getattr(item, "fixturenames", ()):
            marks.update(GATEWAYD)
        if "libvirt_env" in getattr(item, "fixturenames", ()):
            marks.update(("integration", "root", "libvirtd"))
        if item.get_closest_marker("slow") is not None:
            marks.add("integration")
        for mark in sorted(marks):
            if item.get_closest_marker(mark) is None:
                item.add_marker(getattr(pytest.mark, mark))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark, (present, reason) in REQUIREMENTS.items():
        if item.get_closest_marker(mark) is not None and not present():
            pytest.skip(reason)


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



class InProcessGateway:
    """gatewayd's `serve` on the test's own trio loop, with private state and run dirs.

    Requests go over the admin socket from a worker thread, and so must every other blocking
    call (`blocking`): the trio thread serves the daemon. `stop` stops everything it started
    (`shutdown --all`: mounts, exports, the data plane, QSD), or, on a gatewayd without that op,
    sends the SIGTERM its own signal receiver takes (the test process is not killed)."""

    def __init__(self, top: Path, nursery: trio.Nursery) -> None:
        self.top = top
        self.settings = Settings(state_dir=top / "state", run_dir=top / "run", admin_group=None,
                                 allowed_roots=(), log_level="DEBUG", libvirt_uri="",
                                 export_linger=10.0)
        self._nursery = nursery
        self._stopped: trio.Event | None = None

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    async def start(self, *, linger: float | None = None) -> None:
        from gateway.daemon.main import serve

        assert self._stopped is None, "already running"
        if linger is not None:
            self.settings = dataclasses.replace(self.settings, export_linger=linger)
        settings = self.settings
        stopped = self._stopped = trio.Event()

        async def run() -> None:
            try:
                await serve(settings)
            finally:
                _close_run_dir_lock(settings.run_dir)
                stopped.set()

        self._nursery.start_soon(run)
        with trio.fail_after(60):
            while True:
                try:
                    await self.call("status")
                    return
                except DaemonUnavailable:
                    assert not stopped.is_set(), "gatewayd stopped while starting"
                    await trio.sleep(0.02)

    async def stop(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is None or stopped.is_set():
            return
        try:
            await self.call("shutdown", {"all": True})
        except InvalidArgument as exc:
            assert "unknown op" in exc.message, exc.message
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN,
                                                            None), "gatewayd's receiver is gone"
            signal.raise_signal(signal.SIGTERM)
        with trio.fail_after(90):
            await stopped.wait()

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return await self.blocking(admin_call, self.settings.admin_socket, op, args or {})

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    def leftovers(self) -> list[str]:
        """Mounts under the run dir (but its rootfs root), loop devices on its files, processes
        started for it. Blocking."""
        from gateway.host import loopdev, mounts
        root = str(self.run_dir / "rootfs")
        found = [f"mount {m.mount_point}" for m in mounts.mounts_under(self.run_dir)
                 if m.mount_point != root]
        found += [f"loop {d}" for d in loopdev.devices_backed_by(self.run_dir)]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.run_dir).encode() in cmdline:
                    found.append(f"process {entry.name}: {cmdline[:100]!r}")
        return found


def _close_run_dir_lock(run_dir: Path) -> None:
    """gatewayd holds RUN_DIR/gatewayd.lock for the life of its process; an in-process gateway
    lets it go when `serve` returns, so that it can start again."""
    lock = str(run_dir / "gatewayd.lock")
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == lock:
                os.close(int(fd))
        except OSError:
            continue


@pytest.fixture
async def in_process_gateway(tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    """An InProcessGateway, not started yet (`await gw.start(linger=...)`); stopped afterwards,
    and checked: nothing it mounted, attached or started is left."""
    from gateway.attach.attachment import release_rootfs_root

    async with trio.open_nursery() as nursery:
        gw = InProcessGateway(tmp_path, nursery)
        try:
            yield gw
        finally:
            await gw.stop()
    with trio.move_on_after(10):  # a helper process told to stop may take a moment to exit
        while leaked := await trio.to_thread.run_sync(gw.leftovers):
            await trio.sleep(0.05)
    assert leaked == [], f"leaked: {leaked}"
    if gw.run_dir.exists():
        await trio.to_thread.run_sync(release_rootfs_root, gw.run_dir)
