"""`volume add --pool`: path and format from a real libvirtd `dir` pool, never guessed."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import FormatError
from gateway.libvirt.pools import format_from_xml
from gateway.testing.daemon import Daemon
from tests.libvirt_env import LibvirtEnv, libvirt_env

__all__ = ["libvirt_env"]  # the session fixture


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True,
                          timeout=60, check=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def pool(libvirt_env: LibvirtEnv, tmp_path: Path) -> Iterator[str]:
    name = f"gwtest-{os.getpid()}"
    target = tmp_path / "pool"
    target.mkdir()
    virsh(libvirt_env.uri, "pool-define-as", name, "dir", "--target", str(target))
    try:
        virsh(libvirt_env.uri, "pool-start", name)
        yield name
    finally:
        subprocess.run(["virsh", "-q", "-c", libvirt_env.uri, "pool-destroy", name],
                       capture_output=True, timeout=60, check=False)
        virsh(libvirt_env.uri, "pool-undefine", name)


@pytest.mark.timeout(90)
def test_pool_volumes_pin_their_format(gatewayd: Daemon, libvirt_env: LibvirtEnv,
                                       pool: str) -> None:
    uri = libvirt_env.uri
    for vol, fmt in (("q.qcow2", "qcow2"), ("r.img", "raw"), ("v.vmdk", "vmdk")):
        virsh(uri, "vol-create-as", pool, vol, "16M", "--format", fmt)
    assert uri == "lxc:///"  # gatewayd's own URI: requests cannot name one
    out = json.loads(gatewayd.ctl("volume", "add", "pq", "--pool", pool, "--vol", "q.qcow2",
                                  "--format", "qcow2", "--json", check=True).stdout)
    assert out["format"] == "qcow2" and out["origin"] == "pool"
    assert out["path"].endswith("/pool/q.qcow2")
    assert out["lineage"]["source"]["pool"] == pool
    out = json.loads(gatewayd.ctl("volume", "add", "pr", "--pool", pool, "--vol", "r.img",
                                  "--format", "raw", "--json", check=True).stdout)
    assert out["format"] == "raw" and out["virtual_size"] == 16 << 20
    bad = gatewayd.ctl("volume", "add", "pv", "--pool", pool, "--vol", "v.vmdk",
                       "--format", "raw")
    assert bad.returncode != 0 and "'vmdk' is not supported" in bad.stderr
    # libvirt's dir pool guessed the format: only an agreeing declaration pins it
    bad = gatewayd.ctl("volume", "add", "px", "--pool", pool, "--vol", "q.qcow2",
                       "--format", "raw")
    assert bad.returncode != 0 and "libvirt says qcow2, the admin declared raw" in bad.stderr
    bad = gatewayd.ctl("volume", "add", "px", "--pool", pool, "--vol", "q.qcow2")
    assert bad.returncode != 0 and "--format" in bad.stderr
    missing = gatewayd.ctl("volume", "add", "pm", "--pool", pool, "--vol", "nope",
                           "--format", "raw")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    names = [v["name"] for v in json.loads(gatewayd.ctl("volume", "ls", "--json").stdout)]
    assert names == ["pq", "pr"]
    for name in names:
        gatewayd.ctl("volume", "rm", name, check=True)
    for vol in ("q.qcow2", "r.img", "v.vmdk"):
        virsh(uri, "vol-delete", "--pool", pool, vol)


def test_pool_xml_without_a_format_is_refused() -> None:
    with pytest.raises(FormatError, match="names no format"):
        format_from_xml("<volume><target><path>/x</path></target></volume>", "p v")
    assert format_from_xml("<volume><target><format type='raw'/></target></volume>", "p") == "raw"
