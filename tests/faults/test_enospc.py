"""ENOSPC: under the image directory (writes through a mount fail plainly, the daemon keeps
serving, the catalog stays intact) and under the state directory (catalog writes fail with a
one-line error, the catalog stays readable and consistent)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.images import MARKER, ImageSet, copy_image
from tests.faults.harness import healthy, leaks

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0755", "sgw-enospc", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\xaa" * 65536)
                f.flush()
        except OSError:
            pass


def integrity(state_dir: Path) -> str:
    db = sqlite3.connect(f"file:{state_dir / 'catalog.db'}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def test_enospc_under_the_image_directory(tmp_path: Path, small_fs: Path,
                                          image_set: ImageSet) -> None:
    image = copy_image(image_set.path("none", "raw"), small_fs / "full.raw")
    other = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "other.qcow2")
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""])
    daemon.start()
    try:
        daemon.ctl("volume", "add", "full", str(image), "--format", "raw", check=True)
        daemon.ctl("volume", "add", "other", str(other), "--format", "qcow2", check=True)
        daemon.ctl("mount", "other", check=True)
        daemon.ctl("mount", "full", check=True)
        fill(small_fs)
        big = daemon.run_dir / "rootfs" / "full" / "big"
        writer = subprocess.run(
            ["dd", "if=/dev/urandom", f"of={big}", "bs=1M", "count=40", "conv=fsync",
             "status=none"], capture_output=True, text=True, timeout=120)
        assert writer.returncode != 0, "40 MiB fit on a 12 MiB tmpfs?"
        assert any(e in writer.stderr for e in ("No space left", "Input/output error",
                                                "Read-only file system")), \
            writer.stderr
        assert healthy(daemon)
        marker = daemon.run_dir / "rootfs" / "other" / "etc" / "marker"
        assert marker.read_text() == MARKER
        proc = daemon.ctl("umount", "full", timeout=60)
        if proc.returncode != 0:
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
            daemon.ctl("umount", "full", "--force", check=True)
        assert leaks(daemon, "full") == []
        names = [v["name"] for v in json.loads(daemon.ctl("volume", "ls", "--json",
                                                          check=True).stdout)]
        assert names == ["full", "other"]
        assert marker.read_text() == MARKER
        daemon.ctl("umount", "other", check=True)
    finally:
        daemon.stop()
        assert daemon.cleanup() == []
    assert integrity(daemon.state_dir) == "ok"


def test_enospc_under_the_state_directory(tmp_path: Path, small_fs: Path,
                                          image_set: ImageSet) -> None:
    daemon = Daemon(state_dir=small_fs / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""])
    images = []
    for i in range(40):
        path = tmp_path / f"img{i}.raw"
        with open(path, "wb") as f:
            f.truncate(1024 * 1024)
        images.append(path)
    daemon.start()
    try:
        daemon.ctl("volume", "add", "before", str(images[0]), "--format", "raw", check=True)
        fill(small_fs)
        added, failure = ["before"], ""
        for i, path in enumerate(images[1:], 1):
            proc = daemon.ctl("volume", "add", f"v{i}", str(path), "--format", "raw")
            if proc.returncode == 0:
                added.append(f"v{i}")  # WAL pages already allocated may still take a row
                continue
            failure = proc.stderr
            break
        assert failure, "every catalog write succeeded on a full disk"
        assert "Traceback" not in failure and len(failure.strip().splitlines()) == 1
        listed = json.loads(daemon.ctl("volume", "ls", "--json", check=True).stdout)
        assert sorted(v["name"] for v in listed) == sorted(added)
        assert healthy(daemon)
        os.unlink(small_fs / "filler")
        daemon.ctl("volume", "add", "after", str(images[-1]), "--format", "raw", check=True)
    finally:
        daemon.stop()
        assert daemon.cleanup() == []
    assert integrity(daemon.state_dir) == "ok"
    daemon.start()  # the catalog opens again and holds what was acknowledged
    try:
        listed = json.loads(daemon.ctl("volume", "ls", "--json", check=True).stdout)
        assert sorted(v["name"] for v in listed) == sorted([*added, "after"])
    finally:
        daemon.stop()
        assert daemon.cleanup() == []
    assert "full" in failure or "No space" in failure, failure
