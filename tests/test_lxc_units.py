"""Pure parts of gateway.libvirt: domain XML, metadata parsing, the hook script, its installer."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.errors import Conflict, InvalidArgument
from gateway.libvirt import hook
from gateway.libvirt.domain import attachment_from_xml, domain_xml, rootfs_from_xml, validate_name
from gateway.libvirt.events import describe_event
from gateway.libvirt.hostprep import mount_propagation
from tests.libvirt_env import FakeGatewayd

pytestmark = pytest.mark.timeout(30)

PLAIN_XML = "<domain type='lxc'><name>other</name><metadata/></domain>"


def test_domain_xml_shape() -> None:
    xml = domain_xml("web-1", "/run/sg/rootfs/vol1", "vol1", "fuse", init="/bin/sh",
                     args=("-c", "echo hi"), memory_mib=64, vcpus=2)
    root = ET.fromstring(xml)
    assert root.get("type") == "lxc"
    assert root.findtext("name") == "web-1"
    assert root.findtext("memory") == "64" and root.findall("memory")[0].get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/type") == "exe"
    assert root.findtext("os/init") == "/bin/sh"
    assert [e.text for e in root.findall("os/initarg")] == ["-c", "echo hi"]
    fs = root.find("devices/filesystem")
    assert fs is not None and fs.get("type") == "mount"
    assert fs.findall("source")[0].get("dir") == "/run/sg/rootfs/vol1"
    assert fs.findall("target")[0].get("dir") == "/"
    assert root.findall("devices/console")[0].get("type") == "pty"
    assert attachment_from_xml(xml) == ("vol1", "fuse")
    assert rootfs_from_xml(xml) == "/run/sg/rootfs/vol1"


def test_domain_xml_escapes() -> None:
    nasty = "/run/a b/&<x>'\""
    xml = domain_xml("c", nasty, "v&<'\">", "bind", args=("<&>",))
    root = ET.fromstring(xml)
    assert rootfs_from_xml(xml) == nasty
    assert attachment_from_xml(xml) == ("v&<'\">", "bind")
    assert root.findtext("os/initarg") == "<&>"


@pytest.mark.parametrize("kwargs", [
    {"name": "bad name"}, {"name": ""}, {"name": "-x"}, {"name": "a/b"}, {"name": "x" * 65},
    {"mode": "loop"}, {"volume": ""}, {"volume": "a/b"}, {"rootfs": "relative"},
    {"init": "sbin/init"}, {"memory_mib": 0},
])
def test_domain_xml_rejects(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"name": "c", "rootfs": "/r", "volume": "v", "mode": "bind"}
    with pytest.raises(InvalidArgument):
        domain_xml(**{**base, **kwargs})  # type: ignore[arg-type]


def test_validate_name_accepts() -> None:
    assert validate_name("Web_1.test-2") == "Web_1.test-2"


def test_attachment_parser_tolerates_other_domains() -> None:
    assert attachment_from_xml(PLAIN_XML) is None
    assert attachment_from_xml("not xml") is None
    other_ns = ("<domain><metadata><x:attachment xmlns:x='urn:other' volume='v' mode='bind'/>"
                "</metadata></domain>")
    assert attachment_from_xml(other_ns) is None
    # libvirt rewrites the prefix it stores; only the namespace URI matters.
    relabelled = ("<domain><metadata><sg:attachment "
                  "xmlns:sg='https://storage-gateway.invalid/xmlns/attachment/1' "
                  "volume='v' mode='bind'/></metadata></domain>")
    assert attachment_from_xml(relabelled) == ("v", "bind")


def test_describe_event() -> None:
    assert describe_event(5, 1) == ("stopped", "destroyed")
    assert describe_event(2, 0) == ("started", "booted")
    assert describe_event(5, 99) == ("stopped", "99")
    assert describe_event(42, 0) == ("event-42", "0")


def test_mount_propagation_parser() -> None:
    info = ("40 27 0:1 / /a rw - tmpfs t rw\n"
            "41 27 0:1 / /b rw shared:3 - tmpfs t rw\n"
            "42 27 0:1 / /c rw master:3 - tmpfs t rw\n"
            "43 27 0:1 / /d\\040e rw shared:4 - tmpfs t rw\n")
    assert mount_propagation(Path("/a"), info) == "private"
    assert mount_propagation(Path("/b"), info) == "shared"
    assert mount_propagation(Path("/c"), info) == "slave"
    assert mount_propagation(Path("/d e"), info) == "shared"
    assert mount_propagation(Path("/zzz"), info) is None


# ---- hook installation ----------------------------------------------------------------------

def test_install_is_idempotent(tmp_path: Path) -> None:
    assert hook.install_hook(tmp_path, "/tmp/a.sock") == "installed"
    assert os.access(tmp_path / "lxc", os.X_OK)
    assert hook.is_ours(tmp_path / "lxc")
    assert hook.install_hook(tmp_path, "/tmp/a.sock") == "unchanged"
    assert hook.install_hook(tmp_path, "/tmp/b.sock") == "updated"
    assert "/tmp/b.sock" in (tmp_path / "lxc").read_text()
    assert hook.uninstall_hook(tmp_path) == "removed"
    assert hook.uninstall_hook(tmp_path) == "absent"


def _foreign(tmp_path: Path, out: Path, code: int = 0) -> Path:
    foreign = tmp_path / "lxc"
    foreign.write_text(f"#!/bin/sh\necho \"$@\" > {out}\ncat >> {out}\nexit {code}\n")
    foreign.chmod(0o755)
    return foreign


def test_foreign_hook_is_chained(tmp_path: Path) -> None:
    out = tmp_path / "foreign.out"
    original = _foreign(tmp_path, out, code=3).read_text()
    assert hook.install_hook(tmp_path, str(tmp_path / "none.sock")) == "chained"
    assert (tmp_path / hook.CHAINED_NAME).read_text() == original
    assert hook.install_hook(tmp_path, str(tmp_path / "none.sock")) == "unchanged"
    proc = subprocess.run([str(tmp_path / "lxc"), "other", "prepare", "begin", "-"],
                          input=PLAIN_XML.encode(), capture_output=True, timeout=10)
    assert proc.returncode == 3  # the chained hook's status is ours
    assert out.read_text() == "other prepare begin -\n" + PLAIN_XML
    assert hook.uninstall_hook(tmp_path) == "restored"
    assert (tmp_path / "lxc").read_text() == original


def test_foreign_hook_refused_without_chaining(tmp_path: Path) -> None:
    original = _foreign(tmp_path, tmp_path / "out").read_text()
    with pytest.raises(Conflict, match="another program's libvirt hook"):
        hook.install_hook(tmp_path, "/tmp/a.sock", chain=False)
    assert (tmp_path / "lxc").read_text() == original


def test_refuses_when_chained_slot_is_taken(tmp_path: Path) -> None:
    _foreign(tmp_path, tmp_path / "out")
    (tmp_path / hook.CHAINED_NAME).write_text("#!/bin/sh\n")
    with pytest.raises(Conflict, match="already exists"):
        hook.install_hook(tmp_path, "/tmp/a.sock")
    with pytest.raises(Conflict):
        hook.uninstall_hook(tmp_path)


# ---- running the hook -----------------------------------------------------------------------

def _run_hook(hooks: Path, xml: str, op: str = "prepare") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(hooks / "lxc"), "c1", op, "begin", "-"], input=xml.encode(),
                          capture_output=True, timeout=20)


def test_hook_without_gatewayd_fails_clearly(tmp_path: Path) -> None:
    sock = tmp_path / "missing.sock"
    hook.install_hook(tmp_path, str(sock))
    proc = _run_hook(tmp_path, domain_xml("c1", "/r/v1", "v1", "bind"))
    assert proc.returncode != 0
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("storage-gateway hook: gatewayd is not reachable at")
    assert str(sock) in lines[0]


def test_hook_ignores_other_domains_and_operations(tmp_path: Path) -> None:
    hook.install_hook(tmp_path, str(tmp_path / "missing.sock"))
    assert _run_hook(tmp_path, PLAIN_XML).returncode == 0
    for op in ("start", "started", "stopped", "reconnect"):
        proc = _run_hook(tmp_path, domain_xml("c1", "/r/v1", "v1", "bind"), op)
        assert proc.returncode == 0, proc.stderr


def test_hook_asks_gatewayd(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    hook.install_hook(tmp_path, str(sock))
    xml = domain_xml("c1", "/nonexistent/v1", "v1", "fuse")
    with FakeGatewayd(sock, trees={"v1": tmp_path}) as fake:
        assert _run_hook(tmp_path, xml, "prepare").returncode == 0
        assert _run_hook(tmp_path, xml, "release").returncode == 0
        proc = _run_hook(tmp_path, domain_xml("c1", "/r/v2", "v2", "bind"))
    assert [(r["op"], r["args"]) for r in fake.requests] == [
        ("mount", {"name": "v1", "mode": "fuse"}),
        ("umount", {"name": "v1", "domain": "c1", "if_unused": True}),
        ("mount", {"name": "v2", "mode": "bind"})]
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "storage-gateway hook: gatewayd refused mount: no volume v2 (not-found)")


def test_hook_rejects_rootfs_mismatch(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    hook.install_hook(tmp_path, str(sock))
    with FakeGatewayd(sock, trees={"v1": tmp_path}, reply_rootfs="/elsewhere"):
        proc = _run_hook(tmp_path, domain_xml("c1", "/nonexistent/v1", "v1", "bind"))
    assert proc.returncode == 1
    assert b"but the domain boots from /nonexistent/v1" in proc.stderr


def measure_hook_latency(rounds: int = 30) -> dict[str, float]:
    """Median wall time (ms) of one hook run per case, against /bin/true as the floor."""
    import statistics
    import tempfile
    import time

    def median_ms(argv: list[str], xml: str) -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            subprocess.run(argv, input=xml.encode(), capture_output=True, timeout=20)
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    with tempfile.TemporaryDirectory() as tmp:
        hooks = Path(tmp)
        sock = hooks / "admin.sock"
        hook.install_hook(hooks, str(sock))
        argv = [str(hooks / "lxc"), "c1", "prepare", "begin", "-"]
        gw_xml = domain_xml("c1", "/nonexistent/v1", "v1", "bind")
        out = {"/bin/true": median_ms(["/bin/true"], gw_xml),
               "non-gateway domain": median_ms(argv, PLAIN_XML),
               "gatewayd unreachable": median_ms(argv, gw_xml)}
        with FakeGatewayd(sock, trees={"v1": hooks}):
            out["gatewayd reachable (fake, instant reply)"] = median_ms(argv, gw_xml)
    return out


if __name__ == "__main__":
    for case, ms in measure_hook_latency().items():
        print(f"{case:45s} {ms:6.1f} ms")


def test_hook_loads_only_c_modules_on_the_gateway_path(tmp_path: Path) -> None:
    """libvirtd waits for the hook on every domain operation: json, socket and ElementTree
    (about 15 ms to import) must stay out of it, and the hand-rolled JSON must round-trip."""
    sock = tmp_path / "admin.sock"
    hook.install_hook(tmp_path, str(sock))
    odd = 'v"1\\x'
    xml = domain_xml("c1", f"/nonexistent/{odd}", odd, "bind")
    with FakeGatewayd(sock, trees={odd: tmp_path}) as fake:
        proc = subprocess.run(["/usr/bin/python3", "-IS", "-X", "importtime",
                               str(tmp_path / hook.HOOK_NAME), "c1", "prepare", "begin", "-"],
                              input=xml.encode(), capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert fake.requests[0]["args"] == {"name": odd, "mode": "bind"}
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "pyexpat" in imported and "_socket" in imported
    assert not imported & {"json", "socket", "xml.etree.ElementTree", "re", "enum"}
