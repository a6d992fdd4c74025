"""gateway.libvirt against a real libvirtd (see tests/libvirt_env.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.errors import BackendError, Conflict, InvalidArgument, NotFound
from gateway.libvirt import domain
from gateway.libvirt.events import LifecycleEvent, LifecycleEvents
from gateway.libvirt.hostview import release_host_view
from gateway.testing.images import MARKER, build_rootfs_tree
from tests.libvirt_env import (
    FakeGatewayd,
    LibvirtEnv,
    container_init,
    libvirt_env,
    umount_below,
)

__all__ = ["libvirt_env"]  # the session fixture


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture
def gatewayd(libvirt_env: LibvirtEnv, tree: Path) -> Iterator[FakeGatewayd]:
    """A fake gatewayd serving volumes vol-* from `tree`, and cleanup of the test's domains."""
    trees = {f"vol-{i}": tree for i in range(8)}
    with FakeGatewayd(libvirt_env.socket_path, libvirt_env.shared_dir, trees) as fake:
        yield fake
    for info in domain.list_domains(uri=libvirt_env.uri):
        if str(info["name"]).startswith("t-"):
            domain.stop_domain(str(info["name"]), uri=libvirt_env.uri)
    for i in range(8):
        umount_below(libvirt_env.shared_dir / f"vol-{i}")


def boot(env: LibvirtEnv, fake: FakeGatewayd, name: str, volume: str) -> Path:
    if not env.mounts_visible:
        pytest.skip("reused libvirtd does not see mounts below the test's shared dir "
                    "(it started before that dir was shared)")
    rootfs = env.shared_dir / volume
    if not env.hook_active:  # a reused libvirtd does not run our hook: mount as gatewayd would
        fake._answer({"id": 0, "op": "mount", "args": {"name": volume, "mode": "bind"}})
    domain.start_domain(domain.domain_xml(name, str(rootfs), volume, "bind"), uri=env.uri)
    return rootfs


def enter(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "lxc:///", "lxc-enter-namespace", name, "--noseclabel",
                           *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(60)
def test_boot_enter_and_release_host_view(libvirt_env: LibvirtEnv,
                                          gatewayd: FakeGatewayd) -> None:
    rootfs = boot(libvirt_env, gatewayd, "t-enter", "vol-0")
    if libvirt_env.hook_active:
        assert [r["op"] for r in gatewayd.requests] == ["mount"]
    assert domain.domain_state("t-enter", uri=libvirt_env.uri) == "running"
    assert domain.list_domains(uri=libvirt_env.uri) == [
        {"name": "t-enter", "state": "running", "volume": "vol-0", "mode": "bind"}]
    proc = enter("t-enter", "/bin/cat", "/etc/marker")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MARKER.strip()

    # nova's clean_lxc_namespace: the container keeps its rootfs without the host mount.
    assert release_host_view(rootfs) is True
    assert release_host_view(rootfs) is False
    proc = enter("t-enter", "/bin/cat", "/etc/marker")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == MARKER.strip()

    assert domain.stop_domain("t-enter", uri=libvirt_env.uri) is True
    assert domain.stop_domain("t-enter", uri=libvirt_env.uri) is False
    with pytest.raises(NotFound):
        domain.domain_state("t-enter", uri=libvirt_env.uri)
    if libvirt_env.hook_active:
        # libvirt may run the release hook twice when destroy and the controller's exit race to
        # clean up the same domain; gatewayd's umount is idempotent, so only the order matters.
        ops = [r["op"] for r in gatewayd.requests]
        assert ops[0] == "mount" and len(ops) >= 2 and set(ops[1:]) == {"umount"}, ops


@pytest.mark.timeout(60)
def test_refusals(libvirt_env: LibvirtEnv, gatewayd: FakeGatewayd) -> None:
    boot(libvirt_env, gatewayd, "t-dup", "vol-1")
    xml = domain.domain_xml("t-dup", str(libvirt_env.shared_dir / "vol-1"), "vol-1", "bind")
    with pytest.raises(Exception, match="already running"):
        domain.start_domain(xml, uri=libvirt_env.uri)
    with pytest.raises(InvalidArgument):
        domain.stop_domain("../etc", uri=libvirt_env.uri)
    with pytest.raises(InvalidArgument, match="no gateway attachment"):
        domain.start_domain("<domain type='lxc'><name>t-x</name></domain>", uri=libvirt_env.uri)


@pytest.mark.timeout(60)
def test_hook_without_gatewayd_fails_start(libvirt_env: LibvirtEnv) -> None:
    if not libvirt_env.hook_active:
        pytest.skip("reused libvirtd: our hook is not installed in it")
    rootfs = libvirt_env.shared_dir / "vol-nogw"
    xml = domain.domain_xml("t-nogw", str(rootfs), "vol-nogw", "bind")
    with pytest.raises(BackendError) as info:
        domain.start_domain(xml, uri=libvirt_env.uri)
    assert "storage-gateway hook: gatewayd is not reachable at" in str(info.value)
    with pytest.raises(NotFound):  # nothing half-made remains
        domain.domain_state("t-nogw", uri=libvirt_env.uri)


@pytest.mark.timeout(60)
async def test_stopped_event_when_init_is_killed(libvirt_env: LibvirtEnv,
                                                 gatewayd: FakeGatewayd) -> None:
    events = LifecycleEvents(libvirt_env.uri)
    seen: list[LifecycleEvent] = []

    async def wait_for(name: str, kind: str) -> LifecycleEvent:
        async for ev in events.receive:
            seen.append(ev)
            if ev.name == name and ev.event == kind:
                return ev
        raise AssertionError(f"event stream ended before {kind} of {name}: {seen}")

    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        await trio.to_thread.run_sync(boot, libvirt_env, gatewayd, "t-kill", "vol-2")
        started = await wait_for("t-kill", "started")
        assert (started.volume, started.mode) == ("vol-2", "bind")
        pid, _ = await trio.to_thread.run_sync(container_init, libvirt_env.uri, "t-kill")
        os.kill(pid, signal.SIGKILL)
        stopped = await wait_for("t-kill", "stopped")
        assert (stopped.volume, stopped.mode) == ("vol-2", "bind")
        assert domain.domain_state("t-kill", uri=libvirt_env.uri) == "shutoff"
        await trio.to_thread.run_sync(lambda: domain.stop_domain("t-kill", uri=libvirt_env.uri))
        undefined = await wait_for("t-kill", "undefined")
        assert undefined.volume == "vol-2"  # from the cache: the domain is gone
        nursery.cancel_scope.cancel()
    assert "t-kill" not in events.cache
    assert [e.event for e in seen if e.name == "t-kill"][:2] == ["defined", "started"]


@pytest.mark.timeout(30)
def test_stop_refuses_foreign_domain(libvirt_env: LibvirtEnv, tree: Path) -> None:
    import libvirt

    xml = ("<domain type='lxc'><name>t-foreign</name><memory unit='MiB'>64</memory>"
           "<os><type>exe</type><init>/sbin/init</init></os>"
           f"<devices><filesystem type='mount'><source dir='{tree}'/><target dir='/'/>"
           "</filesystem></devices></domain>")
    conn = libvirt.open(libvirt_env.uri)
    try:
        dom = conn.defineXML(xml)
        try:
            with pytest.raises(Conflict, match="not a gateway domain"):
                domain.stop_domain("t-foreign", uri=libvirt_env.uri)
            assert all(d["name"] != "t-foreign" for d in domain.list_domains(uri=libvirt_env.uri))
        finally:
            dom.undefine()
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_running_libvirtd_is_reused(libvirt_env: LibvirtEnv) -> None:
    from gateway.libvirt import libvirtd

    handle = libvirtd.ensure_libvirtd([libvirt_env.shared_dir])
    assert not handle.owned
    handle.stop()  # a no-op for a daemon we did not start
    assert domain.list_domains(uri=libvirt_env.uri) is not None
