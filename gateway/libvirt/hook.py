"""The libvirt `lxc` hook that asks gatewayd to mount a domain's volume before it starts.

libvirtd runs HOOKS_DIR/lxc NAME OPERATION SUBOP EXTRA with the domain XML on stdin. Our hook is a
self-contained Python script (pyexpat, _socket and _json only, started with -I -S: no site import)
that speaks the admin protocol directly: on `prepare` it sends op `mount` {"name": VOLUME,
"mode": MODE} (a domain whose metadata says userns="yes" adds "idmap": the map of its own
<idmap>, so the rootfs is idmapped with exactly the ids the container runs as), on `release` op
`umount` {"name": VOLUME}. Domains without gateway metadata are
ignored. A foreign `lxc` hook is never overwritten: it is moved to `lxc.gateway-chained` and run
after ours with the same arguments and stdin (or installation is refused with chain=False).

libvirtd looks for hook scripts when it starts: install the hook before starting it.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import Conflict
from gateway.libvirt.domain import METADATA_NS

HEADER = "# storage-gateway libvirt lxc hook (managed file)"
HOOK_NAME = "lxc"
CHAINED_NAME = "lxc.gateway-chained"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DEFAULT_PYTHON = "/usr/bin/python3"
TIMEOUT_SECONDS = 300.0  # a mount may probe and fsck; libvirt waits for us
WAIT_SECONDS = 10.0  # a gatewayd being restarted or upgraded comes back within this

_TEMPLATE = '''#!{python} -IS
{header}
# Installed by gateway.libvirt.hook; edits are overwritten. Args: NAME OPERATION SUBOP EXTRA.
# libvirtd waits for this script on every lxc domain operation, so it imports only modules
# written in C (pyexpat, _socket, _json): json, socket and ElementTree cost about 15 ms to load.
import os, sys
SOCKET = {socket!r}
CHAINED = {chained!r}
NS = {ns!r}
TIMEOUT = {timeout!r}
WAIT = {wait!r}  # seconds to keep trying while gatewayd restarts
OPS = {{"prepare": "mount", "release": "umount"}}


def fail(message):
    sys.stderr.write("storage-gateway hook: " + message + "\\n")
    sys.exit(1)


def attachment(xml):
    \"\"\"(volume, mode, rootfs source dir, idmap request or None) or None for domains that are
    not the gateway's.\"\"\"
    if NS.encode() not in xml:
        return None  # fast path: no need to parse
    import pyexpat
    parser = pyexpat.ParserCreate(None, "}}")
    path, found, filesystems, ids = [], {{}}, [], {{}}

    def start(name, attrs):
        path.append(name)
        where = "/".join(path)
        if where == "domain/metadata/" + NS + "}}attachment":
            found.update(attrs)
        elif where in ("domain/idmap/uid", "domain/idmap/gid"):
            ids.setdefault(name, attrs)
        elif where == "domain/devices/filesystem":
            filesystems.append({{}})
        elif where in ("domain/devices/filesystem/source", "domain/devices/filesystem/target"):
            filesystems[-1][name] = attrs

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda name: path.pop()
    try:
        parser.Parse(xml, True)
    except pyexpat.ExpatError:
        fail("cannot parse the domain XML on stdin")
    if not found.get("volume") or not found.get("mode"):
        return None
    rootfs = None
    for fs in filesystems:
        if fs.get("target", {{}}).get("dir") == "/" and "source" in fs:
            rootfs = fs["source"].get("dir")
    idmap = None
    if found.get("userns") == "yes":
        uid, gid = ids.get("uid", {{}}), ids.get("gid", {{}})
        try:
            if uid["start"] != "0" or gid["start"] != "0" or uid["count"] != gid["count"]:
                raise ValueError(uid)
            idmap = {{"uid_first": int(uid["target"]), "gid_first": int(gid["target"]),
                     "count": int(uid["count"])}}
        except (KeyError, ValueError):
            fail("domain has userns metadata but no <idmap> of uid and gid from 0 with one "
                 "count")
    return found["volume"], found["mode"], rootfs, idmap


def encode(value):
    \"\"\"JSON text of a str/bool/dict request (the json module is slow to import).\"\"\"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{{" + ",".join(encode(k) + ":" + encode(v) for k, v in value.items()) + "}}"
    out = []
    for ch in value:
        if ch in "\\"\\\\" or ord(ch) < 0x20:
            out.append("\\\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def decode(text):
    try:
        import _json

        class Context:
            strict = True
            object_hook = object_pairs_hook = None
            parse_float, parse_int = float, int

            @staticmethod
            def parse_constant(name):
                raise ValueError(name)

        value, end = _json.make_scanner(Context())(text, 0)
        if text[end:].strip():
            raise ValueError("trailing data")
        return value
    except ImportError:
        import json
        return json.loads(text)


def connect(op):
    import _socket, time
    deadline = time.monotonic() + WAIT
    pause = 0.02
    while True:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            s.connect(SOCKET)
            return s
        except OSError as exc:
            s.close()
            if time.monotonic() + pause > deadline:
                fail("gatewayd is not reachable at %s (%s); cannot %s the domain's volume"
                     % (SOCKET, exc.strerror or exc, op))
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def call(op, args):
    s = connect(op)
    try:
        s.sendall(encode({{"id": 1, "op": op, "args": args}}).encode() + b"\\n")
        buf = b""
        while b"\\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                fail("gatewayd closed the connection before answering " + op)
            buf += chunk
    except OSError as exc:
        fail("talking to gatewayd at %s failed during %s: %s" % (SOCKET, op, exc))
    finally:
        s.close()
    try:
        reply = decode(buf.split(b"\\n", 1)[0].decode("utf-8"))
    except (ValueError, StopIteration, UnicodeDecodeError):
        fail("gatewayd sent an invalid reply to " + op)
    if not isinstance(reply, dict):
        fail("gatewayd sent an invalid reply to " + op)
    if not reply.get("ok"):
        err = reply.get("error") or {{}}
        fail("gatewayd refused %s: %s (%s)" % (op, err.get("message", "unknown error"),
                                               err.get("code", "internal")))
    return reply.get("result")


def main():
    argv = sys.argv[1:]
    data = sys.stdin.buffer.read()
    op = OPS.get(argv[1]) if len(argv) > 1 else None
    if op is not None:
        found = attachment(data)
        if found is not None:
            volume, mode, rootfs, idmap = found
            if op == "mount":
                request = {{"name": volume, "mode": mode}}
                if idmap is not None:
                    request["idmap"] = idmap
                result = call(op, request)
                got = result.get("rootfs") if isinstance(result, dict) else None
                if rootfs and got and os.path.realpath(got) != os.path.realpath(rootfs):
                    fail("gatewayd mounted volume %s at %s but the domain boots from %s"
                         % (volume, got, rootfs))
            else:
                # Released by this domain: gatewayd keeps it while another domain uses it.
                call(op, {{"name": volume, "domain": argv[0], "if_unused": True}})
    if os.path.exists(CHAINED):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.dup2(r, 0)
            os.execv(CHAINED, [CHAINED] + argv)
        os.close(r)
        with os.fdopen(w, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        sys.exit(code if code >= 0 else 1)


main()
'''


def hook_script(socket_path: str, chained_path: str, python: str = DEFAULT_PYTHON) -> str:
    """The hook's text (pure)."""
    return _TEMPLATE.format(python=python, header=HEADER, socket=socket_path,
                            chained=chained_path, ns=METADATA_NS, timeout=TIMEOUT_SECONDS,
                            wait=WAIT_SECONDS)


def is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.readline()
            return f.readline().rstrip("\n") == HEADER
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def install_hook(hooks_dir: Path = DEFAULT_HOOKS_DIR, socket_path: str | None = None, *,
                 chain: bool = True, python: str = DEFAULT_PYTHON) -> str:
    """Install our `lxc` hook. Returns "installed", "updated", "unchanged" or "chained" (a
    foreign hook was moved aside and is now run after ours). With chain=False a foreign hook
    makes this raise Conflict instead."""
    if socket_path is None:
        from gateway.config import default_socket
        socket_path = str(default_socket())
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hook = hooks_dir / HOOK_NAME
    chained = hooks_dir / CHAINED_NAME
    text = hook_script(socket_path, str(chained), python)
    if hook.is_symlink() or hook.exists():
        if is_ours(hook) and not hook.is_symlink():
            if hook.read_text() == text:
                return "unchanged"
            _write_atomically(hook, text)
            return "updated"
        if not chain:
            raise Conflict(f"{hook} is another program's libvirt hook; not replacing it "
                           "(install with chaining, or merge the hooks by hand)")
        if chained.is_symlink() or chained.exists():
            raise Conflict(f"{hook} is a foreign hook and {chained} already exists; "
                           "refusing to overwrite either (merge them by hand)")
        os.rename(hook, chained)
        _write_atomically(hook, text)
        return "chained"
    _write_atomically(hook, text)
    return "installed"


def uninstall_hook(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> str:
    """Remove our hook and put a chained foreign hook back. Returns "removed", "restored" or
    "absent"; a foreign hook is left alone (Conflict)."""
    hook = hooks_dir / HOOK_NAME
    chained = hooks_dir / CHAINED_NAME
    if not (hook.is_symlink() or hook.exists()):
        return "absent"
    if not is_ours(hook):
        raise Conflict(f"{hook} is not the storage-gateway hook; leaving it alone")
    if chained.is_symlink() or chained.exists():
        os.replace(chained, hook)
        return "restored"
    hook.unlink()
    return "removed"
