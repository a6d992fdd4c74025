"""Installable like a host tool: sdist -> wheel with the native probe -> a fresh virtualenv.

`python -m build` makes the sdist and then the wheel from it (so both compile the C probe
through the build backend); the wheel goes into a new virtualenv made from /usr/bin/python3 with
the system site packages (for libnbd's `nbd` module, as on a host), and the installed gatewayctl
and gatewayd are used from there, not from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.images import MIB, make_fs_image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)


def run(*argv: str | os.PathLike[str], cwd: Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The bin directory of a fresh virtualenv with the built wheel installed."""
    work = Path(tempfile.mkdtemp(prefix="sgw-wheel-"))
    try:
        source = work / "src"
        # a clean copy of the tracked tree: nothing built in the checkout can leak in
        files = run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, source / name)
        dist = work / "dist"
        run(sys.executable, "-m", "build", "--outdir", dist, source)
        wheels = list(dist.glob("*.whl"))
        assert len(wheels) == 1 and list(dist.glob("*.tar.gz")), list(dist.iterdir())
        with zipfile.ZipFile(wheels[0]) as wheel:
            assert any(n.startswith("gateway/probe/_native/_probe") and n.endswith(".so")
                       for n in wheel.namelist())
        venv = work / "venv"
        run("/usr/bin/python3", "-m", "venv", "--system-site-packages", venv)
        run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheels[0])
        yield venv / "bin"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_installed_gatewayctl_probes_with_the_native_core(installed: Path,
                                                           tmp_path: Path) -> None:
    image = make_fs_image(tmp_path / "disk.raw", 16 * MIB, None)
    proc = run(installed / "gatewayctl", "probe-image", "--format", "raw", image, "--json",
               cwd=tmp_path)
    found = json.loads(proc.stdout)
    assert found["table"] == "none" and found["rootfs"]["fs"] == "ext4"
    where = run(installed / "python", "-c",
                "import gateway.probe._native._probe as m; print(m.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(installed.parent)), where  # from the wheel, not the checkout


def test_installed_gatewayd_answers_status(installed: Path, tmp_path: Path) -> None:
    top = tmp_path
    argv: list[str | os.PathLike[str]] = [
        installed / "gatewayd", "--state-dir", top / "state", "--run-dir", top / "run",
        "--libvirt-uri", ""]
    with open(top / "log", "wb") as log:
        proc = subprocess.Popen([os.fspath(a) for a in argv], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=top)
    try:
        deadline = time.monotonic() + 60
        while True:
            status = subprocess.run(
                [installed / "gatewayctl", "--socket", top / "run" / "admin.sock", "status",
                 "--json"], capture_output=True, text=True, timeout=30)
            if status.returncode == 0:
                break
            assert proc.poll() is None, (top / "log").read_text()[-2000:]
            assert time.monotonic() < deadline, status.stderr
            time.sleep(0.1)
        assert json.loads(status.stdout)["healthy"] is True
    finally:
        # everything: gatewayd, and the data plane and QSD it started (a signal ends gatewayd
        # alone, and they would outlive the test)
        subprocess.run([installed / "gatewayctl", "--socket", top / "run" / "admin.sock",
                        "--wait", "0", "shutdown", "--all", "--force"], capture_output=True,
                       timeout=120, check=False)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.terminate()
        assert proc.wait(60) == 0, (top / "log").read_text()[-2000:]
        left = subprocess.run(["pgrep", "-f", f"--run-dir {top / 'run'}"], capture_output=True,
                              text=True).stdout.split()
        assert left == [], f"processes left for {top / 'run'}: {left}"
        from gateway.attach.attachment import release_rootfs_root
        release_rootfs_root(top / "run")
