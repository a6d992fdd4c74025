"""`make run`: the whole story on one host, re-runnable.

start (default): build a busybox demo image (GPT + ext4 in qcow2) under the state dir, install the
libvirt hook and make RUN_DIR/rootfs a shared mount, start libvirtd (unless one answers), start
gatewayd in the background (pidfile, log file), register the demo volume, start a container on it
and show that it runs. Every step is skipped when its result is already there.

stop: stop the demo domain, the gatewayd and the libvirtd that `start` started (recorded in
STATE_DIR/demo.json); a libvirtd it did not start is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import command
from gateway.admin import client
from gateway.config import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
from gateway.errors import CommandError, GatewayError, NotFound
from gateway.volumes.lifecycle import filesystem_image

DEFAULT_LOG = Path("/var/log/storage-gateway.log")
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
MARKER = "hello from a storage-gateway container\n"
VOLUME = "demo"
MIB = 1024 * 1024
FS_MIB = 64
APPLETS = ("sh", "cat", "ls", "echo", "sleep", "sync", "mount", "umount", "mkdir", "rm", "touch",
           "true", "false", "ps", "dd", "sha256sum", "hostname", "id", "uname", "grep", "stat",
           "env", "printf", "kill")


class DemoError(CommandError):
    """A demo step failed."""


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    run_dir: Path
    log: Path
    hooks_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "admin.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "gatewayd.pid"

    @property
    def image(self) -> Path:
        return self.state_dir / "images" / "demo.qcow2"

    @property
    def record(self) -> Path:
        return self.state_dir / "demo.json"


def say(message: str) -> None:
    print(f"* {message}", flush=True)


# --- the demo image ------------------------------------------------------------------------


def busybox_tree(root: Path, *, marker: str = MARKER, hostname: str = "demo") -> Path:
    """A minimal busybox rootfs: /etc/marker, and an /sbin/init that writes /run/booted."""
    for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "root", "run", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "marker").write_text(marker)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "hostname").write_text(f"{hostname}\n")
    init = root / "sbin" / "init"
    init.write_text("#!/bin/sh\necho booted > /run/booted\nexec sleep 2147483647\n")
    init.chmod(0o755)
    (root / "tmp").chmod(0o1777)
    return root


def build_image(out: Path) -> bool:
    """The demo disk: GPT, one Linux partition at 1 MiB holding ext4 made from a busybox tree,
    converted to qcow2. False when `out` already exists."""
    if out.exists():
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-image-", dir=out.parent) as tmp:
        work = Path(tmp)
        busybox_tree(work / "tree")
        partial = work / "demo.qcow2"
        filesystem_image(partial, work, (FS_MIB + 2) * MIB, "ext4", "qcow2", partitioned=True,
                         label="rootfs", tree=work / "tree")
        os.replace(partial, out)
    return True


# --- small helpers ---------------------------------------------------------------------------


def _read_record(paths: Paths) -> dict[str, Any]:
    try:
        data = json.loads(paths.record.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(paths: Paths, record: dict[str, Any]) -> None:
    paths.record.parent.mkdir(parents=True, exist_ok=True)
    paths.record.write_text(json.dumps(record, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    return command.alive(pid)


def _pidfile_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None


def _call(paths: Paths, op: str, args: dict[str, Any] | None = None,
          timeout: float = 120.0) -> Any:
    return client.call(paths.socket, op, args, timeout=timeout)


def _answers(paths: Paths) -> bool:
    try:
        _call(paths, "status", timeout=5.0)
    except GatewayError:
        return False
    return True


def _gatewayd_argv(paths: Paths) -> list[str]:
    script = Path(sys.executable).parent / "gatewayd"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.daemon.main"]
    return [*head, "--state-dir", str(paths.state_dir), "--run-dir", str(paths.run_dir),
            "--libvirt-uri", "lxc:///"]


def _enter(name: str, *argv: str) -> command.Result:
    return command.run(["virsh", "-q", "-c", "lxc:///", "lxc-enter-namespace", name,
                        "--noseclabel", *argv], timeout=30, check=False, error=DemoError)


# --- start -----------------------------------------------------------------------------------


def ensure_libvirtd(paths: Paths, record: dict[str, Any]) -> None:
    from gateway.libvirt import libvirtd
    from gateway.libvirt.hook import install_hook

    hook = paths.hooks_dir / "lxc"
    before = hook.read_text() if hook.is_file() and not hook.is_symlink() else None
    outcome = install_hook(paths.hooks_dir, str(paths.socket))
    say(f"libvirt lxc hook {outcome} in {paths.hooks_dir} (talks to {paths.socket})")
    if outcome != "unchanged":  # what `make stop` puts back
        record["hook"] = {"outcome": outcome, "before": before}
    hooks = None if paths.hooks_dir == DEFAULT_HOOKS_DIR else paths.hooks_dir
    rootfs_root = paths.run_dir / "rootfs"
    handle = libvirtd.ensure_libvirtd([rootfs_root], hooks_dir=hooks)
    if handle.owned:
        record["libvirtd_pid"] = handle.pid
        say(f"libvirtd started (pid {handle.pid}, log {libvirtd.LOG_PATH}); it sees mounts "
            f"under {rootfs_root}")
        return
    pid = _pidfile_pid(Path("/var/run/libvirtd.pid"))
    if pid is not None and not _sees(pid, rootfs_root):
        raise DemoError(f"the running libvirtd (pid {pid}) started before {rootfs_root} was a "
                        "shared mount and cannot see container rootfs mounts; stop it and run "
                        "this again")
    say("libvirtd already running; reusing it")


def _sees(pid: int, path: Path) -> bool:
    try:
        return f" {path} " in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return True  # cannot tell; the domain start will say if it cannot see the rootfs


def ensure_gatewayd(paths: Paths, record: dict[str, Any]) -> None:
    pid = _pidfile_pid(paths.pidfile)
    if pid is not None and _answers(paths):
        say(f"gatewayd already running (pid {pid})")
        return
    if _answers(paths):
        raise DemoError(f"a gatewayd this demo did not start serves {paths.socket}; stop it or "
                        "use another --run-dir")
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    proc = command.spawn(_gatewayd_argv(paths), stderr_path=str(paths.log), error=DemoError)
    paths.pidfile.write_text(f"{proc.pid}\n")
    record["gatewayd_pid"] = proc.pid
    deadline = time.monotonic() + 60
    while not _answers(paths):
        if proc.poll() is not None:
            raise DemoError(f"gatewayd exited with status {proc.returncode}; see {paths.log}")
        if time.monotonic() > deadline:
            raise DemoError(f"gatewayd did not answer within 60s; see {paths.log}")
        time.sleep(0.1)
    say(f"gatewayd started (pid {proc.pid}, log {paths.log}, pidfile {paths.pidfile})")


def ensure_volume(paths: Paths) -> None:
    try:
        found = _call(paths, "volume-show", {"name": VOLUME})
    except NotFound:
        found = None
    if found is not None:
        say(f"volume {VOLUME} already registered ({found['format']}, {found['path']})")
        return
    added = _call(paths, "volume-add", {"name": VOLUME, "path": str(paths.image),
                                        "format": "qcow2"})
    say(f"volume {VOLUME} registered: {added['path']} pinned as {added['format']}")


def ensure_domain(paths: Paths, name: str) -> None:
    running = [d for d in _call(paths, "domain-list")
               if d["name"] == name and d["state"] == "running"]
    if running:
        say(f"container {name} already running on volume {running[0]['volume']}")
        return
    started = _call(paths, "domain-start", {"name": name, "volume": VOLUME, "mode": "bind"})
    say(f"container {name} started from {started['rootfs']} ({started['mode']} mode)")


def show_running(name: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        result = _enter(name, "/bin/cat", "/etc/marker")
        if result.returncode == 0:
            return result.text
        if time.monotonic() > deadline:
            detail = result.stderr.decode(errors="replace").strip()
            raise DemoError(f"cannot enter container {name}: {detail}")
        time.sleep(0.5)


def start(paths: Paths, name: str) -> None:
    record = _read_record(paths)
    if build_image(paths.image):
        say(f"built the demo image {paths.image} (GPT + ext4 + busybox, qcow2)")
    else:
        say(f"demo image {paths.image} already built")
    ensure_libvirtd(paths, record)
    ensure_gatewayd(paths, record)
    record.update(domain=name, run_dir=str(paths.run_dir))
    _write_record(paths, record)
    ensure_volume(paths)
    ensure_domain(paths, name)
    marker = show_running(name)
    say(f"inside {name}: cat /etc/marker -> {marker.strip()!r}")
    gatewayctl = Path(sys.executable).parent / "gatewayctl"
    ctl = f"{gatewayctl if gatewayctl.exists() else 'gatewayctl'} --socket {paths.socket}"
    print(f"""
The demo is running. Look around:
  {ctl} status
  {ctl} volume show {VOLUME}
  {ctl} domain ls
  virsh -c lxc:/// list --all
  virsh -c lxc:/// lxc-enter-namespace {name} --noseclabel /bin/sh
  findmnt -R {paths.run_dir / "rootfs"}
  tail {paths.log}
Stop it all (domain, gatewayd, and the libvirtd this demo started):
  make stop        (or: {sys.executable} -m gateway.cli.demo stop)""", flush=True)


# --- stop ------------------------------------------------------------------------------------


def _stop_gatewayd(paths: Paths) -> None:
    pid = _pidfile_pid(paths.pidfile)
    if pid is None:
        say("gatewayd not running")
        paths.pidfile.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise DemoError(f"gatewayd (pid {pid}) did not stop within 90s; see {paths.log}")
        time.sleep(0.1)
    paths.pidfile.unlink(missing_ok=True)
    say(f"gatewayd stopped (pid {pid})")


def stop(paths: Paths, name: str) -> None:
    from gateway.attach.attachment import release_rootfs_root
    from gateway.libvirt import libvirtd

    record = _read_record(paths)
    name = str(record.get("domain") or name)
    if _answers(paths):
        try:
            result = _call(paths, "domain-stop", {"name": name})
            say(f"container {name} stopped" if result["stopped"] else f"no container {name}")
        except GatewayError as exc:
            say(f"stopping container {name} failed: {exc.message}")
    _stop_gatewayd(paths)
    started = record.get("libvirtd_pid")
    if isinstance(started, int) and libvirtd.started_pid() == started:
        libvirtd.stop_started_libvirtd()
        say(f"libvirtd stopped (pid {started})")
        # Nothing else depends on the shared rootfs root now.
        release_rootfs_root(paths.run_dir)
    elif started is not None:
        say("libvirtd is no longer the one this demo started; leaving it alone")
    else:
        say("libvirtd was not started by this demo; leaving it running")
    restore_hook(paths, record.pop("hook", None))
    for key in ("libvirtd_pid", "gatewayd_pid"):
        record.pop(key, None)
    _write_record(paths, record)


def restore_hook(paths: Paths, installed: object) -> None:
    """Leave the hooks dir as `make run` found it: a hook pointing at a socket nobody serves
    would fail every gateway domain of a later libvirtd."""
    from gateway.libvirt.hook import is_ours, uninstall_hook

    if not isinstance(installed, dict):
        return
    hook = paths.hooks_dir / "lxc"
    before = installed.get("before")
    if installed.get("outcome") == "updated" and isinstance(before, str):
        if is_ours(hook):
            tmp = hook.with_name(".lxc.demo-restore")
            tmp.write_text(before)
            tmp.chmod(0o755)
            os.replace(tmp, hook)
            say(f"libvirt lxc hook in {paths.hooks_dir} put back as it was")
        return
    outcome = uninstall_hook(paths.hooks_dir)
    say(f"libvirt lxc hook {outcome} in {paths.hooks_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.cli.demo",
                                     description="run (or stop) the storage-gateway demo")
    parser.add_argument("action", nargs="?", choices=["start", "stop"], default="start")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="gatewayd's log file")
    parser.add_argument("--hooks-dir", type=Path, default=DEFAULT_HOOKS_DIR,
                        help="where the libvirt hook goes (another dir is shown to a libvirtd "
                             "this demo starts as /etc/libvirt/hooks)")
    parser.add_argument("--domain", default="demo", help="container name")
    ns = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("gateway.cli.demo: run as root (mounts, loop devices, libvirtd)", file=sys.stderr)
        return 1
    paths = Paths(ns.state_dir.absolute(), ns.run_dir.absolute(), ns.log.absolute(),
                  ns.hooks_dir.absolute())
    try:
        if ns.action == "stop":
            stop(paths, ns.domain)
        else:
            start(paths, ns.domain)
    except GatewayError as exc:
        print(f"gateway.cli.demo: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
