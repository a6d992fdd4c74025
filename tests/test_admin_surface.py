"""The admin surface agrees with itself and with its clients.

- The op table (gateway.admin.ops.OPS) and the argument declarations (gateway.admin.args.SPECS)
  name the same ops; gatewayctl (every command, found by walking its argparse tree, with its
  requests captured by a fake admin call) and the libvirt hook (its real script, run against a
  socket that records what it is sent) send only ops of the table and keys their op declares,
  and between them use every op and every key.
- Argument parsing: unknown keys are refused naming the key and the op, the old messages stay.
- No import cycle inside gateway/.
- Jobs: the JobTable cancels a running job, a job waiting for a thread, a job that finished as
  it was told to stop, and every job at shutdown.
- Through a real gatewayd: gatewayctl resolves relative paths against its working directory
  (the wire still takes absolute paths only) and `job cancel` stops a real copy.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

import gateway
from gateway import errors
from gateway.admin import args as arguments
from gateway.admin.client import Client, call
from gateway.admin.jobs import JobTable
from gateway.admin.ops import OPS
from gateway.catalog import Volume
from gateway.cli import lifecycle as cli_lifecycle
from gateway.cli import main as cli
from gateway.libvirt import hook
from gateway.libvirt.domain import domain_xml
from gateway.testing.images import ImageSet, copy_image
from gateway.userns.slices import IdMap

if TYPE_CHECKING:  # not imported: conftest marks modules that import it as integration only
    from gateway.testing.daemon import Daemon

pytestmark = pytest.mark.timeout(60)
GATEWAY = Path(gateway.__file__).parent

# ---- the op table ------------------------------------------------------------------------------


def test_op_table_and_declarations_name_the_same_ops() -> None:
    assert set(OPS) == set(arguments.SPECS)
    for name, handler in OPS.items():
        assert inspect.iscoroutinefunction(handler), name
        assert list(inspect.signature(handler).parameters) == ["gw", "args"], name
    assert {"job-cancel", "job-status", "job-list"} <= set(OPS)


# ---- gatewayctl --------------------------------------------------------------------------------

# Commands that never call gatewayd.
LOCAL = {("probe-image",), ("install-hook",), ("install-systemd",)}

# Every gatewayctl command that talks to gatewayd, with all its options between the examples.
EXAMPLES: list[list[str]] = [
    ["status", "--json"],
    ["metrics"],
    ["shutdown"],
    ["shutdown", "--all", "--force", "--json"],
    ["volume", "add", "v", "disk.img", "--format", "raw", "--read-only", "--fstype", "ext4",
     "--setuid", "--noexec", "--json"],
    ["volume", "add", "v", "/abs/disk.img", "--format", "qcow2", "--nosuid"],
    ["volume", "add", "v", "--pool", "p", "--vol", "x.qcow2", "--format", "qcow2",
     "--read-only", "--fstype", "xfs", "--setuid", "--noexec"],
    ["volume", "add", "v", "--rbd", "pool/ns/img", "--ceph-conf", "ceph.conf", "--ceph-user",
     "gw", "--format", "raw", "--read-only", "--fstype", "ext4", "--setuid", "--noexec"],
    ["volume", "set", "v", "--setuid", "--noexec", "--json"],
    ["volume", "set", "v", "--no-setuid", "--no-noexec"],
    ["volume", "release", "v", "--json"],
    ["volume", "ls", "--json"],
    ["volume", "show", "v", "--json"],
    ["volume", "rm", "v", "--json"],
    ["volume", "publish", "v", "--json"],
    ["volume", "unpublish", "v", "--json"],
    ["volume", "chown", "v", "alice", "--json"],
    ["volume", "create", "v", "--from", "b", "--overlay", "--setuid", "--nosuid", "--json"],
    ["volume", "create", "v", "--from", "b", "--copy", "--format", "raw", "--noexec"],
    ["volume", "create", "v", "--size", "1G", "--format", "raw", "--mkfs", "ext4", "--pool",
     "rbd", "--ceph-conf", "ceph.conf", "--ceph-user", "gw"],
    ["volume", "create", "v", "--size", "1G", "--format", "qcow2", "--mkfs", "xfs", "--label",
     "root", "--partitioned"],
    ["volume", "import", "v", "--tarball", "root.tar", "--size", "256M", "--format", "qcow2",
     "--label", "root", "--partitioned", "--setuid", "--nosuid", "--noexec", "--json"],
    ["volume", "resize", "v", "--size", "2G", "--json"],
    ["volume", "snapshot", "v", "--to", "snap", "--format", "qcow2", "--rate-limit", "64M",
     "--json"],
    ["volume", "snapshot", "v", "--to", "snap"],
    ["volume", "save", "v", "out.qcow2", "--format", "qcow2", "--compress", "--force",
     "--rate-limit", "1048576", "--json"],
    ["volume", "save", "v", "/abs/out.raw", "--format", "raw"],
    ["export", "v", "--json"],
    ["unexport", "v", "--json"],
    ["probe", "v", "--json"],
    ["mount", "v", "--mode", "fuse", "--json"],
    ["mount", "v", "--userns"],
    ["umount", "v", "--force", "--json"],
    ["domain", "start", "d1", "--volume", "v", "--mode", "fuse", "--init", "/bin/sh", "--arg=-c",
     "--arg", "true", "--memory", "64", "--vcpus", "2", "--release-host-view", "--json"],
    ["domain", "start", "d2", "--volume", "v", "--userns"],
    ["domain", "stop", "d1", "--json"],
    ["domain", "ls", "--json"],
    ["domain", "xml", "d1", "--volume", "v", "--mode", "bind", "--init", "/sbin/init", "--arg",
     "x", "--memory", "128", "--vcpus", "1"],
    ["job", "show", "3", "--json"],
    ["job", "cancel", "3", "--json"],
    ["job", "ls", "--json"],
]


class Sent(Exception):
    """Raised by the fake admin call: what gatewayctl would have sent."""

    def __init__(self, op: str, args: dict[str, Any]) -> None:
        super().__init__(op)
        self.op = op
        self.sent = args


def leaves(parser: argparse.ArgumentParser,
           path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                         argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for sub in subs:
        for name, child in sub.choices.items():
            yield from leaves(child, (*path, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {max(a.option_strings, key=len) for a in parser._actions
            if a.option_strings and a.dest != "help"}


def command_of(argv: list[str], paths: set[tuple[str, ...]]) -> tuple[str, ...]:
    return next(p for p in paths if tuple(argv[:len(p)]) == p)


@pytest.fixture
def sent_by_cli(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """argv (joined) -> op -> the args of each request, for every example."""
    from gateway.admin import client

    def fake_call(socket_path: object, op: str, args: dict[str, Any] | None = None,
                  timeout: float = 60.0, wait: float | None = None) -> Any:
        raise Sent(op, dict(args or {}))
    monkeypatch.setattr(client, "call", fake_call)
    parser = cli.build_parser()
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for argv in EXAMPLES:
        ns = parser.parse_args(["--socket", "/nonexistent/admin.sock", *argv])
        with pytest.raises(Sent) as info:
            ns.fn(ns)
        out.setdefault(" ".join(argv), {}).setdefault(info.value.op, []).append(info.value.sent)
    return out


def test_every_cli_command_and_option_is_exercised() -> None:
    tree = dict(leaves(cli.build_parser()))
    covered = {command_of(argv, set(tree)) for argv in EXAMPLES}
    assert set(tree) == covered | LOCAL, "a gatewayctl command has no example here"
    assert not covered & LOCAL
    for path in covered:
        given = {word for argv in EXAMPLES if command_of(argv, set(tree)) == path
                 for word in argv}
        missing = {o for o in options(tree[path]) if not any(
            w == o or w.startswith(o + "=") or w == "--no-" + o[2:] for w in given)}
        assert not missing, (path, missing)


def test_cli_sends_only_declared_ops_and_keys(
        sent_by_cli: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    for argv, by_op in sent_by_cli.items():
        for op, requests in by_op.items():
            assert op in OPS, (argv, op)
            for args in requests:
                assert set(args) <= set(arguments.SPECS[op]), (argv, op, set(args))
                arguments.parse(op, args)  # every value the CLI sends passes the op's checks


def test_cli_sends_absolute_paths(
        sent_by_cli: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    cwd = os.getcwd()
    added = sent_by_cli[" ".join(next(e for e in EXAMPLES if e[:4] == [
        "volume", "add", "v", "disk.img"]))]["volume-add"][0]
    assert added["path"] == os.path.join(cwd, "disk.img")
    imported = next(by_op["volume-import"][0] for by_op in sent_by_cli.values()
                    if "volume-import" in by_op)
    assert imported["tarball"] == os.path.join(cwd, "root.tar")
    absolute = sent_by_cli[" ".join(next(e for e in EXAMPLES if e[:4] == [
        "volume", "add", "v", "/abs/disk.img"]))]["volume-add"][0]
    assert absolute["path"] == "/abs/disk.img"


def test_legacy_job_id_still_shows_the_job() -> None:
    parser = cli.build_parser()
    ns = parser.parse_args(cli_lifecycle.legacy_job_argv(["--socket", "/s", "job", "7"]))
    assert ns.fn is cli_lifecycle.cmd_job_show and ns.id == "7"
    ns = parser.parse_args(cli_lifecycle.legacy_job_argv(["job", "cancel", "7"]))
    assert ns.fn is cli_lifecycle.cmd_job_cancel and ns.id == "7"


# ---- the libvirt hook --------------------------------------------------------------------------


def run_hook(script: Path, sock: Path, operation: str, xml: str) -> list[dict[str, Any]]:
    """Run the real hook script for one operation; return the requests it sent."""
    got: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(4)
    server.settimeout(20)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn, conn.makefile("rwb") as f:
            request = json.loads(f.readline())
            got.append(request)
            result = {"rootfs": "/run/gw/rootfs/v", "mode": "bind"}
            f.write(json.dumps({"id": request["id"], "ok": True, "result": result}).encode()
                    + b"\n")
            f.flush()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        proc = subprocess.run([str(script), "dom1", operation, "begin", "-"], input=xml.encode(),
                              capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes an accept that no hook run will answer
        server.close()
        thread.join(timeout=20)
        sock.unlink(missing_ok=True)
    return got


def test_hook_sends_only_declared_ops_and_keys(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    script = tmp_path / "lxc"
    script.write_text(hook.hook_script(str(sock), str(tmp_path / "chained"), sys.executable))
    script.chmod(0o755)
    xml = domain_xml("dom1", "/run/gw/rootfs/v", "v", "bind")
    sent = {op: run_hook(script, sock, op, xml) for op in ("prepare", "release", "start")}
    assert sent["start"] == []  # only prepare and release reach gatewayd
    for requests in sent.values():
        for request in requests:
            assert request["op"] in OPS, request
            assert set(request["args"]) <= set(arguments.SPECS[request["op"]]), request
            arguments.parse(request["op"], request["args"])
    assert [r["op"] for r in sent["prepare"]] == ["mount"]
    assert [r["op"] for r in sent["release"]] == ["umount"]


def test_clients_use_every_op_and_key(sent_by_cli: dict[str, dict[str, list[dict[str, Any]]]],
                                      tmp_path: Path) -> None:
    used: dict[str, set[str]] = {}
    for by_op in sent_by_cli.values():
        for op, requests in by_op.items():
            for args in requests:
                used.setdefault(op, set()).update(args)
    sock, script = tmp_path / "admin.sock", tmp_path / "lxc"
    script.write_text(hook.hook_script(str(sock), str(tmp_path / "chained"), sys.executable))
    script.chmod(0o755)
    plain = domain_xml("dom1", "/run/gw/rootfs/v", "v", "bind")
    userns = domain_xml("dom2", "/run/gw/rootfs/v", "v", "bind",
                        ids=IdMap(uid_first=2000000000, gid_first=2000000000, count=65536))
    for xml in (plain, userns):
        for operation in ("prepare", "release"):
            for request in run_hook(script, sock, operation, xml):
                used.setdefault(request["op"], set()).update(request["args"])
    assert set(used) == set(OPS)
    # keys only API callers send: `nosuid` (the old default spelled out) and `uri` (refused)
    api_only = {(op, "nosuid") for op in ("volume-add", "volume-add-pool", "volume-add-rbd",
                                          "volume-create", "volume-import")} | {
        ("volume-add-pool", "uri")}
    unused = {(op, key) for op, spec in arguments.SPECS.items() for key in spec
              if key not in used.get(op, set())}
    assert unused == api_only


# ---- argument parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "args", "words"), [
    ("volume-show", {"name": "v", "path": "/x"}, ["'path'", "volume-show", "name"]),
    ("status", {"verbose": True}, ["'verbose'", "status", "no arguments"]),
    ("mount", {"name": "v", "mdoe": "fuse"}, ["'mdoe'", "mount"]),
    ("job-cancel", {"id": "1", "x" * 500: 1}, ["job-cancel", "..."]),
])
def test_unknown_keys_are_refused(op: str, args: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        arguments.parse(op, args)
    message = info.value.message
    assert "\n" not in message and len(message) < 200
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("op", "args", "expected", "kind"), [
    ("volume-add", {"name": "v", "path": "/x", "format": "raw", "read_only": "yes"},
     "read_only must be true or false", errors.InvalidArgument),
    ("volume-add", {"name": "Bad/", "path": "/x", "format": "raw"}, "invalid volume name",
     errors.InvalidArgument),
    ("volume-add", {"name": "v", "path": "/x", "format": "vmdk"}, "unknown format 'vmdk'",
     errors.InvalidArgument),
    ("volume-add", {"name": "v", "path": 7, "format": "raw"}, "an image path is required",
     errors.InvalidArgument),
    ("volume-add", {"name": "v", "path": "/x", "format": "raw", "fstype": "ntfs"},
     "unknown filesystem type", errors.InvalidArgument),
    ("volume-add-pool", {"name": "v", "pool": "p", "vol": "x", "format": "raw", "uri": "x"},
     "cannot name a libvirt URI", errors.PermissionDenied),
    ("volume-add-pool", {"name": "v", "pool": "", "vol": "x"}, "pool must be a non-empty string",
     errors.InvalidArgument),
    ("mount", {"name": "v", "mode": 3}, "mode must be bind or fuse", errors.InvalidArgument),
    ("domain-xml", {"name": "d", "volume": "v", "init": 5}, "init must be a path",
     errors.InvalidArgument),
    ("domain-xml", {"name": "d", "volume": "v", "memory": 0}, "memory must be a positive integer",
     errors.InvalidArgument),
    ("domain-xml", {"name": "d", "volume": "v", "args": "x"}, "args must be a list of strings",
     errors.InvalidArgument),
    ("domain-stop", {"name": "-d"}, "invalid domain name", errors.InvalidArgument),
    ("volume-resize", {"name": "v", "size": "1.5G"}, "invalid size", errors.InvalidArgument),
    ("volume-import", {"name": "v", "tarball": "/t.tar"}, "invalid size None",
     errors.InvalidArgument),
    ("job-status", {"id": True}, "id must be a job id", errors.InvalidArgument),
])
def test_declared_checks_keep_their_messages(op: str, args: dict[str, Any], expected: str,
                                             kind: type[errors.GatewayError]) -> None:
    with pytest.raises(kind) as info:
        arguments.parse(op, args)
    assert expected in info.value.message


def test_optional_keys_keep_their_semantics() -> None:
    parsed = arguments.parse("volume-create", {"name": "v", "from": None, "size": None,
                                               "mkfs": "ext4", "format": "raw"})
    assert parsed.opt_text("from") is None and not parsed.given("size")
    with pytest.raises(errors.InvalidArgument, match="invalid size None"):
        parsed.number("size")  # a blank volume needs it: the parser's own message
    assert arguments.parse("volume-set", {"name": "v", "noexec": True}).opt_flag("setuid") is None
    with pytest.raises(errors.InvalidArgument, match="setuid must be true or false"):
        arguments.parse("volume-set", {"name": "v", "setuid": None})
    domain = arguments.parse("domain-xml", {"name": "d", "volume": "v", "mode": ""})
    assert (domain.text("mode"), domain.text("init"), domain.number("memory"),
            domain.words("args")) == ("bind", "/sbin/init", 128, [])
    with pytest.raises(errors.InvalidArgument, match="contradict"):
        arguments.mount_flags(arguments.parse("volume-create", {"name": "v", "setuid": True,
                                                                "nosuid": True}))


def test_reading_an_undeclared_key_is_an_internal_error() -> None:
    parsed = arguments.parse("volume-show", {"name": "v"})
    with pytest.raises(errors.InternalError):
        parsed.flag("force")
    with pytest.raises(errors.InternalError):
        parsed.number("name")
    with pytest.raises(errors.InternalError):
        arguments.parse("no-such-op", {})


# ---- import cycles -----------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {}
    for path in GATEWAY.rglob("*.py"):
        parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _statements(body: list[ast.stmt], *, nested: bool) -> Iterator[ast.stmt]:
    """The statements Python runs when it imports the module (and, if `nested`, also those of
    functions and classes); `if TYPE_CHECKING:` blocks never run."""
    for node in body:
        if isinstance(node, ast.If) and _type_checking(node):
            yield from _statements(node.orelse, nested=nested)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if not isinstance(inner, list) or not inner:
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if not nested and not isinstance(node, ast.ClassDef):
                    continue
            if field == "handlers":
                for handler in inner:
                    yield from _statements(handler.body, nested=nested)
            else:
                yield from _statements(inner, nested=nested)


def import_graph(*, nested: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _statements(ast.parse(path.read_text()).body, nested=nested):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b too
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix != name:
                        edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_module_level() -> None:
    graph = import_graph(nested=False)
    assert "gateway.admin.ops" in graph and "gateway.admin.volume_ops" in graph["gateway.admin.ops"]
    assert cycles(graph) == []


def test_no_import_cycles_even_through_imports_inside_functions() -> None:
    assert cycles(import_graph(nested=True)) == []


def test_cli_modules_do_not_import_each_other_backwards() -> None:
    graph = import_graph(nested=True)
    for module in ("gateway.cli.lifecycle", "gateway.cli.systemd", "gateway.cli.base"):
        assert "gateway.cli.main" not in graph[module], module
    for main in (GATEWAY / "cli" / "main.py", GATEWAY / "daemon" / "main.py"):
        assert "importlib" not in main.read_text(), main


# ---- the job table -----------------------------------------------------------------------------


def volume_at(path: Path) -> Volume:
    path.write_bytes(b"built")
    return Volume(name=path.stem, path=str(path), format="raw", virtual_size=5)


async def wait_ended(table: JobTable, job_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while (job := table.get(job_id)).state == "running":
            await trio.sleep(0.01)
    return job.to_json()


async def test_job_cancel_stops_the_worker_and_ends_cancelled(tmp_path: Path) -> None:
    table = JobTable(threads=1)
    registered: list[str] = []

    async def finish(volume: Volume) -> dict[str, Any]:
        registered.append(volume.name)
        return {"name": volume.name}

    def stops_when_told(progress: Any, stop: threading.Event) -> Volume:
        progress(10.0)
        if not stop.wait(20):
            raise AssertionError("never told to stop")
        raise errors.InvalidArgument("cancelled")  # what a build raises on its way out

    def finishes_anyway(progress: Any, stop: threading.Event) -> Volume:
        progress(5.0)
        stop.wait(20)
        return volume_at(tmp_path / "late.raw")

    async with trio.open_nursery() as nursery:
        await nursery.start(table.run)
        for name in ("a", "queued", "late", "done"):
            table.reserve(name)
        first = table.start("copy", "a", stops_when_told, finish)
        with trio.fail_after(20):
            while first.progress < 10.0:  # in the only job thread
                await trio.sleep(0.01)
        queued = table.start("blank", "queued", stops_when_told, finish)  # waits for the thread
        await trio.sleep(0.05)
        assert queued.progress == 0.0
        assert table.cancel(queued.id).state == "running"
        ended = await wait_ended(table, queued.id)
        assert ended["state"] == "failed"
        assert ended["error"] == {"code": "cancelled", "message": f"job {queued.id} cancelled"}
        assert table.get(first.id).state == "running"  # the other job is untouched
        table.cancel(first.id)
        assert (await wait_ended(table, first.id))["error"]["code"] == "cancelled"
        with pytest.raises(errors.Conflict, match="already ended"):
            table.cancel(first.id)

        late = table.start("copy", "late", finishes_anyway, finish)
        with trio.fail_after(20):
            while late.progress == 0:  # in its thread
                await trio.sleep(0.01)
        table.cancel(late.id)
        assert (await wait_ended(table, late.id))["error"]["code"] == "cancelled"
        assert not (tmp_path / "late.raw").exists()  # built as it was stopped: removed

        done = table.start("copy", "done", lambda p, s: volume_at(tmp_path / "done.raw"), finish)
        assert (await wait_ended(table, done.id))["state"] == "done"
        assert registered == ["done"]
        assert not any(table.is_reserved(n) for n in ("a", "queued", "late", "done"))
        with pytest.raises(errors.NotFound):
            table.cancel("99")
        nursery.cancel_scope.cancel()


async def test_shutdown_stops_running_jobs(tmp_path: Path) -> None:
    table = JobTable()
    told = threading.Event()

    def build(progress: Any, stop: threading.Event) -> Volume:
        progress(1.0)
        stop.wait(20)
        told.set()
        raise errors.CommandError("qemu-img convert: cancelled")

    async def finish(volume: Volume) -> dict[str, Any]:
        raise AssertionError("not registered")

    async with trio.open_nursery() as nursery:
        await nursery.start(table.run)
        table.reserve("v")
        job = table.start("copy", "v", build, finish)
        with trio.fail_after(20):
            while job.progress == 0:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert told.is_set()
    assert job.state == "failed"
    assert job.error == {"code": "cancelled", "message": "gatewayd stopped"}
    with pytest.raises(errors.InternalError):
        table.start("copy", "w", build, finish)  # the table is not running any more


def test_a_job_needs_a_reserved_name_and_a_running_table() -> None:
    table = JobTable()
    table.reserve("v")
    with pytest.raises(errors.AlreadyExists, match="being created"):
        table.reserve("v")
    with pytest.raises(errors.InternalError):
        table.start("copy", "v", lambda p, s: volume_at(Path("/nonexistent")), None)  # type: ignore[arg-type]


# ---- through a real gatewayd -------------------------------------------------------------------


def one_line(proc: Any) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return str(lines[0])


@pytest.mark.timeout(180)
def test_relative_paths_are_resolved_by_gatewayctl(gatewayd: Daemon, image_set: ImageSet,
                                                   tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    copy_image(image_set.path("none", "raw"), images / "disk.img")
    gatewayd.ctl("volume", "add", "x", "./disk.img", "--format", "raw", cwd=images, check=True)
    shown = json.loads(gatewayd.ctl("volume", "show", "x", "--json", check=True).stdout)
    assert shown["path"] == str(images / "disk.img")
    probed = json.loads(gatewayd.ctl("probe-image", "disk.img", "--format", "raw", "--json",
                                     cwd=images, check=True).stdout)
    assert probed["rootfs"]["fs"] == "ext4"
    line = one_line(gatewayd.ctl("volume", "add", "y", "../images/missing.img", "--format", "raw",
                                 cwd=images))
    assert f"{images}/../images/missing.img: no such file" in line

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("relative\n")
    with tarfile.open(images / "root.tar", "w") as tar:
        tar.add(tree / "etc", arcname="etc")
    out = gatewayd.ctl("volume", "import", "imp", "--tarball", "root.tar", "--size", "64M",
                       "--json", cwd=images, check=True).stdout.strip().splitlines()
    final = json.loads(out[-1])
    assert final["state"] == "done"
    assert final["result"]["lineage"]["source"] == str(images / "root.tar")

    # The wire still takes absolute paths only, and no key an op does not declare.
    with Client(gatewayd.socket, timeout=30) as client:
        with pytest.raises(errors.InvalidArgument, match="must be absolute"):
            client.call("volume-add", {"name": "z", "path": "disk.img", "format": "raw"})
        with pytest.raises(errors.InvalidArgument) as info:
            client.call("volume-show", {"name": "x", "verbose": True})
        assert "'verbose'" in info.value.message and "volume-show" in info.value.message
    for name in ("x", "imp"):
        gatewayd.ctl("volume", "rm", name, check=True)


def convert_pids(state_dir: Path) -> set[int]:
    """qemu-img convert processes writing into the state directory."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (argv and argv[0].endswith(b"qemu-img") and b"convert" in argv
                and any(str(state_dir).encode() in a for a in argv)):
            found.add(int(entry.name))
    return found


@pytest.mark.timeout(240)
def test_job_cancel_stops_a_real_copy(gatewayd: Daemon, tmp_path: Path) -> None:
    """Two copies are frozen in qemu-img (SIGSTOP: a test's way to make them slow, not a fake),
    so both job threads are busy; a third copy waits for a thread. `gatewayctl job cancel` ends
    each one "failed" with code "cancelled", removes its partial file and frees its name."""
    source = tmp_path / "noise.raw"
    block = os.urandom(1 << 20)
    with open(source, "wb") as f:
        for _ in range(512):
            f.write(block)
    gatewayd.ctl("volume", "add", "noise", str(source), "--format", "raw", "--read-only",
                  check=True)
    frozen: set[int] = set()
    try:
        jobs = []
        for name in ("c1", "c2"):
            jobs.append(call(gatewayd.socket, "volume-create",
                             {"name": name, "from": "noise", "copy": True}, timeout=30))
            deadline = time.monotonic() + 30
            while not (convert_pids(gatewayd.state_dir) - frozen):
                assert time.monotonic() < deadline, "qemu-img convert never started"
                time.sleep(0.005)
            for pid in convert_pids(gatewayd.state_dir) - frozen:
                os.kill(pid, signal.SIGSTOP)
                frozen.add(pid)
        assert all(call(gatewayd.socket, "job-status", {"id": j["job"]})["state"] == "running"
                   for j in jobs), "a copy finished before it could be frozen"
        jobs.append(call(gatewayd.socket, "volume-create",
                         {"name": "c3", "from": "noise", "copy": True}, timeout=30))
        for job in reversed(jobs):
            ended = json.loads(gatewayd.ctl("job", "cancel", job["job"], "--json",
                                            check=True).stdout)
            assert ended["state"] == "failed"
            assert ended["error"] == {"code": "cancelled",
                                      "message": f"job {job['job']} cancelled"}
        human = gatewayd.ctl("job", "show", jobs[0]["job"], check=True).stdout
        assert "failed" in human and "cancelled" in human
        again = one_line(gatewayd.ctl("job", "cancel", jobs[0]["job"]))
        assert "already ended" in again
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert not convert_pids(gatewayd.state_dir)
    left = sorted(p.name for p in (gatewayd.state_dir / "volumes").iterdir())
    assert left == [], left
    names = [v["name"] for v in json.loads(gatewayd.ctl("volume", "ls", "--json",
                                                        check=True).stdout)]
    assert names == ["noise"]
    gatewayd.ctl("volume", "create", "c1", "--from", "noise", "--overlay", check=True)
    for name in ("c1", "noise"):
        gatewayd.ctl("volume", "rm", name, check=True)
