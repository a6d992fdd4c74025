"""Daemon and client settings: command-line flags over environment over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/storage-gateway")
DEFAULT_RUN_DIR = Path("/run/storage-gateway")
DEFAULT_EXPORT_LINGER = 10.0


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
    allowed_roots: tuple[Path, ...] = field(
        default_factory=lambda: parse_roots(os.environ.get("GATEWAY_ALLOWED_ROOTS")))
    log_level: str = field(default_factory=lambda: os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    # libvirt connection followed for domain lifecycle events; "" turns that off.
    libvirt_uri: str = field(default_factory=lambda: os.environ.get("GATEWAY_LIBVIRT_URI",
                                                                    "lxc:///"))
    # Seconds an export made by a mount stays open after the umount, for a quick remount.
    export_linger: float = field(
        default_factory=lambda: env_seconds("GATEWAY_EXPORT_LINGER", DEFAULT_EXPORT_LINGER))

    @property
    def catalog_path(self) -> Path:
        return self.state_dir / "catalog.db"

    @property
    def admin_socket(self) -> Path:
        return self.run_dir / "admin.sock"
