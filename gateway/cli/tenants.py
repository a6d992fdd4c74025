"""gatewayctl volume publish / unpublish / chown: tenancy, admin only (see gateway.tenants)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.base import call, emit


def _tenancy(r: dict[str, Any]) -> str:
    owner = "the admin" if r.get("owner") is None else f"uid {r['owner']}"
    published = "published for tenants" if r.get("published") else "not published"
    return f"{r['name']}: owned by {owner}, {published}"


def cmd_publish(ns: argparse.Namespace) -> int:
    return emit(ns, call(ns, "volume-publish", {"name": ns.name}), _tenancy)


def cmd_unpublish(ns: argparse.Namespace) -> int:
    return emit(ns, call(ns, "volume-unpublish", {"name": ns.name}), _tenancy)


def cmd_chown(ns: argparse.Namespace) -> int:
    return emit(ns, call(ns, "volume-chown", {"name": ns.name, "user": ns.user}), _tenancy)


def register(top: Any, groups: dict[str, Any]) -> None:
    volume = groups["volume"]
    p = volume.add_parser("publish", help="let tenants make overlays of a volume (admin only)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_publish)
    p = volume.add_parser("unpublish", help="no new tenant overlays of a volume (admin only)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_unpublish)
    p = volume.add_parser("chown", help="give a volume to a user (root: back to the admin; "
                                        "admin only)")
    p.add_argument("name")
    p.add_argument("user", help="a user name or uid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_chown)
