"""`gatewayctl install-systemd`: write the gatewayd unit file and say what to run next.

The unit (also checked in as systemd/gatewayd.service, rendered with the default gatewayd path):

- Type=notify: gatewayd sends READY=1 to $NOTIFY_SOCKET once the admin socket accepts
  (gateway.daemon.main.notify_systemd), STOPPING=1 when it starts shutting down.
- KillMode=process: `systemctl stop`/`restart` (a package upgrade) signal gatewayd alone. The
  data plane it started (the block view process, qemu-storage-daemon, fuse2fs) lives on in the
  unit's cgroup and goes on serving every running container; the next gatewayd adopts it. Any
  other KillMode would kill the data plane with gatewayd and take every container's rootfs down.
  Stopping everything is an explicit act: `gatewayctl shutdown --all`.
- Restart=on-failure: a crashed gatewayd is restarted and adopts what its predecessor left.
- No mount-namespace sandboxing (ProtectSystem, PrivateTmp, ...): the rootfs mounts gatewayd makes
  must be visible to the host and to libvirtd.

Nothing here runs systemctl: the command prints the commands to run (this keeps it usable on hosts
where systemd is not PID 1, and in image builds).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from gateway.errors import Conflict, InvalidArgument

# pathlib, shutil and tempfile are imported by the functions that use them: every gatewayctl run
# imports this module (for its parser), and they are most of its import time.
if TYPE_CHECKING:
    from pathlib import Path

UNIT_NAME = "gatewayd.service"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_GATEWAYD = "/usr/local/bin/gatewayd"
ENVIRONMENT_FILE = "/etc/default/storage-gateway"


def render_unit(gatewayd: str = DEFAULT_GATEWAYD, *, admin_group: str | None = None,
                allowed_roots: str | None = None) -> str:
    """The unit text. Settings not given here come from ENVIRONMENT_FILE (GATEWAY_* variables)."""
    for value, what in ((gatewayd, "gatewayd path"), (admin_group or "", "admin group"),
                        (allowed_roots or "", "allowed roots")):
        if any(c in value for c in "\n\"'\\ %$"):
            raise InvalidArgument(f"{what} {value!r} contains characters a unit file cannot hold")
    if not os.path.isabs(gatewayd):
        raise InvalidArgument(f"gatewayd path must be absolute: {gatewayd}")
    argv = [gatewayd]  # state and run dirs: gatewayd's defaults, or GATEWAY_* from the env file
    if admin_group:
        argv += ["--admin-group", admin_group]
    if allowed_roots:
        argv += ["--allowed-roots", allowed_roots]
    return "\n".join([
        "# storage-gateway daemon (written by `gatewayctl install-systemd`).",
        "[Unit]",
        "Description=storage-gateway: rootfs volumes for libvirt-lxc containers",
        "Documentation=file:///usr/share/doc/storage-gateway/README.md",
        "After=local-fs.target network.target",
        "Before=libvirtd.service",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"EnvironmentFile=-{ENVIRONMENT_FILE}",
        f"ExecStart={' '.join(argv)}",
        "# SIGTERM to gatewayd only: the data plane (block view, qemu-storage-daemon, fuse2fs)",
        "# keeps serving running containers and the next gatewayd adopts it. To stop everything:",
        "# gatewayctl shutdown --all",
        "KillMode=process",
        "KillSignal=SIGTERM",
        "TimeoutStartSec=90",
        "TimeoutStopSec=120",
        "Restart=on-failure",
        "RestartSec=2",
        "# Mounts are kept when gatewayd exits, so keep the runtime directory too.",
        "RuntimeDirectory=storage-gateway",
        "RuntimeDirectoryMode=0711",
        "RuntimeDirectoryPreserve=yes",
        "StateDirectory=storage-gateway",
        "StateDirectoryMode=0700",
        "LimitNOFILE=65536",
        "# No ProtectSystem/PrivateTmp/PrivateMounts: mounts must reach the host and libvirtd.",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def default_gatewayd() -> str:
    """The gatewayd that belongs to this gatewayctl (same bin directory), else one on PATH."""
    import shutil
    from pathlib import Path
    here = Path(sys.argv[0]).absolute().parent / "gatewayd" if sys.argv and sys.argv[0] else None
    if here is not None and here.is_file() and os.access(here, os.X_OK):
        return str(here)
    beside = Path(sys.executable).parent / "gatewayd"
    if beside.is_file():
        return str(beside)
    return shutil.which("gatewayd") or DEFAULT_GATEWAYD


def install_unit(unit_dir: Path, text: str, *, force: bool = False) -> tuple[Path, str]:
    """Write the unit atomically. Returns (path, "installed" | "updated" | "unchanged")."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    try:
        current: str | None = path.read_text()
    except FileNotFoundError:
        current = None
    if current == text:
        return path, "unchanged"
    if current is not None and not force and not current.startswith(text.splitlines()[0]):
        raise Conflict(f"{path} exists and was not written by gatewayctl; use --force to replace")
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=".gatewayd.", dir=unit_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path, "installed" if current is None else "updated"


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 exactly when /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system")


def cmd_install_systemd(ns: argparse.Namespace) -> int:
    from pathlib import Path
    gatewayd = ns.gatewayd or default_gatewayd()
    text = render_unit(gatewayd, admin_group=ns.admin_group, allowed_roots=ns.allowed_roots)
    path, outcome = install_unit(Path(ns.unit_dir), text, force=ns.force)
    print(f"{UNIT_NAME} {outcome} at {path}")
    print("next:")
    print("  systemctl daemon-reload")
    print(f"  systemctl enable --now {UNIT_NAME}")
    print(f"  (settings: GATEWAY_* variables in {ENVIRONMENT_FILE})")
    if not systemd_running():
        print("note: systemd is not running on this host; run those commands where it is")
    return 0


def register(top: Any, groups: dict[str, Any]) -> None:
    p = top.add_parser("install-systemd", help="install the gatewayd systemd unit")
    p.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR,
                   help=f"where to write {UNIT_NAME} (default {DEFAULT_UNIT_DIR})")
    p.add_argument("--gatewayd", default=None,
                   help="gatewayd executable for ExecStart (default: the one beside gatewayctl)")
    p.add_argument("--admin-group", default=None, help="passed to gatewayd --admin-group")
    p.add_argument("--allowed-roots", default=None, help="passed to gatewayd --allowed-roots")
    p.add_argument("--force", action="store_true",
                   help="replace a unit file that gatewayctl did not write")
    p.set_defaults(fn=cmd_install_systemd)
