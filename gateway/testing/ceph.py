"""A real throwaway Ceph cluster for tests and benchmarks: one monitor, one OSD, on 127.0.0.1.

Everything lives under one directory (`top`): the configuration file, the monitor's store, the
OSD's directory, admin sockets and logs. The OSD keeps its objects in memory (memstore), there is
no manager, and the single pool has size 1, so a cluster comes up in a few seconds from the
Debian packages ceph-mon, ceph-osd and ceph-common alone. Authentication is off (`auth ... =
none`): the cluster is private to one test session on the loopback interface.

Every `ceph`/`rbd` command runs through gateway.command with a timeout: commands a manager would
serve hang without one. `running(top)` is the way in: it stops every daemon it started, whatever
happens (a start that fails half-way included).

Blocking throughout: call it from a test's or a benchmark's own thread.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway import command

POOL = "rbd"
CLIENT_TIMEOUT = 5  # seconds: client mount, monitor and OSD operation timeouts in the conf
COMMAND_TIMEOUT = 20.0  # seconds any one ceph/rbd command may take
START_TIMEOUT = 30.0
MEMSTORE_BYTES = 1 << 30


def free_port() -> int:
    """A TCP port nobody listens on at the moment (the monitor binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config_text(top: Path, fsid: str, mon_port: int) -> str:
    """The cluster's ceph.conf: daemons and clients read the same file (admin sockets and log
    files for the daemons only: clients would share one socket name)."""
    daemon_only = [f"admin socket = {top}/run/$name.asok", f"log file = {top}/log/$name.log"]
    return "\n".join([
        "[global]",
        f"fsid = {fsid}",
        f"mon host = v2:127.0.0.1:{mon_port}",
        "public addr = 127.0.0.1",
        "auth cluster required = none",
        "auth service required = none",
        "auth client required = none",
        f"run dir = {top}/run",
        f"mon data = {top}/mon/$id",
        f"osd data = {top}/osd/$id",
        "osd objectstore = memstore",
        f"memstore device bytes = {MEMSTORE_BYTES}",
        "osd pool default size = 1",
        "osd pool default min size = 1",
        "osd pool default pg autoscale mode = off",
        "osd crush chooseleaf type = 0",
        "mon allow pool size one = true",
        "mon allow pool delete = true",
        "mon warn on pool no redundancy = false",
        "mon osd down out interval = 0",
        f"client mount timeout = {CLIENT_TIMEOUT}",
        f"rados mon op timeout = {CLIENT_TIMEOUT}",
        f"rados osd op timeout = {CLIENT_TIMEOUT}",
        "[mon]",
        f"mon cluster log file = {top}/log/cluster.log",
        *daemon_only,
        "[osd]",
        *daemon_only,
        "",
    ])


@dataclass
class Cluster:
    """One monitor (`mon.a`) and one OSD (`osd.0`) under `top`."""

    top: Path
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    mon_port: int = field(default_factory=free_port)
    pool: str = POOL
    mon: command.Child | None = None
    osd: command.Child | None = None

    @property
    def conf(self) -> Path:
        return self.top / "ceph.conf"

    # ---- commands --------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run `ceph ARGS` against this cluster; its stdout."""
        return command.run(["ceph", "-c", str(self.conf), "--connect-timeout",
                            str(CLIENT_TIMEOUT), *args], timeout=timeout).text

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run `rbd ARGS` against this cluster; its stdout."""
        return command.run(["rbd", "-c", str(self.conf), *args], timeout=timeout).text

    def import_image(self, source: Path, image: str, *, namespace: str = "") -> str:
        """`rbd import` a raw file as POOL[/NAMESPACE]/IMAGE; returns that spec."""
        spec = "/".join(p for p in (self.pool, namespace, image) if p)
        self.rbd("import", "--no-progress", str(source), spec, timeout=120.0)
        return spec

    def create_namespace(self, namespace: str) -> None:
        self.rbd("namespace", "create", f"{self.pool}/{namespace}")

    def create_pool(self, pool: str) -> None:
        """Another RBD pool (8 placement groups, size 1 like the first)."""
        self.ceph("osd", "pool", "create", pool, "8")
        self.rbd("pool", "init", pool)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create and start the cluster, with its pool ready for RBD images."""
        for sub in ("mon/a", "osd/0", "run", "log"):
            (self.top / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(config_text(self.top, self.fsid, self.mon_port))
        monmap = self.top / "monmap"
        command.run(["monmaptool", "--create", "--addv", "a", f"v2:127.0.0.1:{self.mon_port}",
                     "--fsid", self.fsid, str(monmap)], timeout=COMMAND_TIMEOUT)
        command.run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap",
                     str(monmap)], timeout=COMMAND_TIMEOUT)
        self.start_mon()
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph osd new gave id {osd_id!r}, expected 0")
        command.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid",
                     osd_uuid], timeout=COMMAND_TIMEOUT)
        self.osd = command.spawn(["ceph-osd", "-f", "-c", str(self.conf), "-i", "0"],
                                 stderr_path=str(self.top / "log" / "osd.0.stderr"))
        self._wait_osd_up()
        self.ceph("osd", "pool", "create", self.pool, "8")
        self.rbd("pool", "init", self.pool)

    def start_mon(self) -> None:
        """Start (or restart) the monitor on its store."""
        self.mon = command.spawn(["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"],
                                 stderr_path=str(self.top / "log" / "mon.a.stderr"))

    def stop_mon(self) -> None:
        """Stop the monitor alone: clients can no longer reach the cluster."""
        mon, self.mon = self.mon, None
        if mon is not None:
            command.stop(mon, grace=5.0, kill_wait=5.0)

    def _wait_osd_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for name, proc in (("ceph-mon", self.mon), ("ceph-osd", self.osd)):
                if proc is None or not command.alive(proc):
                    raise RuntimeError(f"{name} exited while the cluster started; see "
                                       f"{self.top / 'log'}")
            stat = json.loads(self.ceph("osd", "stat", "--format", "json"))
            if stat.get("num_up_osds") == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"osd.0 not up after {START_TIMEOUT:g}s; see "
                                   f"{self.top / 'log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the OSD and the monitor (idempotent)."""
        osd, self.osd = self.osd, None
        if osd is not None:
            command.stop(osd, grace=5.0, kill_wait=5.0)
        self.stop_mon()

    def processes(self) -> list[int]:
        """Pids of the daemons still running (none after `stop`)."""
        return [p.pid for p in (self.mon, self.osd) if p is not None and command.alive(p)]


@contextlib.contextmanager
def running(top: Path) -> Iterator[Cluster]:
    """A started cluster under `top`, stopped on the way out whatever happened."""
    cluster = Cluster(top)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
