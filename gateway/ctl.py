"""gatewayctl: the human and script front end of the admin socket.

Imports stay light (no trio, no libvirt) so that a command starts fast; the few commands that work
without a daemon import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from gateway.errors import GatewayError

Command = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def default_socket() -> str:
    from gateway.config import default_socket as find
    return str(find())


def call(ns: argparse.Namespace, op: str, args: dict[str, Any] | None = None) -> Any:
    from gateway.client import call as client_call
    return client_call(ns.socket, op, args or {}, timeout=ns.timeout)


def emit(ns: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> int:
    if getattr(ns, "json", False):
        print(json.dumps(value, indent=2, sort_keys=True))
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


# Commands.
def cmd_status(ns: argparse.Namespace) -> int:
    result = call(ns, "status")
    return emit(ns, result, lambda r: mapping([(k, r[k]) for k in sorted(r)
                                               if not isinstance(r[k], (dict, list))]))


def volume_row(v: dict[str, Any]) -> list[Any]:
    attachment = v.get("attachment") or {}
    return [v["name"], v["format"], size_text(v["virtual_size"]), "ro" if v["read_only"] else "rw",
            "yes" if v.get("exported") else "no", attachment.get("mode"), v["path"]]


def cmd_volume_add(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-add", {"name": ns.name, "path": ns.path, "format": ns.format,
                                     "read_only": ns.read_only, "nosuid": ns.nosuid,
                                     "noexec": ns.noexec})
    return emit(ns, result, lambda r: f"added {r['name']} ({r['format']}, "
                                      f"{size_text(r['virtual_size'])}) from {r['path']}")


def cmd_volume_ls(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-list")
    headers = ("NAME", "FORMAT", "SIZE", "MODE", "EXPORTED", "MOUNTED", "PATH")
    return emit(ns, result, lambda r: table(headers, [volume_row(v) for v in r]))


def cmd_volume_show(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-show", {"name": ns.name})

    def human(v: dict[str, Any]) -> str:
        pairs: list[tuple[str, Any]] = [(k, v.get(k)) for k in (
            "name", "path", "format", "virtual_size", "read_only", "nosuid", "noexec", "fstype",
            "created", "exported", "uri")]
        attachment = v.get("attachment")
        pairs.append(("attachment", None if not attachment else
                      f"{attachment['mode']} at {attachment['rootfs']} ({attachment['state']})"))
        return mapping(pairs)
    return emit(ns, result, human)


def cmd_volume_rm(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-remove", {"name": ns.name})
    return emit(ns, result, lambda r: f"removed {r['name']}")


def cmd_probe_image(ns: argparse.Namespace) -> int:
    from gateway.probe_image import probe_image
    result = probe_image(ns.path, ns.format)
    return emit(ns, result, probe_text)


def probe_text(r: dict[str, Any]) -> str:
    rows = [[p["number"], p["start"], p["size"], p["type"], p["fs"]] for p in r["partitions"]]
    root = r["rootfs"]
    head = (f"table: {r['table']}  sector size: {r['sector_size']}\n"
            f"rootfs: {'whole disk' if root['number'] == 0 else 'partition ' + str(root['number'])}"
            f" at {root['start']} size {root['size']} fs {root['fs']}")
    if not rows:
        return head
    return head + "\n" + table(("NUMBER", "START", "SIZE", "TYPE", "FS"), rows)


def build_parser() -> Parser:
    parser = Parser(prog="gatewayctl", description="storage-gateway admin CLI")
    parser.add_argument("--socket", default=None,
                        help="admin socket (default RUN_DIR/admin.sock, env GATEWAY_SOCKET)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("status", help="daemon health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    volume = sub.add_parser("volume", help="manage volumes").add_subparsers(
        dest="volume_command", required=True, parser_class=Parser)
    p = volume.add_parser("add", help="register an image with a pinned format")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--format", required=True, help="raw or qcow2 (never guessed)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--nosuid", action="store_true", help="mount the rootfs nosuid")
    p.add_argument("--noexec", action="store_true", help="mount the rootfs noexec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_add)
    p = volume.add_parser("ls", help="list volumes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_ls)
    p = volume.add_parser("show", help="show one volume")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_show)
    p = volume.add_parser("rm", help="unregister a volume (the image file stays)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_rm)

    p = sub.add_parser("probe-image", help="find the rootfs of an image file (no daemon needed)")
    p.add_argument("path")
    p.add_argument("--format", required=True, choices=["raw", "qcow2"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_probe_image)
    for extend in EXTENSIONS:
        extend(sub)
    return parser


# Further command groups register here (see the modules that append to it).
EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.socket is None:
        ns.socket = default_socket()
    try:
        return int(ns.fn(ns))
    except GatewayError as exc:
        print(f"gatewayctl: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gatewayctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
