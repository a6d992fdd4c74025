"""Loop devices through ioctls (real /dev/loop*), on plain files."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import NotFound
from gateway.host import loopdev


@pytest.fixture
def files(tmp_path: Path) -> Iterator[list[Path]]:
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}.img"
        p.write_bytes(bytes([i]) * (1024 * 1024))
        paths.append(p)
    try:
        yield paths
    finally:
        for dev in loopdev.devices_backed_by(tmp_path):
            loopdev.detach(dev)
        assert loopdev.devices_backed_by(tmp_path) == []


def _sys(dev: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(dev)}/{name}").read_text().strip()


@pytest.mark.timeout(30)
def test_attach_read_only_and_detach(files: list[Path]) -> None:
    dev, fd = loopdev.attach(files[0], read_only=True, autoclear=False)
    os.close(fd)
    assert loopdev.backing_file(dev.path) == str(files[0])
    assert loopdev.devices_backed_by(files[0]) == [dev.path]
    assert loopdev.devices_backed_by(files[0].parent) == [dev.path]
    assert _sys(dev.path, "ro") == "1"
    assert _sys(dev.path, "size") == str(1024 * 1024 // 512)
    with open(dev.path, "rb") as f:
        assert f.read(4) == b"\0\0\0\0"
    loopdev.detach(dev.path)
    assert loopdev.backing_file(dev.path) is None
    loopdev.detach(dev.path)  # idempotent


@pytest.mark.timeout(30)
def test_autoclear_frees_on_last_close(files: list[Path]) -> None:
    dev, fd = loopdev.attach(files[1])
    assert _sys(dev.path, "ro") == "0"
    assert _sys(dev.path, "loop/autoclear") == "1"
    with open(dev.path, "r+b") as f:
        f.write(b"WRITTEN!")
    os.close(fd)
    assert loopdev.wait_released(dev.path, timeout=5)
    assert files[1].read_bytes()[:8] == b"WRITTEN!"


@pytest.mark.timeout(30)
def test_offset_and_sizelimit(files: list[Path]) -> None:
    dev, fd = loopdev.attach(files[2], read_only=True, offset=4096, sizelimit=8192)
    try:
        assert _sys(dev.path, "size") == "16"
    finally:
        os.close(fd)
    assert loopdev.wait_released(dev.path)


@pytest.mark.timeout(60)
def test_parallel_attach_gets_distinct_devices(files: list[Path]) -> None:
    results: dict[int, str] = {}
    fds: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            dev, fd = loopdev.attach(files[i], autoclear=False)
            results[i] = dev.path
            fds.append(fd)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    assert errors == []
    assert len(set(results.values())) == 4
    for i, dev in results.items():
        assert loopdev.backing_file(dev) == str(files[i])


@pytest.mark.timeout(30)
def test_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(loopdev.LoopError, match="open backing file"):
        loopdev.attach(tmp_path / "missing")
    with pytest.raises(NotFound):
        loopdev.detach("/dev/loop-does-not-exist")
