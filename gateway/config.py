"""Daemon and client settings: command-line flags over environment over defaults."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import InvalidArgument
from gateway.userns.slices import IdRange, parse_range

DEFAULT_STATE_DIR = Path("/var/lib/storage-gateway")
DEFAULT_RUN_DIR = Path("/run/storage-gateway")
DEFAULT_EXPORT_LINGER = 10.0
DEFAULT_CEPH_TIMEOUT = 10.0
DEFAULT_LEASE_SECONDS = 20.0
MIN_LEASE_SECONDS = 2.0


def env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value) if value else default


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    return check_linger(seconds, name)


def check_linger(seconds: float, source: str) -> float:
    if not 0 <= seconds <= 86400:  # also refuses nan
        raise ValueError(f"{source}: choose 0 to 86400 seconds, not {seconds}")
    return seconds


def userns_range(value: str | None, source: str) -> IdRange | None:
    """START:COUNT of --userns-range / GATEWAY_USERNS_RANGE (None: not set); ValueError if bad."""
    if not value:
        return None
    try:
        return parse_range(value, source)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def ceph_seconds(value: str | float | None, source: str, *,
                 default: float = DEFAULT_CEPH_TIMEOUT, least: float = 0.0) -> float:
    """Seconds any one Ceph cluster operation may take (--ceph-timeout / GATEWAY_CEPH_TIMEOUT),
    or, with `least` and `default` given, a writer lease lasts (--lease-seconds)."""
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{source}={value!r} is not a number of seconds") from None
    if not least < seconds <= 3600:  # also refuses nan
        raise ValueError(f"{source}: choose more than {least:g} and at most 3600 seconds, "
                         f"not {seconds}")
    return seconds


HOST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def host_id(value: str | None, source: str) -> str:
    """This host's id among the hosts sharing a Ceph cluster (the cookie of its writer leases):
    --host-id / GATEWAY_HOST_ID, by default the host name."""
    chosen = value or socket.gethostname()
    if not HOST_ID_RE.fullmatch(chosen):
        raise ValueError(f"{source}: host id {chosen!r} must be 1-64 characters from "
                         "[A-Za-z0-9._-], starting with a letter or digit")
    return chosen


def default_run_dir() -> Path:
    return env_path("GATEWAY_RUN_DIR", DEFAULT_RUN_DIR)


def default_socket() -> Path:
    value = os.environ.get("GATEWAY_SOCKET")
    return Path(value) if value else default_run_dir() / "admin.sock"


def parse_roots(value: str | None) -> tuple[Path, ...]:
    """Allowed image roots, colon-separated; each is resolved so that symlinks cannot widen it."""
    if not value:
        return ()
    return tuple(Path(os.path.realpath(p)) for p in value.split(":") if p)


@dataclass(frozen=True)
class Settings:
    state_dir: Path = field(
        default_factory=lambda: env_path("GATEWAY_STATE_DIR", DEFAULT_STATE_DIR))
    run_dir: Path = field(default_factory=default_run_dir)
    admin_group: str | None = field(default_factory=lambda: os.environ.get("GATEWAY_ADMIN_GROUP"))
    # Members may use the admin socket as tenants: their own volumes only (gateway.tenants).
    tenant_group: str | None = field(
        default_factory=lambda: os.environ.get("GATEWAY_TENANT_GROUP") or None)
    allowed_roots: tuple[Path, ...] = field(
        default_factory=lambda: parse_roots(os.environ.get("GATEWAY_ALLOWED_ROOTS")))
    log_level: str = field(default_factory=lambda: os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    # libvirt connection followed for domain lifecycle events; "" turns that off.
    libvirt_uri: str = field(default_factory=lambda: os.environ.get("GATEWAY_LIBVIRT_URI",
                                                                    "lxc:///"))
    # Seconds an export made by a mount stays open after the umount, for a quick remount.
    export_linger: float = field(
        default_factory=lambda: env_seconds("GATEWAY_EXPORT_LINGER", DEFAULT_EXPORT_LINGER))
    # Host ids user-namespace domains get slices of (None: the /etc/subuid and /etc/subgid
    # entries of the system user storage-gateway).
    userns_range: IdRange | None = field(default_factory=lambda: userns_range(
        os.environ.get("GATEWAY_USERNS_RANGE"), "GATEWAY_USERNS_RANGE"))

    # Seconds a Ceph cluster may take to answer (connect, monitor and OSD operations).
    ceph_timeout: float = field(default_factory=lambda: ceph_seconds(
        os.environ.get("GATEWAY_CEPH_TIMEOUT"), "GATEWAY_CEPH_TIMEOUT"))

    # How long a writer lease on an RBD image lasts unless renewed (renewed every quarter).
    lease_seconds: float = field(default_factory=lambda: ceph_seconds(
        os.environ.get("GATEWAY_LEASE_SECONDS"), "GATEWAY_LEASE_SECONDS",
        default=DEFAULT_LEASE_SECONDS, least=MIN_LEASE_SECONDS))
    # This host's id: the cookie of its writer leases on RBD images.
    host_id: str = field(default_factory=lambda: host_id(os.environ.get("GATEWAY_HOST_ID"),
                                                         "GATEWAY_HOST_ID"))

    @property
    def catalog_path(self) -> Path:
        return self.state_dir / "catalog.db"

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"
