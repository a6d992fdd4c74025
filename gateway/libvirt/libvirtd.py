"""A libvirtd for libvirt-lxc on hosts without systemd: start, wait until usable, stop.

libvirt_lxc fails on this host's hybrid cgroup layout ("Unable to create directory
/sys/fs/cgroup/unified"), so libvirtd runs in its own mount namespace (propagation slave) with
/sys/fs/cgroup/unified unmounted there. Mounts made later on the host reach it only under
directories that were shared mounts before it started (see hostprep.ensure_shared).

An already running, reachable libvirtd is reused and never stopped. `python -m
gateway.libvirt.libvirtd up|down|status` does the same for `make run` and humans.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from gateway import command
from gateway.errors import CommandError, GatewayError
from gateway.libvirt import hostprep
from gateway.libvirt.connection import (
    DEFAULT_URI,
    close_quietly,
    connect,
    is_reachable,
    libvirt_errors,
)
from gateway.libvirt.domain import attachment_from_xml

LOG_PATH = Path("/var/log/libvirt/storage-gateway-libvirtd.log")
STATE_PATH = Path("/var/run/libvirt/storage-gateway-libvirtd.json")
SYSTEM_HOOKS_DIR = Path("/etc/libvirt/hooks")
CGROUP_UNIFIED = Path("/sys/fs/cgroup/unified")

# The new namespace starts as a copy of the host's mounts. A private mount copied into it (no
# shared: or master: tag: nothing propagates to the copy, not even the host's umount) would keep
# its filesystem mounted here after the host unmounts it: the gateway's private kernel mounts on
# loop devices and its FUSE mounts (block view, fuse2fs) would then stay busy for libvirtd's
# lifetime ("loop device still bound" at every later umount). Drop those copies, deepest first.
DROP_PRIVATE_COPIES = r"""
awk '{
  tagged = 0
  for (i = 7; $i != "-"; i++) if ($i ~ /^(shared|master):/) tagged = 1
  if (!tagged && ($(i + 1) ~ /^fuse/ || $(i + 2) ~ /^\/dev\/loop/)) print $5
}' /proc/self/mountinfo | sort -r | while read -r target; do umount -l "$target" || :; done
"""
# Runs as the libvirtd process itself (unshare and sh exec into it), inside the new namespace.
_NAMESPACE_SCRIPT = DROP_PRIVATE_COPIES + """
set -e
if [ -d "$1" ] && grep -q " $1 " /proc/self/mountinfo; then umount "$1"; fi
if [ -n "$2" ]; then mkdir -p "$3"; mount --bind "$2" "$3"; fi
exec libvirtd
"""


class LibvirtdError(CommandError):
    """libvirtd could not be started or stopped."""


@dataclass
class LibvirtdHandle:
    """A usable libvirtd. `owned` is False when it was already running: stop() leaves it alone."""

    uri: str
    owned: bool
    pid: int | None = None
    hooks_dir: Path | None = None
    _process: command.Child | None = field(default=None, repr=False)

    def stop(self, timeout: float = 20.0) -> None:
        """Destroy every running domain (we own the daemon, so they are ours), undefine gateway
        domains, then stop libvirtd. No-op for a reused libvirtd."""
        if not self.owned or self.pid is None:
            return
        _destroy_all(self.uri)
        _terminate(self.pid, self._process, timeout)
        self.pid = None
        _forget_state()


def _destroy_all(uri: str) -> None:
    try:
        conn = connect(uri)
    except GatewayError:
        return
    try:
        with libvirt_errors("listing domains"):
            doms = conn.listAllDomains(0)
        for dom in doms:
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent() and attachment_from_xml(
                        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is not None:
                    dom.undefine()
            except libvirt.libvirtError:
                pass  # gone meanwhile
    finally:
        close_quietly(conn)


def _terminate(pid: int, process: command.Child | None, timeout: float) -> None:
    """SIGTERM, `timeout` seconds, SIGKILL, `timeout` seconds (command.stop)."""
    ended = command.stop(process if process is not None else pid, grace=timeout,
                         kill_wait=timeout)
    if ended is command.Ended.STUCK:
        raise LibvirtdError(f"libvirtd (pid {pid}) would not exit")


def _write_state(pid: int, hooks_dir: Path | None) -> None:
    STATE_PATH.write_text(json.dumps({"pid": pid, "hooks_dir": str(hooks_dir or "")}))


def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads(STATE_PATH.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _forget_state() -> None:
    STATE_PATH.unlink(missing_ok=True)


def ensure_libvirtd(shared_dirs: list[Path], *, uri: str = DEFAULT_URI,
                    hooks_dir: Path | None = None, timeout: float = 30.0) -> LibvirtdHandle:
    """A usable libvirtd at `uri`, starting one if none answers.

    `shared_dirs` become shared mount points before libvirtd starts. `hooks_dir`, when given, is
    bind-mounted over /etc/libvirt/hooks inside libvirtd's namespace (libvirtd looks for hook
    scripts when it starts, so install them there first); it has no effect on a reused daemon.
    """
    for d in shared_dirs:
        d.mkdir(parents=True, exist_ok=True)
    if is_reachable(uri):
        return LibvirtdHandle(uri=uri, owned=False)
    hostprep.prepare_host(shared_dirs)
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    argv = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", _NAMESPACE_SCRIPT,
            "gateway-libvirtd", str(CGROUP_UNIFIED), str(hooks_dir or ""), str(SYSTEM_HOOKS_DIR)]
    process = command.spawn(argv, stderr_path=str(LOG_PATH), error=LibvirtdError)
    handle = LibvirtdHandle(uri=uri, owned=True, pid=process.pid, hooks_dir=hooks_dir,
                            _process=process)
    deadline = time.monotonic() + timeout
    while not is_reachable(uri):
        if not command.alive(process):
            raise LibvirtdError(f"libvirtd exited with status {process.returncode}: "
                                f"{command.stderr_tail(LOG_PATH)} (log: {LOG_PATH})")
        if time.monotonic() > deadline:
            _terminate(process.pid, process, 5.0)
            raise LibvirtdError(f"libvirtd did not accept {uri} within {timeout:g}s "
                                f"(log: {LOG_PATH})")
        time.sleep(0.1)
    _write_state(process.pid, hooks_dir)
    return handle


def started_pid() -> int | None:
    """The pid of the libvirtd a previous `up` (ensure_libvirtd) started, if it still runs."""
    state = _read_state()
    pid = state.get("pid") if state is not None else None
    return pid if isinstance(pid, int) and command.alive(pid) else None


def stop_started_libvirtd(timeout: float = 20.0) -> bool:
    """Stop the libvirtd a previous `up` started (recorded in STATE_PATH). False if none."""
    state = _read_state()
    if state is None or not isinstance(state.get("pid"), int):
        return False
    pid = int(state["pid"])
    if command.alive(pid):
        _destroy_all(DEFAULT_URI)
        _terminate(pid, None, timeout)
    _forget_state()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.libvirt.libvirtd",
                                     description="start or stop a libvirtd for libvirt-lxc")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start libvirtd unless one is reachable")
    up.add_argument("--shared", action="append", default=[], type=Path,
                    help="directory to make a shared mount first (repeatable)")
    up.add_argument("--hooks-dir", type=Path, default=None,
                    help="directory to show libvirtd as /etc/libvirt/hooks")
    sub.add_parser("down", help="stop the libvirtd `up` started (destroys its domains)")
    sub.add_parser("status", help="say whether lxc:/// is reachable")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            handle = ensure_libvirtd(args.shared, hooks_dir=args.hooks_dir)
            if handle.owned:
                print(f"libvirtd started, pid {handle.pid}")
            else:
                print("libvirtd already running; reusing it")
        elif args.action == "down":
            print("libvirtd stopped" if stop_started_libvirtd() else "no libvirtd of ours running")
        else:
            reachable = is_reachable()
            print("libvirtd reachable" if reachable else "libvirtd not reachable")
            return 0 if reachable else 1
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
