"""`make stop` leaves the libvirt hooks dir as `make run` found it (pure file operations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli.demo import Paths, restore_hook
from gateway.libvirt.hook import install_hook, is_ours

pytestmark = pytest.mark.timeout(30)
FOREIGN = "#!/bin/sh\n# someone else's hook\nexit 0\n"


def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "state", tmp_path / "run", tmp_path / "log", tmp_path / "hooks")


def test_a_hook_the_demo_installed_is_removed(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert install_hook(p.hooks_dir, str(tmp_path / "run" / "admin.sock")) == "installed"
    restore_hook(p, {"outcome": "installed", "before": None})
    assert list(p.hooks_dir.iterdir()) == []


def test_a_chained_foreign_hook_is_put_back(tmp_path: Path) -> None:
    p = paths(tmp_path)
    p.hooks_dir.mkdir()
    (p.hooks_dir / "lxc").write_text(FOREIGN)
    assert install_hook(p.hooks_dir, str(tmp_path / "admin.sock")) == "chained"
    restore_hook(p, {"outcome": "chained", "before": FOREIGN})
    assert (p.hooks_dir / "lxc").read_text() == FOREIGN
    assert sorted(f.name for f in p.hooks_dir.iterdir()) == ["lxc"]


def test_an_updated_hook_gets_its_old_text_back(tmp_path: Path) -> None:
    p = paths(tmp_path)
    install_hook(p.hooks_dir, "/run/storage-gateway/admin.sock")
    before = (p.hooks_dir / "lxc").read_text()
    assert install_hook(p.hooks_dir, str(tmp_path / "admin.sock")) == "updated"
    restore_hook(p, {"outcome": "updated", "before": before})
    assert (p.hooks_dir / "lxc").read_text() == before and is_ours(p.hooks_dir / "lxc")


def test_a_hook_that_was_there_already_is_kept(tmp_path: Path) -> None:
    p = paths(tmp_path)
    install_hook(p.hooks_dir, str(tmp_path / "admin.sock"))
    restore_hook(p, None)  # `make run` found it unchanged: nothing recorded
    assert is_ours(p.hooks_dir / "lxc")
