"""The SQLite catalog: volumes with their pinned formats, desired exports and attachment journals.

Every change is one transaction, so a failed request leaves no half-written rows. The schema carries
a version (PRAGMA user_version) and is brought forward by the ordered MIGRATIONS on open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.attach.journal import Entry, decode_all, encode
from gateway.attach.states import AttachmentState, stored
from gateway.ceph.location import RbdImage
from gateway.errors import AlreadyExists, CatalogError, Conflict, NotFound
from gateway.userns.slices import IdMap

MIGRATIONS: tuple[str, ...] = (
    # 1: volumes with their pinned format and header facts.
    """
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        format TEXT NOT NULL CHECK (format IN ('raw', 'qcow2')),
        virtual_size INTEGER NOT NULL,
        read_only INTEGER NOT NULL DEFAULT 0,
        block_device INTEGER NOT NULL DEFAULT 0,
        nosuid INTEGER NOT NULL DEFAULT 0,
        noexec INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL,
        header TEXT NOT NULL
    );
    """,
    # 2: desired exports, the pinned rootfs type and the attachment journal.
    """
    ALTER TABLE volumes ADD COLUMN fstype TEXT;
    CREATE TABLE exports (
        volume TEXT PRIMARY KEY REFERENCES volumes(name)
    );
    CREATE TABLE attachments (
        volume TEXT PRIMARY KEY REFERENCES volumes(name),
        mode TEXT NOT NULL,
        state TEXT NOT NULL,
        rootfs TEXT NOT NULL,
        window_start INTEGER,
        window_size INTEGER,
        created TEXT NOT NULL
    );
    CREATE TABLE attachment_steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        volume TEXT NOT NULL,
        step TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX attachment_steps_volume ON attachment_steps(volume);
    """,
    # 3: how a volume was made (origin, its backing volume, the recorded lineage).
    """
    ALTER TABLE volumes ADD COLUMN origin TEXT NOT NULL DEFAULT 'registered';
    ALTER TABLE volumes ADD COLUMN base TEXT REFERENCES volumes(name);
    ALTER TABLE volumes ADD COLUMN lineage TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX volumes_base ON volumes(base);
    """,
    # 4: volumes whose filesystem must be checked before the next fuse-mode mount.
    """
    CREATE TABLE fsck_needed (
        volume TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE
    );
    """,
    # 5: setuid is an explicit per-volume opt-in (every existing volume becomes nosuid), and the
    # identity (device, inode) of each image file, checked at every later open.
    """
    UPDATE volumes SET nosuid = 1;
    ALTER TABLE volumes ADD COLUMN file_dev INTEGER;
    ALTER TABLE volumes ADD COLUMN file_ino INTEGER;
    """,
    # the id slice of each user-namespace attachment (gone with its attachment row); `domain`
    # names the domain it was cut for, if any.
    """
    CREATE TABLE IF NOT EXISTS userns_slices (
        volume TEXT PRIMARY KEY REFERENCES attachments(volume) ON DELETE CASCADE,
        uid_first INTEGER NOT NULL,
        gid_first INTEGER NOT NULL,
        count INTEGER NOT NULL,
        domain TEXT,
        created TEXT NOT NULL
    );
    """,
    # RBD volumes: where each image lives and how its cluster is reached (the volume's path
    # column holds rbd:POOL/NAMESPACE/IMAGE; the pinned facts live in the image's metadata).
    """
    CREATE TABLE IF NOT EXISTS rbd_images (
        volume TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
        pool TEXT NOT NULL,
        namespace TEXT NOT NULL DEFAULT '',
        image TEXT NOT NULL,
        conf TEXT,
        ceph_user TEXT NOT NULL
    );
    """,
    # tenants: who owns a volume (a uid; no row or NULL: the admin) and whether the admin
    # published it for tenants to make overlays of.
    """
    CREATE TABLE IF NOT EXISTS volume_tenancy (
        volume TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
        owner INTEGER,
        published INTEGER NOT NULL DEFAULT 0
    );
    """,
)
ORIGINS = ("registered", "overlay", "copy", "blank", "import", "pool", "snapshot")
SCHEMA_VERSION = len(MIGRATIONS)
JournalStep = tuple[str, dict[str, Any]]  # (step, detail) of an attachment journal entry, as stored


def _state_value(state: AttachmentState | str) -> str:
    try:
        value = AttachmentState(state)
    except ValueError:
        raise CatalogError(f"catalog: unknown attachment state {state!r}") from None
    if value is AttachmentState.ABSENT:
        raise CatalogError("catalog: an absent attachment has no row to hold its state")
    return value.value


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Volume:
    name: str
    path: str
    format: str
    virtual_size: int
    read_only: bool = False
    block_device: bool = False
    nosuid: bool = True  # setuid binaries are honoured only on volumes registered with --setuid
    noexec: bool = False
    created: str = field(default_factory=now)
    header: dict[str, Any] = field(default_factory=dict)
    fstype: str | None = None
    # How the volume was made: origin in ORIGINS, the backing volume's name (overlays) and the
    # recorded lineage (layers with their pinned formats, source, parameters).
    origin: str = "registered"
    base: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    # The image file's (st_dev, st_ino) at registration: every later open must find that file.
    file_id: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "format": self.format,
            "virtual_size": self.virtual_size, "read_only": self.read_only,
            "block_device": self.block_device, "nosuid": self.nosuid, "noexec": self.noexec,
            "created": self.created, "header": self.header, "fstype": self.fstype,
            "origin": self.origin, "base": self.base, "lineage": self.lineage,
        }


@dataclass(frozen=True)
class AttachmentRecord:
    volume: str
    mode: str
    state: AttachmentState
    rootfs: str
    window_start: int | None
    window_size: int | None
    created: str
    steps: tuple[tuple[str, dict[str, Any]], ...] = ()  # the journal as stored

    @property
    def entries(self) -> list[Entry]:
        """The journal as typed records (gateway/attach/journal.py)."""
        return decode_all(self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "state": self.state.value, "rootfs": self.rootfs,
                "window": None if self.window_start is None
                else {"start": self.window_start, "size": self.window_size},
                "since": self.created}


_VOLUME_COLUMNS = ("name, path, format, virtual_size, read_only, block_device, nosuid, noexec, "
                   "created, header, fstype, origin, base, lineage, file_dev, file_ino")


def _volume(row: sqlite3.Row) -> Volume:
    return Volume(name=row["name"], path=row["path"], format=row["format"],
                  virtual_size=row["virtual_size"], read_only=bool(row["read_only"]),
                  block_device=bool(row["block_device"]), nosuid=bool(row["nosuid"]),
                  noexec=bool(row["noexec"]), created=row["created"],
                  header=json.loads(row["header"]), fstype=row["fstype"],
                  origin=row["origin"], base=row["base"], lineage=json.loads(row["lineage"]),
                  file_id=(None if row["file_dev"] is None
                           else (int(row["file_dev"]), int(row["file_ino"]))))


class Catalog:
    """One SQLite database; call from one thread (the daemon's trio thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            # WAL with synchronous=NORMAL: a committed row survives any process crash (the case
            # the attachment journal exists for); an OS crash may lose the last commits, and
            # no mount survives that anyway.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise CatalogError(f"catalog {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.version
        if current > SCHEMA_VERSION:
            raise CatalogError(f"catalog {self.path} has schema {current}, newer than this "
                               f"gatewayd ({SCHEMA_VERSION})")
        for number in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on error; SQLite errors become CatalogError."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog: {exc}") from exc
        try:
            yield self._db
        except BaseException:
            self._rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()  # SQLite may have rolled back already (SQLITE_FULL)
            raise CatalogError(f"catalog: {exc}") from exc

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog: {exc}") from exc

    # Volumes.
    def add_volume(self, volume: Volume, *, rbd: RbdImage | None = None,
                   owner: int | None = None) -> None:
        """Insert a volume (and, for an RBD volume, where its image lives; for a tenant's
        volume, its `owner`) in one transaction."""
        try:
            with self.transaction() as db:
                holder = db.execute("SELECT name FROM volumes WHERE path = ?",
                                    (volume.path,)).fetchone()
                if holder is not None:
                    raise AlreadyExists(f"{volume.path} is already registered as volume "
                                        f"{holder['name']}")
                if db.execute("SELECT 1 FROM volumes WHERE name = ?", (volume.name,)).fetchone():
                    raise AlreadyExists(f"volume {volume.name} already exists")
                if volume.origin not in ORIGINS:
                    raise CatalogError(f"unknown volume origin {volume.origin!r}")
                db.execute(
                    f"INSERT INTO volumes ({_VOLUME_COLUMNS}) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (volume.name, volume.path, volume.format, volume.virtual_size,
                     int(volume.read_only), int(volume.block_device), int(volume.nosuid),
                     int(volume.noexec), volume.created, json.dumps(volume.header),
                     volume.fstype, volume.origin, volume.base, json.dumps(volume.lineage),
                     *(volume.file_id or (None, None))))
                if rbd is not None:
                    db.execute("INSERT INTO rbd_images (volume, pool, namespace, image, conf, "
                               "ceph_user) VALUES (?,?,?,?,?,?)",
                               (volume.name, rbd.pool, rbd.namespace, rbd.image, rbd.conf,
                                rbd.user))
                if owner is not None:
                    db.execute("INSERT INTO volume_tenancy (volume, owner) VALUES (?, ?)",
                               (volume.name, owner))
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog: {exc}") from exc

    def volume(self, name: str) -> Volume:
        rows = self._query(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE name = ?", (name,))
        if not rows:
            raise NotFound(f"no volume named {name}")
        return _volume(rows[0])

    def volumes(self) -> list[Volume]:
        return [_volume(r) for r in
                self._query(f"SELECT {_VOLUME_COLUMNS} FROM volumes ORDER BY name")]

    def remove_volume(self, name: str) -> None:
        with self.transaction() as db:
            user = db.execute("SELECT name FROM volumes WHERE base = ? LIMIT 1",
                              (name,)).fetchone()
            if user is not None:
                raise Conflict(f"volume {name} is the base of overlay {user['name']}; "
                               "remove its overlays first")
            if db.execute("DELETE FROM volumes WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no volume named {name}")

    def check_new_volume(self, volume: Volume) -> None:
        """AlreadyExists when `volume`'s name or path is taken (before writing elsewhere what
        add_volume would then record; add_volume checks again, in its transaction)."""
        owner = self._query("SELECT name FROM volumes WHERE path = ?", (volume.path,))
        if owner:
            raise AlreadyExists(f"{volume.path} is already registered as volume "
                                f"{owner[0]['name']}")
        if self._query("SELECT 1 FROM volumes WHERE name = ?", (volume.name,)):
            raise AlreadyExists(f"volume {volume.name} already exists")

    # Tenancy: a volume's owner (a uid; None: the admin) and whether it is published.
    def owners(self) -> dict[str, int | None]:
        """Every volume -> its owner."""
        return {r["name"]: r["owner"] for r in self._query(
            "SELECT v.name AS name, t.owner AS owner FROM volumes v "
            "LEFT JOIN volume_tenancy t ON t.volume = v.name")}

    def tenancy(self, name: str) -> tuple[int | None, bool]:
        """A volume's owner (None: the admin) and whether it is published."""
        rows = self._query("SELECT owner, published FROM volume_tenancy WHERE volume = ?",
                           (name,))
        return (rows[0]["owner"], bool(rows[0]["published"])) if rows else (None, False)

    def published(self) -> frozenset[str]:
        return frozenset(r["volume"] for r in self._query(
            "SELECT volume FROM volume_tenancy WHERE published = 1"))

    def set_owner(self, name: str, owner: int | None) -> None:
        """Give a volume to the user `owner` (None: back to the admin)."""
        self._set_tenancy(name, "owner", owner)

    def set_published(self, name: str, published: bool) -> None:
        """Whether tenants may make overlays of the volume."""
        self._set_tenancy(name, "published", int(published))

    def _set_tenancy(self, name: str, column: str, value: int | None) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no volume named {name}")
            db.execute("INSERT OR IGNORE INTO volume_tenancy (volume) VALUES (?)", (name,))
            # column is "owner" or "published", from the two callers above only
            db.execute(f"UPDATE volume_tenancy SET {column} = ? WHERE volume = ?", (value, name))

    def rbd_image(self, name: str) -> RbdImage | None:
        """Where an RBD volume's image lives (None: the volume is a file)."""
        rows = self._query("SELECT * FROM rbd_images WHERE volume = ?", (name,))
        if not rows:
            return None
        row = rows[0]
        return RbdImage(pool=row["pool"], namespace=row["namespace"], image=row["image"],
                        conf=row["conf"], user=row["ceph_user"])

    def overlays_of(self, name: str) -> list[str]:
        """Volumes whose backing volume is `name`."""
        return [r["name"] for r in
                self._query("SELECT name FROM volumes WHERE base = ? ORDER BY name", (name,))]

    def update_volume(self, name: str, *, read_only: bool | None = None,
                      virtual_size: int | None = None,
                      lineage: dict[str, Any] | None = None, nosuid: bool | None = None,
                      noexec: bool | None = None,
                      file_id: tuple[int, int] | None = None) -> None:
        """Change a volume's mutable columns in one transaction."""
        changes: list[tuple[str, Any]] = [
            (column, value) for column, value in (
                ("read_only", None if read_only is None else int(read_only)),
                ("virtual_size", virtual_size),
                ("lineage", None if lineage is None else json.dumps(lineage)),
                ("nosuid", None if nosuid is None else int(nosuid)),
                ("noexec", None if noexec is None else int(noexec)),
                ("file_dev", None if file_id is None else file_id[0]),
                ("file_ino", None if file_id is None else file_id[1]))
            if value is not None]
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no volume named {name}")
            for column, value in changes:  # column names come from the tuple above only
                db.execute(f"UPDATE volumes SET {column} = ? WHERE name = ?", (value, name))

    def pin_fstype(self, name: str, fstype: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE volumes SET fstype = ? WHERE name = ? AND fstype IS NULL",
                       (fstype, name))

    # Filesystems left unclean by a fuse2fs that did not exit in order.
    def set_fsck_needed(self, name: str, needed: bool) -> None:
        with self.transaction() as db:
            if needed:
                db.execute("INSERT OR IGNORE INTO fsck_needed (volume) SELECT name FROM volumes "
                           "WHERE name = ?", (name,))
            else:
                db.execute("DELETE FROM fsck_needed WHERE volume = ?", (name,))

    def fsck_needed(self, name: str) -> bool:
        return bool(self._query("SELECT 1 FROM fsck_needed WHERE volume = ?", (name,)))

    # Exports (desired state: re-added after a QSD or gatewayd restart).
    def set_exported(self, name: str, exported: bool) -> None:
        with self.transaction() as db:
            if exported:
                db.execute("INSERT OR IGNORE INTO exports (volume) VALUES (?)", (name,))
            else:
                db.execute("DELETE FROM exports WHERE volume = ?", (name,))

    def exported(self) -> list[str]:
        return [r["volume"] for r in self._query("SELECT volume FROM exports ORDER BY volume")]

    # Attachments and their journal. The state column holds an AttachmentState's value (never
    # ABSENT: no row); journal entries are given as typed records or as (step, detail) pairs.
    def begin_attachment(self, volume: str, mode: str, rootfs: str,
                         steps: Sequence[JournalStep | Entry] = (), *,
                         state: AttachmentState = AttachmentState.ATTACHING) -> None:
        """A new attachment row, with its first journal `steps`, in one transaction."""
        value = _state_value(state)
        with self.transaction() as db:
            db.execute("DELETE FROM attachment_steps WHERE volume = ?", (volume,))
            db.execute("INSERT OR REPLACE INTO attachments (volume, mode, state, rootfs, created) "
                       "VALUES (?, ?, ?, ?, ?)", (volume, mode, value, rootfs, now()))
            self._add_steps(db, volume, steps)

    def set_attachment(self, volume: str, *, state: AttachmentState | str | None = None,
                       window: tuple[int, int] | None = None,
                       steps: Sequence[JournalStep | Entry] = ()) -> None:
        value = None if state is None else _state_value(state)
        with self.transaction() as db:
            if value is not None:
                db.execute("UPDATE attachments SET state = ? WHERE volume = ?", (value, volume))
            if window is not None:
                db.execute("UPDATE attachments SET window_start = ?, window_size = ? "
                           "WHERE volume = ?", (window[0], window[1], volume))
            self._add_steps(db, volume, steps)

    def journal(self, volume: str, step: str | Entry,
                detail: dict[str, Any] | None = None) -> None:
        """Append one entry: a typed record, or a step name and its detail."""
        if isinstance(step, str):
            self.journal_steps(volume, [(step, detail or {})])
        else:
            self.journal_steps(volume, [step])

    def journal_steps(self, volume: str, steps: Sequence[JournalStep | Entry]) -> None:
        """Append `steps` to the volume's attachment journal, in one transaction."""
        with self.transaction() as db:
            self._add_steps(db, volume, steps)

    @staticmethod
    def _add_steps(db: sqlite3.Connection, volume: str,
                   steps: Sequence[JournalStep | Entry]) -> None:
        if steps:
            at = now()
            pairs = [s if isinstance(s, tuple) else encode(s) for s in steps]
            db.executemany("INSERT INTO attachment_steps (volume, step, detail, at) "
                           "VALUES (?,?,?,?)",
                           [(volume, step, json.dumps(detail), at) for step, detail in pairs])

    def end_attachment(self, volume: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM attachment_steps WHERE volume = ?", (volume,))
            db.execute("DELETE FROM attachments WHERE volume = ?", (volume,))

    def _attachment(self, row: sqlite3.Row) -> AttachmentRecord:
        steps = tuple(
            (s["step"], json.loads(s["detail"])) for s in self._query(
                "SELECT step, detail FROM attachment_steps WHERE volume = ? ORDER BY id",
                (row["volume"],)))
        return AttachmentRecord(
            volume=row["volume"], mode=row["mode"], state=stored(row["state"]),
            rootfs=row["rootfs"],
            window_start=row["window_start"], window_size=row["window_size"],
            created=row["created"], steps=steps)

    def attachments(self) -> list[AttachmentRecord]:
        return [self._attachment(row)
                for row in self._query("SELECT * FROM attachments ORDER BY volume")]

    def attachment(self, volume: str) -> AttachmentRecord | None:
        rows = self._query("SELECT * FROM attachments WHERE volume = ?", (volume,))
        return self._attachment(rows[0]) if rows else None

    # Id slices of user-namespace attachments: a row lives as long as its attachment row.
    def claim_slice(self, volume: str, pick: Callable[[list[IdMap]], IdMap],
                    domain: str | None = None) -> IdMap:
        """Record the slice `pick` chooses, given every other attachment's live slice, in one
        transaction (so two claims never see the same free slot)."""
        with self.transaction() as db:
            taken = [IdMap(r["uid_first"], r["gid_first"], r["count"]) for r in db.execute(
                "SELECT uid_first, gid_first, count FROM userns_slices WHERE volume != ?",
                (volume,))]
            chosen = pick(taken)
            db.execute("INSERT OR REPLACE INTO userns_slices (volume, uid_first, gid_first, "
                       "count, domain, created) VALUES (?,?,?,?,?,?)",
                       (volume, chosen.uid_first, chosen.gid_first, chosen.count, domain, now()))
        return chosen

    def userns_slices(self) -> dict[str, tuple[IdMap, str | None]]:
        """volume -> (its slice, the domain it was cut for)."""
        return {r["volume"]: (IdMap(r["uid_first"], r["gid_first"], r["count"]), r["domain"])
                for r in self._query("SELECT * FROM userns_slices ORDER BY volume")}

    def userns_slice(self, volume: str) -> IdMap | None:
        found = self.userns_slices().get(volume)
        return found[0] if found is not None else None
