"""gatewayctl: the human and script front end of the admin socket.

Imports stay light (no trio, no libvirt) so that a command starts fast; the few commands that work
without a daemon import what they need when they run. The commands live here and in the modules
imported below (lifecycle: volume create/import/resize and jobs; systemd: install-systemd), which
share gateway.cli.base and never import this module. Path arguments sent to gatewayd are made
absolute against the working directory first (gatewayd takes absolute paths only).

Start-up (issue 20): parse() builds only the parser of the command being run (the others stay
base.Unbuilt: names and help only), and the console script, run(), ends the process without the
interpreter's teardown once the output is flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gateway.cli import lifecycle, systemd, tenants
from gateway.cli.base import (
    Parser,
    Unbuilt,
    absolute,
    add_commands,
    add_mount_flags,
    call,
    command_word,
    emit,
    mapping,
    mount_flag_args,
    size_text,
    table,
)
from gateway.errors import GatewayError, InvalidArgument


def default_socket() -> str:
    from gateway.config import default_socket as find
    return str(find())


# Commands.
def cmd_status(ns: argparse.Namespace) -> int:
    result = call(ns, "status")

    def human(r: dict[str, Any]) -> str:
        pairs = [(k, r[k]) for k in sorted(r) if not isinstance(r[k], (dict, list))]
        security = r.get("security") or {}
        if security.get("warning"):
            pairs.append(("warning", security["warning"]))
        return mapping(pairs)
    return emit(ns, result, human)


def volume_row(v: dict[str, Any]) -> list[Any]:
    attachment = v.get("attachment") or {}
    return [v["name"], v["format"], size_text(v["virtual_size"]), "ro" if v["read_only"] else "rw",
            "idle" if v.get("export_idle") else "yes" if v.get("exported") else "no",
            attachment.get("mode"), v["path"]]


def cmd_volume_add(ns: argparse.Namespace) -> int:
    flags = {"read_only": ns.read_only, "fstype": ns.fstype, **mount_flag_args(ns)}
    if ns.rbd or ns.ceph_conf or ns.ceph_user:
        if ns.path or ns.pool or ns.vol or not ns.rbd:
            raise InvalidArgument("give --rbd POOL[/NAMESPACE]/IMAGE (with --ceph-conf and "
                                  "--ceph-user if needed), without PATH or --pool/--vol")
        result = call(ns, "volume-add-rbd", {
            "name": ns.name, "rbd": ns.rbd, "format": ns.format, "ceph_user": ns.ceph_user,
            "ceph_conf": absolute(ns.ceph_conf) if ns.ceph_conf else None, **flags})
    elif ns.pool or ns.vol:
        if ns.path or not (ns.pool and ns.vol and ns.format):
            raise InvalidArgument("give either PATH --format F, or --pool POOL --vol VOL "
                                  "--format F (which must agree with the pool volume's XML)")
        args = {"name": ns.name, "pool": ns.pool, "vol": ns.vol, "format": ns.format, **flags}
        result = call(ns, "volume-add-pool", args)
    else:
        if not ns.path or not ns.format:
            raise InvalidArgument("PATH and --format raw|qcow2 are required "
                                  "(or --pool POOL --vol VOL --format F)")
        result = call(ns, "volume-add", {"name": ns.name, "path": absolute(ns.path),
                                         "format": ns.format, **flags})
    return emit(ns, result, lambda r: f"added {r['name']} ({r['format']}, "
                                      f"{size_text(r['virtual_size'])}) from {r['path']}")


def cmd_volume_release(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-release", {"name": ns.name})
    return emit(ns, result, lambda r: f"released {r['name']}" if r["released"]
                else f"{r['name']}: this host held no writer lease on it")


def cmd_volume_set(ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"name": ns.name}
    if ns.setuid is not None:
        args["setuid"] = ns.setuid
    if ns.noexec is not None:
        args["noexec"] = ns.noexec
    result = call(ns, "volume-set", args)
    return emit(ns, result, lambda r: f"{r['name']}: nosuid={r['nosuid']} noexec={r['noexec']}")


def cmd_volume_ls(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-list")
    headers = ("NAME", "FORMAT", "SIZE", "MODE", "EXPORTED", "MOUNTED", "PATH")
    return emit(ns, result, lambda r: table(headers, [volume_row(v) for v in r]))


def cmd_volume_show(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-show", {"name": ns.name})

    def human(v: dict[str, Any]) -> str:
        pairs: list[tuple[str, Any]] = [(k, v.get(k)) for k in (
            "name", "path", "format", "virtual_size", "read_only", "nosuid", "noexec", "fstype",
            "created", "origin", "base", "overlays", "exported", "export_idle", "standby_loop",
            "uri")]
        attachment = v.get("attachment")
        pairs.append(("attachment", None if not attachment else
                      f"{attachment['mode']} at {attachment['rootfs']} ({attachment['state']})"))
        return mapping(pairs)
    return emit(ns, result, human)


def cmd_volume_rm(ns: argparse.Namespace) -> int:
    result = call(ns, "volume-remove", {"name": ns.name})
    return emit(ns, result, lambda r: f"removed {r['name']}")


def cmd_probe_image(ns: argparse.Namespace) -> int:
    from gateway.probe.image import probe_image
    result = probe_image(absolute(ns.path), ns.format)
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


def cmd_export(ns: argparse.Namespace) -> int:
    result = call(ns, "export", {"name": ns.name})
    return emit(ns, result, lambda r: r["uri"])


def cmd_unexport(ns: argparse.Namespace) -> int:
    result = call(ns, "unexport", {"name": ns.name})
    return emit(ns, result, lambda r: f"unexported {r['name']}")


def cmd_probe(ns: argparse.Namespace) -> int:
    return emit(ns, call(ns, "probe", {"name": ns.name}), probe_text)


def cmd_mount(ns: argparse.Namespace) -> int:
    result = call(ns, "mount", {"name": ns.name, "mode": ns.mode, "userns": ns.userns})
    if ns.json:
        shown = {"rootfs": result["rootfs"], "mode": result["mode"]}
        if result.get("idmap") is not None:  # a --userns mount's map
            shown["idmap"] = result["idmap"]
        print(json.dumps(shown))
        return 0
    print(result["rootfs"])
    return 0


def cmd_umount(ns: argparse.Namespace) -> int:
    result = call(ns, "umount", {"name": ns.name, "force": ns.force})
    return emit(ns, result, lambda r: f"unmounted {r['name']}")


def domain_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"name": ns.name, "volume": ns.volume, "mode": ns.mode, "init": ns.init,
            "args": ns.arg or [], "memory": ns.memory, "vcpus": ns.vcpus}


def cmd_domain_start(ns: argparse.Namespace) -> int:
    result = call(ns, "domain-start", {**domain_args(ns), "userns": ns.userns,
                                       "release_host_view": ns.release_host_view})
    return emit(ns, result, lambda r: f"started {r['name']} on {r['rootfs']} ({r['mode']} mode)")


def cmd_domain_stop(ns: argparse.Namespace) -> int:
    result = call(ns, "domain-stop", {"name": ns.name})
    return emit(ns, result, lambda r: f"stopped {r['name']}" if r["stopped"]
                else f"no domain {r['name']}")


def cmd_domain_ls(ns: argparse.Namespace) -> int:
    result = call(ns, "domain-list")
    return emit(ns, result, lambda r: table(("NAME", "STATE", "VOLUME", "MODE"),
                                            [[d["name"], d["state"], d["volume"], d["mode"]]
                                             for d in r]))


def cmd_domain_xml(ns: argparse.Namespace) -> int:
    result = call(ns, "domain-xml", domain_args(ns))
    print(result["xml"])
    return 0


def cmd_metrics(ns: argparse.Namespace) -> int:
    sys.stdout.write(call(ns, "metrics")["text"])
    return 0


def cmd_shutdown(ns: argparse.Namespace) -> int:
    result = call(ns, "shutdown", {"all": ns.all, "force": ns.force})
    return emit(ns, result, lambda r: "gatewayd is stopping; " + (
        "every mount, export, the data plane and qemu-storage-daemon were stopped" if r["all"]
        else "the data plane and every mount stay"))


def cmd_install_hook(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.libvirt.hook import install_hook
    outcome = install_hook(Path(absolute(ns.hooks_dir)), absolute(ns.socket),
                           chain=not ns.no_chain)
    print(f"libvirt lxc hook {outcome} in {ns.hooks_dir}")
    return 0


def add_domain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--volume", required=True)
    p.add_argument("--mode", choices=["bind", "fuse"], default="bind")
    p.add_argument("--init", default="/sbin/init")
    p.add_argument("--arg", action="append", help="argument for init (repeatable)")
    p.add_argument("--memory", type=int, default=128, help="MiB")
    p.add_argument("--vcpus", type=int, default=1)


# Top-level options that take a value (a command word never follows them directly).
VALUED_OPTIONS = ("--socket", "--timeout", "--wait")


def build_parser(only: str | None = None) -> Parser:
    """gatewayctl's parser; with `only`, just that command's parser is built in full (the
    others keep their names and help: see Unbuilt)."""
    parser = Parser(prog="gatewayctl", description="storage-gateway admin CLI")
    parser.add_argument("--socket", default=None,
                        help="admin socket (default RUN_DIR/admin.sock, env GATEWAY_SOCKET)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for an answer")
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="seconds to keep trying while gatewayd is not listening, as during "
                             "a restart (env GATEWAY_CONNECT_WAIT; default 5)")
    sub = add_commands(parser, only, dest="command", required=True)

    p = sub.add_parser("status", help="daemon health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    volume = sub.add_parser("volume", help="manage volumes").add_subparsers(
        dest="volume_command", required=True, parser_class=Parser)
    p = volume.add_parser("add", help="register an image with a pinned format")
    p.add_argument("name")
    p.add_argument("path", nargs="?")
    p.add_argument("--format", help="raw or qcow2 (never guessed)")
    p.add_argument("--pool", help="libvirt storage pool (with --vol; the format comes from "
                                  "the pool volume's XML)")
    p.add_argument("--vol", help="volume in --pool (through gatewayd's own libvirt URI)")
    p.add_argument("--rbd", metavar="POOL[/NAMESPACE]/IMAGE",
                   help="a Ceph RBD image (raw only; the format pinned in the image's metadata, "
                        "or --format raw to pin it there)")
    p.add_argument("--ceph-conf", metavar="PATH", help="ceph.conf of the image's cluster")
    p.add_argument("--ceph-user", metavar="ID", help="ceph client id (default admin)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--fstype", choices=["ext2", "ext3", "ext4", "xfs", "btrfs"],
                   help="pin the rootfs filesystem type now (default: pinned at first mount)")
    add_mount_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_add)
    p = volume.add_parser("set", help="change how a volume's rootfs is mounted (unmounted only)")
    p.add_argument("name")
    p.add_argument("--setuid", action=argparse.BooleanOptionalAction, default=None,
                   help="honour setuid binaries in the rootfs (--no-setuid: nosuid)")
    p.add_argument("--noexec", action=argparse.BooleanOptionalAction, default=None,
                   help="mount the rootfs noexec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_set)
    p = volume.add_parser("release", help="give up this host's writer lease on an RBD volume "
                                          "(unmounted), so another host may write it")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_volume_release)
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
    for name, fn, help_text in (("export", cmd_export, "export a volume over NBD"),
                                ("unexport", cmd_unexport, "remove a volume's NBD export"),
                                ("probe", cmd_probe, "probe a volume through its export")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)
    p = sub.add_parser("mount", help="mount a volume's rootfs at RUN_DIR/rootfs/NAME")
    p.add_argument("name")
    p.add_argument("--mode", choices=["bind", "fuse"], default="bind")
    p.add_argument("--userns", action="store_true",
                   help="a rootfs whose ids are shifted into an id slice of its own (bind "
                        "mode: an idmapped mount; fuse mode: an id-shifting layer)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_mount)
    p = sub.add_parser("umount", help="tear a volume's rootfs mount down")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="lazy umount if busy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_umount)

    domain = sub.add_parser("domain", help="libvirt-lxc domains on gateway rootfs").add_subparsers(
        dest="domain_command", required=True, parser_class=Parser)
    p = domain.add_parser("start", help="mount the volume, define and start the domain")
    add_domain_options(p)
    p.add_argument("--release-host-view", action="store_true",
                   help="drop the host's view of the rootfs once the container runs")
    p.add_argument("--userns", action="store_true",
                   help="run the container in a user namespace with an id slice of its own "
                        "(the rootfs ids are shifted, the image never chowned)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_domain_start)
    p = domain.add_parser("stop", help="destroy the domain and tear its mount down")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_domain_stop)
    p = domain.add_parser("ls", help="list gateway domains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_domain_ls)
    p = domain.add_parser("xml", help="print the domain XML without starting anything")
    add_domain_options(p)
    p.set_defaults(fn=cmd_domain_xml)

    groups = {"volume": volume, "domain": domain}
    lifecycle.register(sub, groups)
    systemd.register(sub, groups)
    tenants.register(sub, groups)

    p = sub.add_parser("metrics", help="Prometheus text exposition")
    p.set_defaults(fn=cmd_metrics)
    p = sub.add_parser("shutdown", help="stop gatewayd (running containers keep their rootfs)")
    p.add_argument("--all", action="store_true",
                   help="also unmount everything and stop the data plane and "
                        "qemu-storage-daemon (refused while gateway domains run)")
    p.add_argument("--force", action="store_true",
                   help="with --all: stop running gateway domains first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_shutdown)
    p = sub.add_parser("install-hook", help="install the libvirt lxc hook")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
    p.add_argument("--no-chain", action="store_true",
                   help="refuse instead of chaining to an existing foreign hook")
    p.set_defaults(fn=cmd_install_hook)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed as build_parser() parses it but with only its command's parser
    built (argparse's errors and --help exit as usual)."""
    words = lifecycle.legacy_job_argv(list(argv))
    try:
        return build_parser(command_word(words, VALUED_OPTIONS)).parse_args(words)
    except Unbuilt.Chosen:  # the guess was wrong: parse with every command built
        return build_parser().parse_args(words)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
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


def run() -> NoReturn:
    """The gatewayctl console script: main(), then, once the output is flushed, the process
    ends without the interpreter's teardown (finalizing every module and object: about 6 ms, a
    tenth of a short command here). main() stays a plain function for callers that go on."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(code)  # the interpreter's own exit reports it, as it always did
    os._exit(code)


if __name__ == "__main__":
    run()
