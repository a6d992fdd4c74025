"""RBD volumes on a real cluster, served by two real gatewayd processes (two hosts: own state and
run directories, own host ids) through the real gatewayctl: the pinned format lives in the
image's metadata, the export serves exactly the imported bytes, the rootfs mounts in both modes,
one host writes at a time (writer lease), and a dead cluster fails a registration within the
configured timeout."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import command
from gateway.ceph.meta import BASE_KEY, FORMAT_KEY, FSTYPE_KEY, ORIGIN_KEY
from gateway.testing.ceph import Cluster
from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER
from tests.ceph_env import ceph_cluster, rbd_disk

__all__ = ["ceph_cluster", "rbd_disk"]  # the session fixtures
CEPH_TIMEOUT = 3.0
LEASE = 4.0  # seconds a writer lease lasts unless renewed


@pytest.fixture(scope="module")
def disk(rbd_disk: Path) -> Path:
    """A GPT disk whose first partition is a busybox ext4 rootfs (carries /etc/marker)."""
    return rbd_disk


@pytest.fixture(scope="module")
def root_image(ceph_cluster: Cluster, disk: Path) -> str:
    return ceph_cluster.import_image(disk, "root")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    """Two gatewayd processes, each with its own state and run directories (two hosts)."""
    started: list[Daemon] = []
    try:
        for host in ("a", "b"):
            top = tmp_path_factory.mktemp(f"host-{host}")
            daemon = Daemon(state_dir=top / "state", run_dir=top / "run",
                            log_path=top / "gatewayd.log",
                            extra_args=["--libvirt-uri", "", "--export-linger", "0",
                                        "--ceph-timeout", str(CEPH_TIMEOUT),
                                        "--host-id", f"host-{host}",
                                        "--lease-seconds", str(LEASE)])
            started.append(daemon)
            daemon.start()
        yield started[0], started[1]
    finally:
        problems = []
        for daemon in started:
            code = daemon.stop()
            leaked = daemon.cleanup()
            if code != 0 or leaked:
                problems.append(f"exit {code}, leaked {leaked}:\n{daemon.log_tail()}")
        assert not problems, problems


def add_rbd(host: Daemon, cluster: Cluster, name: str, image: str, *extra: str,
            check: bool = True) -> dict[str, object]:
    done = host.ctl("volume", "add", name, "--rbd", image, "--ceph-conf", str(cluster.conf),
                    "--json", *extra, check=check)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr}


def refused(host: Daemon, *args: str) -> str:
    """gatewayctl's one-line error for a request that must fail (never a traceback)."""
    done = host.ctl(*args)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr and done.stderr.count("\n") <= 1, done.stderr
    return done.stderr


def volume_names(host: Daemon) -> list[str]:
    return [v["name"] for v in json.loads(host.ctl("volume", "ls", "--json", check=True).stdout)]


@pytest.mark.timeout(60)
def test_export_serves_the_imported_bytes(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster,
                                          root_image: str, disk: Path,
                                          tmp_path: Path) -> None:
    a, _ = hosts
    added = add_rbd(a, ceph_cluster, "web", root_image, "--format", "raw")
    assert added["format"] == "raw" and added["path"] == "rbd:rbd//root"
    assert added["virtual_size"] == disk.stat().st_size
    meta = ceph_cluster.rbd("image-meta", "get", root_image, FORMAT_KEY).strip()
    assert meta == "raw"
    uri = json.loads(a.ctl("export", "web", "--json", check=True).stdout)["uri"]
    out = tmp_path / "served.raw"
    command.run(["nbdcopy", uri, str(out)], timeout=60)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(
        disk.read_bytes()).digest()
    health = json.loads(a.ctl("status", "--json", check=True).stdout)["ceph"]
    assert health[str(ceph_cluster.conf)]["reachable"] is True, health
    probe = json.loads(a.ctl("probe", "web", "--json", check=True).stdout)
    assert probe["table"] == "gpt" and probe["rootfs"]["fs"] == "ext4"
    a.ctl("unexport", "web", check=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["bind", "fuse"])
def test_rootfs_mounts(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster, root_image: str,
                       mode: str) -> None:
    a, _ = hosts
    if "web" not in volume_names(a):
        add_rbd(a, ceph_cluster, "web", root_image, "--format", "raw")
    rootfs = Path(a.ctl("mount", "web", "--mode", mode, check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER
    finally:
        a.ctl("umount", "web", check=True)


@pytest.mark.timeout(60)
def test_snapshot_of_an_rbd_volume(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster,
                                   root_image: str) -> None:
    a, _ = hosts
    if "web" not in volume_names(a):
        add_rbd(a, ceph_cluster, "web", root_image, "--format", "raw")
    rootfs = Path(a.ctl("mount", "web", check=True).stdout.strip())
    try:
        done = json.loads(a.ctl("volume", "snapshot", "web", "--to", "web-snap", "--json",
                                check=True).stdout.splitlines()[-1])
    finally:
        a.ctl("umount", "web", check=True)
    snap = json.loads(a.ctl("volume", "show", "web-snap", "--json", check=True).stdout)
    assert snap["format"] == "raw" and snap["path"].startswith(str(a.state_dir)), (done, snap)
    rootfs = Path(a.ctl("mount", "web-snap", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER
    finally:
        a.ctl("umount", "web-snap", check=True)
    a.ctl("volume", "rm", "web-snap", check=True)
    assert json.loads(a.ctl("volume", "show", "web", "--json", check=True).stdout)[
        "read_only"] is False
    assert "o" not in volume_names(a)


@pytest.mark.timeout(30)
def test_second_host_finds_the_pinned_format(hosts: tuple[Daemon, Daemon],
                                             ceph_cluster: Cluster, root_image: str) -> None:
    a, b = hosts
    if "web" not in volume_names(a):
        add_rbd(a, ceph_cluster, "web", root_image, "--format", "raw")
    added = add_rbd(b, ceph_cluster, "web", root_image)  # no --format: read from the image
    assert added["format"] == "raw"
    assert added["header"]["metadata"][ORIGIN_KEY] == "registered"  # type: ignore[index]
    b.ctl("volume", "rm", "web", check=True)


@pytest.mark.timeout(30)
def test_unpinned_contradicting_and_qcow2_images_are_refused(
        hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster) -> None:
    _, b = hosts
    ceph_cluster.rbd("create", "--size", "4M", "rbd/bare")
    conf = ("--ceph-conf", str(ceph_cluster.conf))
    message = refused(b, "volume", "add", "bare", "--rbd", "rbd/bare", *conf)
    assert f"no {FORMAT_KEY} key" in message and "--format raw" in message
    message = refused(b, "volume", "add", "bare", "--rbd", "rbd/bare", *conf, "--format", "qcow2")
    assert "qcow2 on RBD is not supported" in message
    # An image pinned as qcow2 by someone else: refused whatever is declared.
    ceph_cluster.rbd("image-meta", "set", "rbd/bare", FORMAT_KEY, "qcow2")
    message = refused(b, "volume", "add", "bare", "--rbd", "rbd/bare", *conf, "--format", "raw")
    assert "qcow2 on RBD is not supported" in message
    # Pinned raw, with a filesystem type: a contradicting declaration is refused.
    ceph_cluster.rbd("image-meta", "set", "rbd/bare", FORMAT_KEY, "raw")
    ceph_cluster.rbd("image-meta", "set", "rbd/bare", "storage-gateway.fstype", "xfs")
    message = refused(b, "volume", "add", "bare", "--rbd", "rbd/bare", *conf, "--fstype", "ext4")
    assert "contradicts" in message
    message = refused(b, "volume", "add", "bare", "--rbd", "rbd/nothing", *conf)
    assert "no such image" in message
    assert "bare" not in volume_names(b)
    # Nothing was written to the image by the refused requests.
    assert "storage-gateway.origin" not in ceph_cluster.rbd("image-meta", "list", "rbd/bare")


@pytest.mark.timeout(60)
def test_one_writer_at_a_time(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster,
                              disk: Path) -> None:
    a, b = hosts
    image = ceph_cluster.import_image(disk, "shared")
    add_rbd(a, ceph_cluster, "shared", image, "--format", "raw")
    add_rbd(b, ceph_cluster, "shared", image)
    rootfs = Path(a.ctl("mount", "shared", check=True).stdout.strip())
    fd = os.open(rootfs / "etc" / "from-a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"written by host a\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert "host host-a" in refused(b, "mount", "shared")
    leases = json.loads(a.ctl("status", "--json", check=True).stdout)["leases"]
    assert leases["shared"]["state"] == "held" and leases["shared"]["expires_in"] > 0
    a.ctl("umount", "shared", check=True)
    assert "host host-a" in refused(b, "mount", "shared", "--mode", "fuse")  # umount keeps it
    assert "shared" not in json.loads(b.ctl("status", "--json", check=True).stdout)["leases"]
    assert json.loads(a.ctl("volume", "show", "shared", "--json", check=True).stdout)[
        "lease"] == "held"
    assert "released shared" in a.ctl("volume", "release", "shared", check=True).stdout
    # The filesystem type A pinned at its first mount went to the image for the next host.
    assert ceph_cluster.rbd("image-meta", "get", image, FSTYPE_KEY).strip() == "ext4"
    rootfs = Path(b.ctl("mount", "shared", "--mode", "fuse", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "from-a").read_text() == "written by host a\n"
    finally:
        b.ctl("umount", "shared", check=True)
    assert "host host-b" in refused(a, "mount", "shared")
    b.ctl("volume", "rm", "shared", check=True)  # removal gives the lease up too
    a.ctl("mount", "shared", check=True)
    a.ctl("umount", "shared", check=True)
    a.ctl("volume", "release", "shared", check=True)
    a.ctl("volume", "rm", "shared", check=True)


@pytest.mark.timeout(60)
def test_dead_cluster_fails_fast_and_local_volumes_still_mount(
        hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster, disk: Path,
        tmp_path: Path) -> None:
    _, b = hosts
    local = tmp_path / "local.raw"
    command.run(["cp", "--sparse=always", str(disk), str(local)], timeout=60)
    b.ctl("volume", "add", "local", str(local), "--format", "raw", check=True)
    ceph_cluster.stop_mon()
    try:
        began = time.monotonic()
        message = refused(b, "volume", "add", "late", "--rbd", "rbd/root", "--ceph-conf",
                          str(ceph_cluster.conf), "--format", "raw")
        took = time.monotonic() - began
        assert "not reachable within 3s" in message
        assert took < CEPH_TIMEOUT + 3, took
        health = json.loads(b.ctl("status", "--json", check=True).stdout)["ceph"]
        assert health[str(ceph_cluster.conf)]["reachable"] is False, health
        assert "not reachable" in health[str(ceph_cluster.conf)]["last_error"]["message"]
        metric = f'gateway_ceph_cluster_reachable{{cluster="{ceph_cluster.conf}"}} 0.0'
        assert metric in b.ctl("metrics", check=True).stdout
        rootfs = Path(b.ctl("mount", "local", check=True).stdout.strip())
        assert (rootfs / "etc" / "marker").read_text() == MARKER
        # and it serves I/O: a synced write and its read back
        note = rootfs / "root" / "while-the-cluster-is-down"
        with open(note, "w") as f:
            f.write("local I/O goes on\n")
            f.flush()
            os.fsync(f.fileno())
        assert note.read_text() == "local I/O goes on\n"
        b.ctl("umount", "local", check=True)
    finally:
        ceph_cluster.start_mon()
    b.ctl("volume", "rm", "local", check=True)


@pytest.mark.timeout(60)
def test_restarted_gatewayd_keeps_its_lease(hosts: tuple[Daemon, Daemon],
                                            ceph_cluster: Cluster, disk: Path) -> None:
    """gatewayd killed alone (its data plane and QSD go on serving the mount): the next gatewayd
    breaks its predecessor's lock and renews the lease, so B stays refused past the lease."""
    a, b = hosts
    image = ceph_cluster.import_image(disk, "kept")
    add_rbd(a, ceph_cluster, "kept", image, "--format", "raw")
    add_rbd(b, ceph_cluster, "kept", image)
    rootfs = Path(a.ctl("mount", "kept", check=True).stdout.strip())
    a.stop(signal.SIGKILL, everything=False)
    began = time.monotonic()
    a.start()
    leases = json.loads(a.ctl("status", "--json", check=True).stdout)["leases"]
    assert leases.get("kept", {}).get("state") == "held", (leases, a.log_tail(40))
    if time.monotonic() - began < LEASE - 1:  # else the old lock may have lapsed meanwhile
        assert "reclaimed from this host's previous gatewayd" in a.log_path.read_text()
    time.sleep(LEASE + 1)  # the old lock would have lapsed by now
    assert "host host-a" in refused(b, "mount", "kept"), a.log_tail(40)
    write_synced(rootfs / "etc" / "after-restart", "a\n")  # the adopted mount still writes
    a.ctl("umount", "kept", check=True)
    a.ctl("volume", "release", "kept", check=True)
    b.ctl("volume", "rm", "kept", check=True)
    a.ctl("volume", "rm", "kept", check=True)


def fencings(host: Daemon) -> float:
    """The host's gateway_rbd_fencings metric."""
    for line in host.ctl("metrics", check=True).stdout.splitlines():
        if line.startswith("gateway_rbd_fencings "):
            return float(line.split()[1])
    raise AssertionError("no gateway_rbd_fencings metric")


def kill_host(host: Daemon) -> None:
    """kill -9 of every process of a host: gatewayd first (it would restart the others), then
    its data plane and qemu-storage-daemon (found by the run dir on their command lines)."""
    host.kill()
    for item in host.leftovers():
        if item.startswith("process "):
            os.kill(int(item.split()[1].rstrip(":")), signal.SIGKILL)


def write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.timeout(90)
def test_takeover_after_a_host_dies(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster,
                                    disk: Path) -> None:
    """kill -9 of every host-A process while it holds the lease: B takes over once the lease
    lapses, fences A's writer, and sees A's fsynced write; A's restarted gatewayd cannot write."""
    a, b = hosts
    image = ceph_cluster.import_image(disk, "takeover")
    add_rbd(a, ceph_cluster, "takeover", image, "--format", "raw")
    add_rbd(b, ceph_cluster, "takeover", image)
    rootfs = Path(a.ctl("mount", "takeover", check=True).stdout.strip())
    write_synced(rootfs / "etc" / "acked-by-a", "fsynced on host a\n")
    kill_host(a)
    killed = time.monotonic()
    while True:
        done = b.ctl("mount", "takeover")
        if done.returncode == 0:
            break
        assert "host host-a" in done.stderr, done.stderr
        assert time.monotonic() - killed < LEASE + 10, "the lease never lapsed"
        time.sleep(0.2)
    rootfs = Path(done.stdout.strip())
    try:
        write_synced(rootfs / "etc" / "written-by-b", "b\n")  # B writes, A's lock is broken
        took = time.monotonic() - killed
        assert (rootfs / "etc" / "acked-by-a").read_text() == "fsynced on host a\n"
        assert took < LEASE + 10, took
        assert "fenced the previous writer" in b.log_path.read_text()
        a.start()  # reconciles what the dead processes left; may not write while B holds it
        status = json.loads(a.ctl("status", "--json", check=True).stdout)
        assert status["fenced"] == ["takeover"], (status["leases"], a.log_tail(30))
        assert status["leases"]["takeover"]["holder"] == "host-b"
        assert json.loads(a.ctl("volume", "show", "takeover", "--json", check=True).stdout)[
            "lease"] == "fenced"
        assert "gateway_rbd_fenced_volumes 1.0" in a.ctl("metrics", check=True).stdout
        assert "host host-b" in refused(a, "mount", "takeover")
        assert "host host-b" in refused(a, "export", "takeover")
        assert json.loads(a.ctl("status", "--json", check=True).stdout)["fenced"] == [
            "takeover"]
    finally:
        b.ctl("umount", "takeover", check=True)
    b.ctl("volume", "release", "takeover", check=True)
    b.ctl("volume", "rm", "takeover", check=True)
    a.ctl("volume", "rm", "takeover", check=True)


@pytest.mark.timeout(90)
def test_a_host_that_lost_its_lease_tears_down(hosts: tuple[Daemon, Daemon],
                                               ceph_cluster: Cluster, disk: Path) -> None:
    """Host A alive but silent (its gatewayd stopped past the lease; its data plane and QSD go
    on): B takes over and fences A's writer; A's later writes fail and never reach the image;
    A's gatewayd, resumed, finds itself fenced and tears its mount and export down forcibly."""
    a, b = hosts
    image = ceph_cluster.import_image(disk, "silent")
    add_rbd(a, ceph_cluster, "silent", image, "--format", "raw")
    add_rbd(b, ceph_cluster, "silent", image)
    rootfs_a = Path(a.ctl("mount", "silent", check=True).stdout.strip())
    write_synced(rootfs_a / "etc" / "acked-by-a", "a\n")
    fenced_before = fencings(a)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while True:
            done = b.ctl("mount", "silent")
            if done.returncode == 0:
                break
            assert "host host-a" in done.stderr, done.stderr
            assert time.monotonic() - stopped < LEASE + 10, "the lease never lapsed"
            time.sleep(0.2)
        rootfs_b = Path(done.stdout.strip())
        write_synced(rootfs_b / "etc" / "written-by-b", "b\n")
        # A's container writes on: its QSD client is blocklisted, nothing reaches the image.
        with pytest.raises(OSError):
            write_synced(rootfs_a / "etc" / "late-from-a", "late\n")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    began = time.monotonic()
    while json.loads(a.ctl("status", "--json", check=True).stdout)["fenced"] != ["silent"]:
        assert time.monotonic() - began < LEASE + 5, a.log_tail(30)
        time.sleep(0.2)
    while json.loads(a.ctl("volume", "show", "silent", "--json", check=True).stdout)[
            "attachment"] is not None:
        assert time.monotonic() - began < LEASE + 15, a.log_tail(30)
        time.sleep(0.2)
    shown = json.loads(a.ctl("volume", "show", "silent", "--json", check=True).stdout)
    assert shown["lease"] == "fenced" and not shown["exported"], shown
    assert str(rootfs_a) not in command.run(["findmnt", "-rno", "TARGET"], timeout=10).text
    assert "host host-b" in refused(a, "mount", "silent")
    assert fencings(a) == fenced_before + 1
    b.ctl("umount", "silent", check=True)
    rootfs_b = Path(b.ctl("mount", "silent", check=True).stdout.strip())
    try:  # B's data intact, A's late write nowhere
        assert (rootfs_b / "etc" / "written-by-b").read_text() == "b\n"
        assert (rootfs_b / "etc" / "acked-by-a").read_text() == "a\n"
        assert not (rootfs_b / "etc" / "late-from-a").exists()
    finally:
        b.ctl("umount", "silent", check=True)
    b.ctl("volume", "release", "silent", check=True)
    rootfs_a = Path(a.ctl("mount", "silent", check=True).stdout.strip())  # A's turn again
    assert (rootfs_a / "etc" / "written-by-b").read_text() == "b\n"
    assert json.loads(a.ctl("status", "--json", check=True).stdout)["fenced"] == []
    a.ctl("umount", "silent", check=True)
    a.ctl("volume", "release", "silent", check=True)
    b.ctl("volume", "rm", "silent", check=True)
    a.ctl("volume", "rm", "silent", check=True)


@pytest.mark.timeout(60)
def test_overlay_is_an_rbd_clone(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster,
                                 disk: Path) -> None:
    """volume create --overlay of an RBD volume: a protected snapshot and a clone, raw, with the
    gateway's keys; its rootfs mounts; its writes leave the base as it was; the base cannot be
    removed while clones use it; removing the clone removes it and its snapshot. --copy makes
    an independent image."""
    a, _ = hosts
    image = ceph_cluster.import_image(disk, "ovbase")
    add_rbd(a, ceph_cluster, "ovbase", image, "--format", "raw")
    made = json.loads(a.ctl("volume", "create", "ov1", "--from", "ovbase", "--overlay", "--json",
                            check=True).stdout)["result"]
    assert made["format"] == "raw" and made["origin"] == "overlay", made
    assert made["path"] == "rbd:rbd//ov1" and made["base"] is None, made
    assert ceph_cluster.rbd("image-meta", "get", "rbd/ov1", ORIGIN_KEY).strip() == "overlay"
    assert ceph_cluster.rbd("image-meta", "get", "rbd/ov1", BASE_KEY).strip() == "rbd/ovbase"
    info = json.loads(ceph_cluster.rbd("info", "rbd/ov1", "--format", "json"))
    assert info["parent"]["image"] == "ovbase", info
    snaps = json.loads(ceph_cluster.rbd("snap", "ls", "rbd/ovbase", "--format", "json"))
    assert [s["name"] for s in snaps] == ["storage-gateway.clone.rbd.ov1"], snaps
    rootfs = Path(a.ctl("mount", "ov1", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "marker").read_text() == MARKER
        write_synced(rootfs / "etc" / "only-in-ov1", "ov1\n")
    finally:
        a.ctl("umount", "ov1", check=True)
    ceph_cluster.create_pool("other")
    made = json.loads(a.ctl("volume", "create", "ov2", "--from", "ovbase", "--overlay",
                            "--pool", "other", "--json", check=True).stdout)["result"]
    assert made["path"] == "rbd:other//ov2", made
    assert "already exists" in refused(a, "volume", "create", "ov2", "--from", "ovbase",
                                       "--overlay")
    assert "ov1" in refused(a, "volume", "rm", "ovbase")  # clones use it
    rootfs = Path(a.ctl("mount", "ovbase", "--mode", "fuse", check=True).stdout.strip())
    try:  # the base is as it was
        assert (rootfs / "etc" / "marker").read_text() == MARKER
        assert not (rootfs / "etc" / "only-in-ov1").exists()
    finally:
        a.ctl("umount", "ovbase", check=True)
    # A copy of the clone: independent (no parent), with the clone's data.
    done = json.loads(a.ctl("volume", "create", "cp1", "--from", "ov1", "--copy", "--json",
                            check=True).stdout.splitlines()[-1])
    assert done["result"]["origin"] == "copy", done
    assert "parent" not in json.loads(ceph_cluster.rbd("info", "rbd/cp1", "--format", "json"))
    grown = json.loads(a.ctl("volume", "resize", "cp1", "--size", "64M", "--json",
                             check=True).stdout)
    assert grown["virtual_size"] == 64 << 20 and grown["filesystem"]["grown"] is True, grown
    assert json.loads(ceph_cluster.rbd("info", "rbd/cp1", "--format", "json"))[
        "size"] == 64 << 20
    rootfs = Path(a.ctl("mount", "cp1", check=True).stdout.strip())
    try:
        assert (rootfs / "etc" / "only-in-ov1").read_text() == "ov1\n"
        assert os.statvfs(rootfs).f_blocks * os.statvfs(rootfs).f_frsize > 48 << 20
    finally:
        a.ctl("umount", "cp1", check=True)
    a.ctl("volume", "rm", "cp1", check=True)
    objects = command.run(["rados", "-c", str(ceph_cluster.conf), "-p", "rbd", "ls"],
                          timeout=30).text.split()
    assert "storage-gateway.lease.cp1" not in objects  # the resize took it; it went with cp1
    a.ctl("volume", "rm", "ov1", check=True)
    assert not {"ov1", "cp1"} & set(ceph_cluster.rbd("ls", "rbd").split())
    assert "ov2" in refused(a, "volume", "rm", "ovbase")
    a.ctl("volume", "rm", "ov2", check=True)
    assert ceph_cluster.rbd("ls", "other").split() == []
    assert json.loads(ceph_cluster.rbd("snap", "ls", "rbd/ovbase", "--format", "json")) == []
    a.ctl("volume", "release", "ovbase", check=True)
    a.ctl("volume", "rm", "ovbase", check=True)


@pytest.mark.timeout(60)
def test_blank_volume_in_a_pool(hosts: tuple[Daemon, Daemon], ceph_cluster: Cluster) -> None:
    """volume create --size --mkfs --pool: a new image in the pool holding the filesystem,
    pinned raw with its filesystem type; bad requests leave no image and no row behind."""
    _, b = hosts
    conf = ("--ceph-conf", str(ceph_cluster.conf))
    done = json.loads(b.ctl("volume", "create", "blank1", "--size", "64M", "--format", "raw",
                            "--mkfs", "ext4", "--pool", "rbd", *conf, "--json",
                            check=True).stdout.splitlines()[-1])
    made = done["result"]
    assert made["origin"] == "blank" and made["path"] == "rbd:rbd//blank1", made
    assert made["virtual_size"] == 64 << 20 and made["fstype"] == "ext4", made
    assert ceph_cluster.rbd("image-meta", "get", "rbd/blank1", FSTYPE_KEY).strip() == "ext4"
    rootfs = Path(b.ctl("mount", "blank1", check=True).stdout.strip())
    try:
        assert (rootfs / "lost+found").is_dir()
        write_synced(rootfs / "hello", "hello\n")
    finally:
        b.ctl("umount", "blank1", check=True)
    assert "already exists" in refused(b, "volume", "create", "blank1", "--size", "64M",
                                       "--format", "raw", "--mkfs", "ext4", "--pool", "rbd",
                                       *conf)
    assert "raw" in refused(b, "volume", "create", "blank2", "--size", "64M", "--format",
                            "qcow2", "--mkfs", "ext4", "--pool", "rbd", *conf)
    assert "no such pool" in refused(b, "volume", "create", "blank2", "--size", "64M",
                                     "--format", "raw", "--mkfs", "ext4", "--pool", "nopool",
                                     *conf)
    assert "blank2" not in volume_names(b)
    b.ctl("volume", "rm", "blank1", check=True)
    assert not {"blank1", "blank2"} & set(ceph_cluster.rbd("ls", "rbd").split())
