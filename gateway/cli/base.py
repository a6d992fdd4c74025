"""What every gatewayctl command module uses: the argument parser class, the admin call, output
helpers and shared options. It imports no other cli module (they all import it), and stays light:
the admin client loads only when a command calls gatewayd.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def call(ns: argparse.Namespace, op: str, args: dict[str, Any] | None = None) -> Any:
    from gateway.admin import client
    return client.call(ns.socket, op, args or {}, timeout=ns.timeout,
                       wait=getattr(ns, "wait", None))


def absolute(path: str) -> str:
    """A path argument as gatewayd needs it on the wire: a relative one is taken against
    gatewayctl's working directory (not normalised: `..` after a symlink is gatewayd's to
    resolve)."""
    if os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except FileNotFoundError:
        from gateway.errors import InvalidArgument
        raise InvalidArgument(f"cannot resolve {path}: the working directory no longer "
                              "exists; give an absolute path") from None


def emit(ns: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> int:
    if getattr(ns, "json", False):
        print(json.dumps(value, indent=2))
    else:
        text = human(value)
        if text:
            print(text)
    return 0


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def mapping(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {'-' if v is None else v}" for k, v in pairs)


def add_mount_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setuid", action="store_true",
                   help="honour setuid binaries in the rootfs (default: mounted nosuid)")
    p.add_argument("--nosuid", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--noexec", action="store_true", help="mount the rootfs noexec")


def mount_flag_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The mount-flag arguments of a request that makes a volume (nosuid is the default)."""
    return {"setuid": ns.setuid, "noexec": ns.noexec}
