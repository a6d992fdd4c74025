"""The SQLite catalog: migrations, atomic changes, persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, Volume
from gateway.errors import AlreadyExists, CatalogError, NotFound


def vol(name: str, path: str = "/img/a.raw") -> Volume:
    return Volume(name=name, path=path, format="raw", virtual_size=1 << 20)


def test_fresh_catalog_is_at_the_newest_schema(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.db")
    assert cat.version == SCHEMA_VERSION == len(MIGRATIONS)


def test_old_schema_is_migrated_and_rows_survive(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO volumes (name, path, format, virtual_size, created, header) "
               "VALUES ('old', '/img/old.raw', 'raw', 512, 'then', '{}')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    cat = Catalog(path)
    assert cat.version == SCHEMA_VERSION
    assert cat.volume("old").fstype is None


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CatalogError, match="newer than this gatewayd"):
        Catalog(path)


def test_duplicates_are_refused_without_partial_rows(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.db")
    cat.add_volume(vol("a"))
    with pytest.raises(AlreadyExists, match="already exists"):
        cat.add_volume(vol("a", "/img/b.raw"))
    with pytest.raises(AlreadyExists, match="already registered as volume a"):
        cat.add_volume(vol("b"))
    assert [v.name for v in cat.volumes()] == ["a"]


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.db")
    cat.add_volume(vol("a"))
    with pytest.raises(RuntimeError), cat.transaction() as db:
        db.execute("DELETE FROM volumes")
        raise RuntimeError("boom")
    assert [v.name for v in cat.volumes()] == ["a"]


def test_persistence_and_journal(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.db")
    cat.add_volume(vol("a"))
    cat.set_exported("a", True)
    cat.begin_attachment("a", "bind", "/run/x/rootfs/a", [("export", {"auto": True})])
    cat.journal("a", "loop", {"device": "/dev/loop3"})
    cat.journal_steps("a", [("loop", {"phase": "done"}), ("mount", {"phase": "start"})])
    cat.set_attachment("a", state="mounted", steps=[("mount", {"phase": "done"})])
    cat.close()
    cat = Catalog(tmp_path / "c.db")
    assert cat.exported() == ["a"]
    record = cat.attachment("a")
    assert record is not None and record.state == "mounted"
    assert record.steps == (("export", {"auto": True}), ("loop", {"device": "/dev/loop3"}),
                            ("loop", {"phase": "done"}), ("mount", {"phase": "start"}),
                            ("mount", {"phase": "done"}))
    cat.end_attachment("a")
    assert cat.attachment("a") is None
    with pytest.raises(NotFound):
        cat.remove_volume("zzz")
