"""A real libvirtd for tests: session fixture `libvirt_env`.

Starts libvirtd (or reuses a running one) with a fresh shared rootfs dir and, when it starts the
daemon itself, a private hooks dir holding the gateway hook (bind-mounted over /etc/libvirt/hooks
inside libvirtd's namespace only) that talks to `socket_path`. On teardown it destroys the
domains, stops the daemon it started and unmounts what it mounted.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.libvirt import domain, hook, libvirtd
from gateway.testing.daemon import Daemon


@dataclass(frozen=True)
class LibvirtEnv:
    uri: str
    shared_dir: Path  # a shared mount point: mounts below it reach libvirtd
    socket_path: Path  # where the hook expects gatewayd (when hook_active)
    hook_active: bool  # False when an already running libvirtd was reused
    mounts_visible: bool  # whether mounts below shared_dir reach libvirtd (False if reused)
    handle: libvirtd.LibvirtdHandle


def umount_below(path: Path) -> None:
    """Lazily unmount every mount at or below `path`, deepest first."""
    prefix = str(path)
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split(" ")[4].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            targets.append(target)
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _reaches_libvirtd(shared: Path) -> bool:
    """Does a mount made now below `shared` show up in the running libvirtd's namespace?"""
    try:
        pid = int(Path("/var/run/libvirtd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    probe = shared / "probe"
    probe.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "gateway-probe", str(probe)], check=True)
    try:
        return f" {probe} " in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    finally:
        subprocess.run(["umount", str(probe)], check=False)


# libvirtd is one per host: test sessions running at the same time (several checkouts, parallel
# runs) take turns on it, or the later one would reuse a libvirtd without its hook and skip.
SESSION_LOCK = Path("/run/lock/storage-gateway-libvirt-tests.lock")
LOCK_WAIT_SECONDS = 45.0


def _session_lock() -> int | None:
    """An flock held while this session owns the libvirt env; None if another session kept it
    longer than LOCK_WAIT_SECONDS (the env then reuses that session's libvirtd)."""
    SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.5)


class _Shared:
    """The one LibvirtEnv of the session. Each test module that imports the fixture gets its own
    pytest fixture definition (and so its own session-scoped instance); they all share this one,
    and the last to finish tears it down. Without it a second module would find the first
    module's libvirtd running and reuse it without our hook."""

    env: LibvirtEnv | None = None
    users = 0
    lock_fd: int | None = None


def _start_env(base: Path) -> LibvirtEnv:
    shared = base / "rootfs"
    hooks = base / "hooks"
    sock = base / "admin.sock"
    hook.install_hook(hooks, str(sock))
    handle = libvirtd.ensure_libvirtd([shared], hooks_dir=hooks)
    return LibvirtEnv(uri=handle.uri, shared_dir=shared, socket_path=sock,
                      hook_active=handle.owned,
                      mounts_visible=handle.owned or _reaches_libvirtd(shared), handle=handle)


@pytest.fixture(scope="session")
def libvirt_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtEnv]:
    if _Shared.env is None:
        _Shared.lock_fd = _session_lock()
        try:
            _Shared.env = _start_env(tmp_path_factory.mktemp("libvirt"))
        except BaseException:
            if _Shared.lock_fd is not None:
                os.close(_Shared.lock_fd)
                _Shared.lock_fd = None
            raise
    env = _Shared.env
    _Shared.users += 1
    try:
        yield env
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.env = None
            try:
                env.handle.stop()
            finally:
                umount_below(env.shared_dir)
                if _Shared.lock_fd is not None:
                    os.close(_Shared.lock_fd)  # releases the flock
                    _Shared.lock_fd = None


class FakeGatewayd:
    """A stand-in admin socket for hook tests: answers `mount` by bind-mounting a prepared tree at
    SHARED/VOLUME and `umount` by unmounting it; records every request. Runs in a thread."""

    def __init__(self, socket_path: Path, shared_dir: Path | None = None,
                 trees: dict[str, Path] | None = None, reply_rootfs: str | None = None) -> None:
        import socket
        import threading

        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.trees = trees or {}
        self.reply_rootfs = reply_rootfs
        self.requests: list[dict[str, object]] = []
        socket_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(socket_path))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeGatewayd:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()
        self.socket_path.unlink(missing_ok=True)

    def _serve(self) -> None:
        import json

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                if not buf:
                    continue
                req = json.loads(buf.split(b"\n", 1)[0])
                self.requests.append(req)
                conn.sendall(json.dumps(self._answer(req)).encode() + b"\n")

    def _answer(self, req: dict[str, object]) -> dict[str, object]:
        args = req.get("args")
        assert isinstance(args, dict)
        name = str(args.get("name"))
        base = self.shared_dir if self.shared_dir is not None else Path("/nonexistent")
        rootfs = base / name
        if req.get("op") == "mount":
            if name not in self.trees:
                return {"id": req.get("id"), "ok": False,
                        "error": {"code": "not-found", "message": f"no volume {name}"}}
            if self.shared_dir is not None and libvirtd_mountpoint(rootfs) is False:
                rootfs.mkdir(parents=True, exist_ok=True)
                subprocess.run(["mount", "--bind", str(self.trees[name]), str(rootfs)],
                               check=True)
            return {"id": req.get("id"), "ok": True,
                    "result": {"rootfs": self.reply_rootfs or str(rootfs),
                               "mode": args.get("mode")}}
        if req.get("op") == "umount":
            if self.shared_dir is not None:
                umount_below(rootfs)
            return {"id": req.get("id"), "ok": True, "result": None}
        return {"id": req.get("id"), "ok": False,
                "error": {"code": "invalid-argument", "message": "unknown op"}}


def libvirtd_mountpoint(path: Path) -> bool:
    from gateway.libvirt.hostprep import mount_propagation

    return mount_propagation(path) is not None


def container_init(uri: str, name: str) -> tuple[int, int]:
    """Host pid and uid of a running container's init: the one child of its libvirt_lxc
    controller (whose pid is the domain's ID)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        controller = conn.lookupByName(name).ID()
    finally:
        conn.close()
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(children) == 1, children
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(children[0]), int(next(ln for ln in status.splitlines()
                                       if ln.startswith("Uid:")).split()[1])


def open_ancestors(run_dir: Path) -> dict[Path, int]:
    """Search permission for others on the directories above the run dir (pytest's are 0700):
    a tenant reaches the admin socket, and a container in a user namespace its rootfs, as
    unprivileged host uids (gatewayd itself opens RUN_DIR, 0711, and RUN_DIR/rootfs, an ACL
    entry per id slice). Returns the modes to put back. Call it again before each start that
    needs it: another pytest session starting meanwhile puts /tmp/pytest-of-USER back to 0700."""
    changed = {}
    for parent in run_dir.parents:
        mode = parent.stat().st_mode & 0o7777
        if not mode & 0o001:
            changed[parent] = mode
            parent.chmod(mode | 0o001)
    return changed


@contextmanager
def serving_gatewayd(env: LibvirtEnv, tmp: Path, prefix: str, extra_args: Sequence[str] = (),
                     *, skip_if_served: bool = False) -> Iterator[Daemon]:
    """A real gatewayd on the run dir the session's libvirtd was prepared for (so its hook and
    shared rootfs dir are this gatewayd's). Skips the test when the libvirtd was reused (no hook,
    mounts do not reach it) or, with `skip_if_served`, when another gatewayd serves the run dir.
    On exit the gateway domains named PREFIX* are stopped, then gatewayd with the whole data
    plane, and nothing of it may be left but the session's shared rootfs root."""
    if not (env.hook_active and env.mounts_visible):
        pytest.skip("a libvirtd was already running: it has no gateway hook and does not see "
                    "the test's shared dir")
    if skip_if_served and env.socket_path.exists():
        pytest.skip("another gatewayd serves the session's run dir")
    run_dir = env.socket_path.parent
    daemon = Daemon(state_dir=tmp / "state", run_dir=run_dir, log_path=tmp / "gatewayd.log",
                    extra_args=["--libvirt-uri", env.uri, *extra_args])
    daemon.start()
    try:
        yield daemon
    finally:
        for info in domain.list_domains(uri=env.uri):
            if str(info["name"]).startswith(prefix):
                domain.stop_domain(str(info["name"]), uri=env.uri)
        code = daemon.stop()
        leaked = [item for item in daemon.leftovers()
                  if not item.endswith(f"mount {run_dir / 'rootfs'}")]
        assert code == 0, f"gatewayd exited {code}:\n{daemon.log_tail()}"
        assert not leaked, f"leaked: {leaked}"
