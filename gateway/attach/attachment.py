"""Attachment steps: getting a volume's rootfs window from the block view to RUN_DIR/rootfs/VOL.

Blocking functions the daemon runs in worker threads (never on the trio thread that serves the
block view). They keep no global state and take no global lock: different volumes may be
attached and detached in parallel.

Modes:
  bind  loop over RUN_DIR/blk/VOL/rootfs -> kernel mount at RUN_DIR/mnt/VOL (fs type pinned)
        -> bind mount at RUN_DIR/rootfs/VOL.
  fuse  fuse2fs over RUN_DIR/blk/VOL/rootfs mounted at RUN_DIR/rootfs/VOL (ext2/3/4 only; the host
        kernel never parses the filesystem). With an id map (a user-namespace domain) fuse2fs
        serves the private RUN_DIR/mnt/VOL instead and the id-shifting layer
        (gateway.idshift, a process of its own) serves RUN_DIR/rootfs/VOL over it.
  Kernel NBD mode (/dev/nbdX) is not available on this host. Its seam: attach_bind(device=...)
  takes an existing block device and skips the loop step; everything after it is the same.

Journal: before each step the caller's `journal(step, detail)` is called with
detail["phase"] == "start", and right after with "done" and the result (the loop device, the
fuse2fs pid). Steps: "loop", "mount", "bind", "idmap", "fsck", "fuse2fs", "idshift": the typed
records of gateway/attach/journal.py, passed on encoded. reconcile() reads these entries back.

Loop devices are attached with auto-clear: they vanish when the filesystem on them is unmounted.
detach(keep_loop=True) holds the device open across the umount instead and hands it back as a
StandbyLoop, which a remount of the same window takes in place of a new device (attach_bind's
`standby`). Only that open fd keeps it bound, so it cannot outlive gatewayd.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.attach import journal as records
from gateway.attach.journal import (
    BindStep,
    FsckStep,
    Fuse2fsStep,
    IdmapStep,
    IdshiftStep,
    LoopStep,
    MountStep,
    Phase,
)
from gateway.errors import (
    BackendError,
    Conflict,
    FormatError,
    GatewayError,
    InvalidArgument,
    NotFound,
    TeardownError,
)
from gateway.host import acl, fuse2fs, idmap, loopdev, mkfs, mounts, procs
from gateway.idshift import process as idshift
from gateway.userns.slices import IdMap

Journal = Callable[[str, dict[str, object]], None]  # (step, detail): an encoded journal.Entry
JournalEntry = tuple[str, Mapping[str, object]]

BIND = "bind"
FUSE = "fuse"
KERNEL_FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")


def _no_journal(step: str, detail: dict[str, object]) -> None:
    return None


def _note(journal: Journal, entry: records.Entry) -> None:
    journal(*records.encode(entry))


class TeardownIncomplete(TeardownError):
    """Teardown finished but pieces of the volume remain; `.remains` lists them."""

    def __init__(self, volume: str, remains: list[str]) -> None:
        super().__init__(f"attachment {volume}: teardown left {len(remains)} item(s): "
                         + "; ".join(remains))
        self.remains = remains


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path

    @property
    def blk(self) -> Path:
        return self.run_dir / "blk"

    @property
    def mnt_root(self) -> Path:
        return self.run_dir / "mnt"

    @property
    def rootfs_root(self) -> Path:
        return self.run_dir / "rootfs"

    def volume_dir(self, volume: str) -> Path:
        return self.blk / volume

    def window(self, volume: str) -> Path:
        return self.blk / volume / "rootfs"

    def mnt(self, volume: str) -> Path:
        return self.mnt_root / volume

    def rootfs(self, volume: str) -> Path:
        return self.rootfs_root / volume

    def prepare(self) -> None:
        """Make the run dir's tree with its modes: RUN_DIR itself 0711 (clients reach admin.sock
        by name, nobody lists it); blk, mnt and rootfs 0700, so no host user reaches a tenant's
        files, setuid binaries or the private kernel mounts. Blocking."""
        private_dir(self.run_dir, 0o711)
        for d in (self.blk, self.mnt_root, self.rootfs_root):
            private_dir(d)


def private_dir(path: Path, mode: int = 0o700) -> None:
    """`path` as a root-owned directory with exactly `mode` (made, or fixed if it exists)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    if os.path.ismount(path):
        return  # a mount's root (the data plane's block view) has the modes its server gives
    st = os.lstat(path)
    if (st.st_mode & 0o7777) != mode or st.st_uid != 0:
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, mode)


def _layout(run_dir: str | os.PathLike[str], volume: str | None = None) -> RunLayout:
    if volume is not None and (not volume or "/" in volume or volume in (".", "..")):
        raise InvalidArgument(f"attachment: bad volume name {volume!r}")
    return RunLayout(Path(os.path.abspath(os.fspath(run_dir))))


@dataclass
class Attachment:
    volume: str
    mode: str
    run_dir: Path
    rootfs: Path
    loop: str | None = None
    read_only: bool = False
    mnt: Path | None = None
    fuse: fuse2fs.Fuse2fs | None = field(default=None, repr=False)
    idmap: IdMap | None = None  # the rootfs is an idmapped mount (a user-namespace domain's)
    shift: idshift.Layer | None = field(default=None, repr=False)  # fuse mode's id shift

    @property
    def fuse2fs_pid(self) -> int | None:
        return self.fuse.pid if self.fuse is not None else None

    @property
    def data_pids(self) -> list[int]:
        """The processes the mount's data path runs through (fuse2fs, the id-shifting layer)."""
        return [h.pid for h in (self.fuse, self.shift) if h is not None]


@dataclass
class StandbyLoop:
    """A loop device still bound to a volume's rootfs window after its filesystem was unmounted.

    It was attached with auto-clear and only `fd` keeps it: close() frees it, and so does the end
    of gatewayd, however it ends. Closing may write back through the block view, so never close
    it on the trio thread serving the view."""

    volume: str
    device: str
    read_only: bool
    fd: int

    def close(self) -> None:
        """Let the device go (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def prepare_rootfs_root(run_dir: str | os.PathLike[str]) -> Path:
    """Make RUN_DIR/rootfs a shared mount in its own peer group (idempotent).

    A bind of the directory onto itself, made private then shared: mounts made under it after
    libvirtd started still propagate into libvirt's namespace.
    """
    root = _layout(run_dir).rootfs_root
    private_dir(root)
    if not any(m.shared for m in mounts.mounts_at(root)):
        if not mounts.is_mountpoint(root):
            mounts.bind(root, root, nodev=False)
        mounts.make_private(root)
        mounts.make_shared(root)
    return root


def release_rootfs_root(run_dir: str | os.PathLike[str]) -> None:
    """Undo prepare_rootfs_root (for shutdown and tests); refuses while volumes are mounted."""
    root = _layout(run_dir).rootfs_root
    inner = [m.mount_point for m in mounts.mounts_under(root) if m.mount_point != str(root)]
    if inner:
        raise Conflict(f"attachment: {root} still has mounts: {', '.join(inner)}")
    while mounts.is_mountpoint(root):
        mounts.umount(root)


def _flags(read_only: bool, nosuid: bool, noexec: bool) -> int:
    return (mounts.MS_NODEV | (mounts.MS_RDONLY if read_only else 0)
            | (mounts.MS_NOSUID if nosuid else 0) | (mounts.MS_NOEXEC if noexec else 0))


EXT_FSTYPES = ("ext2", "ext3", "ext4")  # all three served by the ext4 driver on this host
# s_default_mount_opts (superblock 0x100, `tune2fs -o`) bits an image may carry in bind mode:
# user_xattr 0x4 and acl 0x8 (what mkfs sets), data=ordered 0x40 (the default anyway) and
# block_validity 0x200 (more checking). debug, bsdgroups, uid16, data=journal|writeback,
# nobarrier, discard and nodelalloc would each be the image choosing the host kernel's behaviour
# (seen on 6.18: journal_data, nobarrier and debug took effect, hidden from mountinfo).
EXT_SAFE_DEFAULT_OPTS = 0x0004 | 0x0008 | 0x0040 | 0x0200


def _ext_mount_data(volume: str, device: str, fstype: str, data: str | None) -> str | None:
    """The data for mount(2), once the ext2/3/4 superblock on `device` is known not to steer it.

    The image must not choose what the host kernel does beyond its own volume:
    - s_errors (tune2fs -e panic) is only a default: an explicit errors=remount-ro overrides it.
    - s_mount_opts (superblock 0x200, 64 bytes; tune2fs -E mount_opts=) is parsed as mount
      options at every mount whose first byte is not NUL (fs/ext4/super.c
      parse_apply_sb_mount_options); the caller's options only win for the keys they name, and
      there is no option to ignore the field. Seen on kernel 6.18 under errors=remount-ro:
      noload (read-write without a journal), nobarrier, data=journal, commit=86400, resuid=,
      usrjquota=, inode_readahead_blks=2^30, debug, test_dummy_encryption all took effect, and
      journal_path= made the kernel look a path up in gatewayd's namespace. Such an image is
      refused (a superblock naming a journal device is left to the probe, which refuses it).
    """
    if fstype not in EXT_FSTYPES:
        return data
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sb = os.pread(fd, 1024, 1024)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BackendError(f"attachment {volume}: read the superblock on {device}: "
                           f"{exc.strerror}") from exc
    if len(sb) == 1024 and sb[0x38:0x3A] == b"\x53\xef" and sb[0x200] != 0:
        shown = "".join(c if " " <= c <= "~" else "?"
                        for c in sb[0x200:0x240].split(b"\0", 1)[0].decode("latin-1"))
        raise FormatError(f"attachment {volume}: the {fstype} superblock carries its own mount "
                          f"options ({shown!r}), which bind mode refuses; clear them with "
                          f"`tune2fs -E mount_opts= IMAGE` or use fuse mode")
    defaults = int.from_bytes(sb[0x100:0x104], "little") if len(sb) == 1024 else 0
    if defaults & ~EXT_SAFE_DEFAULT_OPTS:
        raise FormatError(f"attachment {volume}: the {fstype} superblock sets default mount "
                          f"options 0x{defaults:x} (tune2fs -o), which bind mode refuses beyond "
                          "user_xattr, acl, data=ordered and block_validity; reset them with "
                          "`tune2fs -o ^OPTION IMAGE` or use fuse mode")
    kept = [opt for opt in (data or "").split(",") if opt and not opt.startswith("errors=")]
    return ",".join([*kept, "errors=remount-ro"])


def attach_bind(run_dir: str | os.PathLike[str], volume: str, fstype: str, *,
                journal: Journal = _no_journal, read_only: bool = False, nosuid: bool = True,
                noexec: bool = False, data: str | None = None,
                device: str | None = None, standby: StandbyLoop | None = None,
                standby_cache: bool = False, ids: IdMap | None = None) -> Attachment:
    """loop -> kernel mount -> bind. `device` skips the loop step (kernel NBD seam).

    With `ids` the rootfs is an idmapped clone of the kernel mount instead of a plain bind (the
    image is never chowned), and ext2/ext3 are mounted with the ext4 driver, which can be
    idmapped; host-side work keeps using the private kernel mount at RUN_DIR/mnt/VOL.

    `standby` (from detach(keep_loop=True), serving the same window) replaces the loop step: the
    filesystem is mounted on it, and the standby is closed either way, leaving the device to the
    mount (auto-clear) or to nobody. Its page cache is dropped first unless `standby_cache` says
    nothing wrote to the volume since the umount."""
    if fstype not in KERNEL_FSTYPES:
        raise InvalidArgument(f"attachment {volume}: filesystem type {fstype!r} is not allowed "
                              f"for kernel mounts (allowed: {', '.join(KERNEL_FSTYPES)})")
    lay = _layout(run_dir, volume)
    mnt, target, window = lay.mnt(volume), lay.rootfs(volume), lay.window(volume)
    for d in (mnt, target):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    att = Attachment(volume, BIND, lay.run_dir, target, read_only=read_only, idmap=ids)
    flags = _flags(read_only, nosuid, noexec)
    if ids is not None and fstype in ("ext2", "ext3"):
        fstype = "ext4"  # the ext2 and ext3 drivers refuse idmapping; ext4 serves both
    try:
        dev_fd = -1
        if standby is not None:
            _note(journal, LoopStep(Phase.START, file=str(window), read_only=read_only,
                                    standby=standby.device))
            if standby.read_only != read_only or loopdev.backing_file(standby.device) != str(
                    window):
                raise Conflict(f"attachment {volume}: standby {standby.device} no longer "
                               f"serves {window} as asked")
            if not standby_cache:
                loopdev.drop_cache(standby.fd)
            att.loop = device = standby.device
            _note(journal, LoopStep(Phase.DONE, file=str(window), device=device,
                                    cache=standby_cache))
        elif device is None:
            _note(journal, LoopStep(Phase.START, file=str(window), read_only=read_only))
            loop, dev_fd = loopdev.attach(window, read_only=read_only)
            att.loop = device = loop.path
            _note(journal, LoopStep(Phase.DONE, file=str(window), device=loop.path))
        try:
            data = _ext_mount_data(volume, device, fstype, data)
            _note(journal, MountStep(Phase.START, device=device, target=str(mnt),
                                     fstype=fstype, flags=flags, data=data))
            mounts.mount(device, mnt, fstype, flags, data)
            att.mnt = mnt
            _note(journal, MountStep(Phase.DONE, device=device, target=str(mnt)))
        finally:
            if dev_fd >= 0:
                os.close(dev_fd)  # the mount holds the device now; auto-clear frees it on umount
            if standby is not None:
                standby.close()
        if ids is not None:
            _note(journal, IdmapStep(Phase.START, ids.uid_first, ids.gid_first, ids.count,
                                     source=str(mnt), target=str(target)))
            # the container resolves its rootfs path as the slice's uid: let it through the
            # 0700 RUN_DIR/rootfs (search only)
            acl.allow_search(lay.rootfs_root, ids.uid_first)
            idmap.idmapped_bind(mnt, target, ids, fstype=fstype, read_only=read_only,
                                nosuid=nosuid, noexec=noexec)
            _note(journal, IdmapStep(Phase.DONE, target=str(target)))
        else:
            _note(journal, BindStep(Phase.START, source=str(mnt), target=str(target)))
            mounts.bind(mnt, target, read_only=read_only, nosuid=nosuid, noexec=noexec)
            _note(journal, BindStep(Phase.DONE, target=str(target)))
    except BaseException:
        if standby is not None:
            standby.close()
        _best_effort_teardown(att)
        raise
    return att


def attach_fuse(run_dir: str | os.PathLike[str], volume: str, fstype: str, *,
                journal: Journal = _no_journal, read_only: bool = False, nosuid: bool = True,
                noexec: bool = False, stderr_path: str | None = None,
                timeout: float = 15.0, force_fsck: bool = False,
                ids: IdMap | None = None, shift_stderr_path: str | None = None) -> Attachment:
    """fuse2fs over the rootfs window, mounted at RUN_DIR/rootfs/VOL.

    With `ids` fuse2fs is mounted at the private RUN_DIR/mnt/VOL and the id-shifting layer
    serves it at RUN_DIR/rootfs/VOL with owners shifted into the slice (the image is never
    chowned; the host kernel still parses nothing of it).

    A writable filesystem is preened by e2fsck first, and fully repaired (-f -y) when
    `force_fsck`: after a fuse2fs that did not exit in order, whose in-memory bitmaps were lost."""
    fuse2fs.check_fstype(fstype)
    lay = _layout(run_dir, volume)
    target, window = lay.rootfs(volume), lay.window(volume)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    if ids is not None:
        return _attach_shifted(lay, volume, fstype, ids, journal=journal, read_only=read_only,
                               nosuid=nosuid, noexec=noexec, stderr_path=stderr_path,
                               timeout=timeout, force_fsck=force_fsck,
                               shift_stderr_path=shift_stderr_path)
    if not read_only:
        # fuse2fs neither replays a journal nor survives a crash cleanly (bitmaps live in its
        # memory): let e2fsck replay and preen first, as a boot would.
        _note(journal, FsckStep(Phase.START, image=str(window)))
        code = mkfs.preen_ext(window, repair=force_fsck, timeout=timeout * 20)
        _note(journal, FsckStep(Phase.DONE, exit=code))
    _note(journal, Fuse2fsStep(Phase.START, image=str(window), target=str(target)))
    handle = fuse2fs.start(window, target, fstype, read_only=read_only, nosuid=nosuid,
                           noexec=noexec, timeout=timeout, stderr_path=stderr_path,
                           confine=lay.rootfs_root)
    _note(journal, Fuse2fsStep(Phase.DONE, pid=handle.pid, target=str(target)))
    return Attachment(volume, FUSE, lay.run_dir, target, fuse=handle)


def _preen(journal: Journal, window: Path, *, force_fsck: bool, timeout: float) -> None:
    _note(journal, FsckStep(Phase.START, image=str(window)))
    code = mkfs.preen_ext(window, repair=force_fsck, timeout=timeout * 20)
    _note(journal, FsckStep(Phase.DONE, exit=code))


def _attach_shifted(lay: RunLayout, volume: str, fstype: str, ids: IdMap, *, journal: Journal,
                    read_only: bool, nosuid: bool, noexec: bool, stderr_path: str | None,
                    timeout: float, force_fsck: bool,
                    shift_stderr_path: str | None) -> Attachment:
    """fuse2fs at RUN_DIR/mnt/VOL, the id-shifting layer over it at RUN_DIR/rootfs/VOL."""
    mnt, target, window = lay.mnt(volume), lay.rootfs(volume), lay.window(volume)
    mnt.mkdir(mode=0o700, parents=True, exist_ok=True)
    att = Attachment(volume, FUSE, lay.run_dir, target, read_only=read_only, idmap=ids)
    try:
        if not read_only:
            _preen(journal, window, force_fsck=force_fsck, timeout=timeout)
        _note(journal, Fuse2fsStep(Phase.START, image=str(window), target=str(mnt)))
        att.fuse = fuse2fs.start(window, mnt, fstype, read_only=read_only, nosuid=nosuid,
                                 noexec=noexec, timeout=timeout, stderr_path=stderr_path,
                                 confine=lay.mnt_root)
        att.mnt = mnt
        _note(journal, Fuse2fsStep(Phase.DONE, pid=att.fuse.pid, target=str(mnt)))
        _note(journal, IdshiftStep(Phase.START, ids.uid_first, ids.gid_first, ids.count,
                                   source=str(mnt), target=str(target)))
        # the container resolves its rootfs path as the slice's uid (see attach_bind)
        acl.allow_search(lay.rootfs_root, ids.uid_first)
        att.shift = idshift.start(mnt, target, ids, read_only=read_only, nosuid=nosuid,
                                  noexec=noexec, timeout=timeout, stderr_path=shift_stderr_path,
                                  confine=lay.rootfs_root)
        _note(journal, IdshiftStep(Phase.DONE, target=str(target), pid=att.shift.pid))
    except BaseException:
        _best_effort_teardown(att)
        raise
    return att


def _umount_if_mounted(path: Path, *, force: bool) -> None:
    while mounts.is_mountpoint(path):
        try:
            mounts.umount(path)
        except GatewayError:
            if not force:
                raise
            _umount_forcefully(path)


def _umount_forcefully(path: Path) -> None:
    """MNT_FORCE first (aborts I/O on dead backends), then a lazy detach as the last resort."""
    try:
        mounts.umount(path, force=True)
    except GatewayError:
        mounts.umount(path, lazy=True)


def _detach_loop_of(dev: str, backing: Path) -> bool:
    """Detach `dev` only if it still serves `backing` (it may have been reused). True if done."""
    if loopdev.backing_file(dev) != str(backing):
        return False
    try:
        loopdev.detach(dev)
    except NotFound:
        return False
    return True


def _best_effort_teardown(att: Attachment) -> None:
    try:
        _teardown(att, force=True)
    except GatewayError:
        pass


def _teardown(att: Attachment, *, force: bool, keep: StandbyLoop | None = None) -> None:
    lay = _layout(att.run_dir)
    if att.mode == BIND:
        _umount_if_mounted(att.rootfs, force=force)
        if att.idmap is not None:
            acl.revoke_search(lay.rootfs_root, att.idmap.uid_first)
        _umount_if_mounted(lay.mnt(att.volume), force=force)
        if att.loop is not None and keep is None:
            _detach_loop_of(att.loop, lay.window(att.volume))
    else:
        if att.shift is not None:
            att.shift.stop(force=force)  # first: it holds files of fuse2fs's mount open
        if att.idmap is not None and not mounts.is_mountpoint(att.rootfs):
            acl.revoke_search(lay.rootfs_root, att.idmap.uid_first)
        if att.fuse is not None:
            att.fuse.stop(force=force)


def _hold_loop(att: Attachment) -> StandbyLoop | None:
    """Open the bind mount's loop device so that it outlives the umount; None if it cannot."""
    if att.mode != BIND or att.loop is None:
        return None
    if loopdev.backing_file(att.loop) != str(_layout(att.run_dir).window(att.volume)):
        return None
    try:
        fd = os.open(att.loop, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # the mount goes on without a standby
    return StandbyLoop(att.volume, att.loop, att.read_only, fd)


def detach(att: Attachment, *, force: bool = False,
           keep_loop: bool = False) -> StandbyLoop | None:
    """Verified teardown: umount (lazy only with force), loop detach, fuse2fs exit, then check.

    With `keep_loop` (bind mode, not forced) the loop device stays bound and comes back as a
    StandbyLoop for the caller to reuse or close. The caller then closes block-view files
    (BlockView.remove_volume) and flushes NBD.
    """
    keep = _hold_loop(att) if keep_loop and not force else None
    try:
        _teardown(att, force=force, keep=keep)
        if keep is not None and loopdev.in_use(keep.device):
            # Still mounted elsewhere (a container's namespace): nothing to keep; the loop goes
            # when that mount does, and until then it counts as a leftover, as without a standby.
            keep.close()
            keep = None
            if att.loop is not None:
                _detach_loop_of(att.loop, _layout(att.run_dir).window(att.volume))
        remains = leftovers(att.run_dir, att.volume, keep=keep.device if keep else None)
        if remains:
            raise TeardownIncomplete(att.volume, remains)
    except BaseException:
        if keep is not None:
            keep.close()
        raise
    return keep


def leftovers(run_dir: str | os.PathLike[str], volume: str, *,
              keep: str | None = None) -> list[str]:
    """What of `volume` is still present: mounts, loop devices (but `keep`), fuse2fs processes
    (trusted ones, mounted at RUN_DIR/rootfs/VOL: see fuse2fs.identify)."""
    lay = _layout(run_dir, volume)
    remains: list[str] = []
    for root in (lay.mnt(volume), lay.rootfs(volume)):
        remains += [f"mount {m.mount_point} ({m.fstype})" for m in mounts.mounts_under(root)]
    remains += [f"loop {dev} on {loopdev.backing_file(dev)}"
                for dev in loopdev.devices_backed_by(lay.volume_dir(volume)) if dev != keep]
    for root in (lay.rootfs(volume), lay.mnt(volume)):
        remains += [f"fuse2fs pid {pid}" for pid in fuse2fs.processes_mounted_under(root)]
    remains += [f"idshift pid {pid}"
                for pid in idshift.processes_mounted_under(lay.rootfs(volume))]
    return remains


@dataclass
class ReconcileReport:
    found: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def merge(self, other: ReconcileReport) -> None:
        self.found += other.found
        self.done += other.done
        self.remaining += other.remaining
        self.errors += other.errors


def _kept(path: str, keep: Iterable[Path]) -> bool:
    return any(path == str(k) or path.startswith(str(k) + "/") for k in keep)


def _unmount_all(root: Path, report: ReconcileReport, *, keep_root: bool = False,
                 keep: Iterable[Path] = ()) -> None:
    for m in mounts.mounts_under(root):
        if (keep_root and m.mount_point == str(root)) or _kept(m.mount_point, keep):
            continue
        report.found.append(f"mount {m.mount_point} ({m.fstype} from {m.source})")
        path = Path(m.mount_point)
        try:
            mounts.umount(path)
            report.done.append(f"unmounted {path}")
        except GatewayError as exc:
            try:
                _umount_forcefully(path)
                report.done.append(f"force-unmounted {path} after: {exc}")
            except GatewayError as exc2:
                report.errors.append(f"umount {path}: {exc2}")


def _detach_loops(devs: Iterable[str], under: Path, report: ReconcileReport, *,
                  keep: Iterable[Path] = ()) -> None:
    prefix = str(under).rstrip("/") + "/"
    for dev in sorted(set(devs)):
        backing = loopdev.backing_file(dev)
        if backing is None or not backing.startswith(prefix) or _kept(backing, keep):
            continue
        report.found.append(f"loop {dev} on {backing}")
        try:
            loopdev.detach(dev)
            report.done.append(f"detached {dev}")
        except GatewayError as exc:
            report.errors.append(f"detach {dev}: {exc}")


class _Server(Protocol):
    """A handle on a trusted FUSE server process (fuse2fs, the id-shifting layer)."""

    @property
    def target(self) -> str: ...

    def stop(self, *, timeout: float = ..., force: bool = ...) -> None: ...


def _stop_servers(what: str, pids: Iterable[int], live: Mapping[int, str | None],
                  target_of: Callable[[int], str | None],
                  adopt: Callable[[int, str], _Server | None], under: Path,
                  report: ReconcileReport, keep: Iterable[Path]) -> None:
    """Stop the journalled `pids` and the `live` trusted servers of one kind (pid -> mount
    target) whose mount target is `under` or lies below it, except the targets `keep` names.
    `target_of` finds a journalled pid's target now (None: gone or not trusted), `adopt` a
    handle on it (None: outside the directory that confines it)."""
    for pid in sorted(set(pids) | set(live)):
        target = live[pid] if pid in live else target_of(pid)
        if target is None or not procs.within(target, str(under), inclusive=True):
            continue  # gone, not trusted, or mounted elsewhere: the pid is someone else's
        if _kept(target, keep):
            continue  # an adopted attachment's
        handle = adopt(pid, target)
        if handle is None:
            continue
        report.found.append(f"{what} pid {pid} at {handle.target}")
        try:
            handle.stop(force=True, timeout=5.0)
            report.done.append(f"stopped {what} pid {pid}")
        except GatewayError as exc:
            report.errors.append(f"stop {what} pid {pid}: {exc}")


def _stop_fuse2fs(pids: Iterable[int], under: Path, report: ReconcileReport, *,
                  rootfs_root: Path, keep: Iterable[Path] = ()) -> None:
    """Stop the journalled `pids` and the fuse2fs processes mounted at or below `under`, but
    only trusted ones (root's, the real binary) whose mount target lies below `rootfs_root`:
    anything else (another user's look-alike, root's own fuse2fs elsewhere) is not ours."""
    def target_of(pid: int) -> str | None:
        proc = fuse2fs.identify(pid)
        return proc.target if proc is not None else None

    live = {pid: p.target for pid, p in fuse2fs.processes_mounted_under(under).items()}
    _stop_servers("fuse2fs", pids, live, target_of,
                  lambda pid, target: fuse2fs.adopt(pid, target, confine=rootfs_root),
                  under, report, keep)


def _stop_layers(pids: Iterable[int], under: Path, report: ReconcileReport, *,
                 rootfs_root: Path, keep: Iterable[Path] = ()) -> None:
    """Stop the journalled `pids` and the trusted id-shifting layers serving at or below
    `under` (as _stop_fuse2fs does for fuse2fs): before fuse2fs's mount below them goes."""
    def target_of(pid: int) -> str | None:
        proc = idshift.identify(pid)
        return proc.target if proc is not None else None

    live: dict[int, str | None] = {
        pid: p.target for pid, p in idshift.processes_mounted_under(under).items()}
    _stop_servers("idshift", pids, live, target_of,
                  lambda pid, target: idshift.adopt(pid, target, confine=rootfs_root),
                  under, report, keep)


def reconcile(run_dir: str | os.PathLike[str], volume: str,
              entries: Iterable[JournalEntry | records.Entry] = ()) -> ReconcileReport:
    """Tear down what a crashed daemon left of `volume`'s attachment, guided by its journal.

    Adopting a still-sound attachment is impossible: the block view died with the daemon, so
    its loop devices and fuse2fs read a dead FUSE file (ENOTCONN). Reconcile therefore always
    tears down: unmount (forcing or detaching lazily when the backend is dead), detach loop
    devices, stop fuse2fs, then verify. The report lists what was found, done and what remains.
    A journalled fuse2fs pid is only a hint: what is stopped must be a trusted fuse2fs (root's,
    the real binary) mounted at RUN_DIR/rootfs/VOL, and nothing outside RUN_DIR/rootfs is unmounted.
    """
    lay = _layout(run_dir, volume)
    report = ReconcileReport()
    journal = records.decode_all(entries)
    loops, pids = records.loop_devices(journal), records.fuse2fs_pids(journal)
    _unmount_all(lay.rootfs(volume), report)
    _stop_layers(records.idshift_pids(journal), lay.rootfs(volume), report,
                 rootfs_root=lay.rootfs_root)
    ids = records.idmap_of(journal)
    if ids is not None and not mounts.is_mountpoint(lay.rootfs(volume)):
        try:
            if ids[0] in acl.search_allowed(lay.rootfs_root):
                report.found.append(f"search ACL for uid {ids[0]} on {lay.rootfs_root}")
                acl.revoke_search(lay.rootfs_root, ids[0])
                report.done.append(f"revoked the search ACL of uid {ids[0]}")
        except GatewayError as exc:
            report.errors.append(f"revoke the search ACL of uid {ids[0]}: {exc}")
    _unmount_all(lay.mnt(volume), report)
    _detach_loops(loops | set(loopdev.devices_backed_by(lay.volume_dir(volume))),
                  lay.volume_dir(volume), report)
    _stop_fuse2fs(pids, lay.rootfs(volume), report, rootfs_root=lay.rootfs_root)
    _stop_fuse2fs(pids, lay.mnt(volume), report, rootfs_root=lay.mnt_root)
    report.remaining = leftovers(run_dir, volume)
    return report


def sweep(run_dir: str | os.PathLike[str], *, block_view: bool = True,
          keep: Iterable[str] = ()) -> ReconcileReport:
    """Remove leftovers in no journal: mounts under RUN_DIR/mnt and RUN_DIR/rootfs (the shared
    rootfs root itself stays), loop devices on files under RUN_DIR/blk, trusted fuse2fs processes
    mounted below RUN_DIR/rootfs (never a look-alike, nor a mount elsewhere), and
    (block_view=True) a stale FUSE mount at RUN_DIR/blk. A block view that still answers is left
    alone and reported: it belongs to a live data plane. The attachments of the `keep` volumes
    (adopted by a restarted gatewayd) are left as they are.
    """
    lay = _layout(run_dir)
    report = ReconcileReport()
    kept = [p for v in keep for p in (lay.rootfs(v), lay.mnt(v), lay.volume_dir(v))]
    _unmount_all(lay.rootfs_root, report, keep_root=True, keep=kept)
    _stop_layers((), lay.rootfs_root, report, rootfs_root=lay.rootfs_root, keep=kept)
    _unmount_all(lay.mnt_root, report, keep=kept)
    _detach_loops(loopdev.devices_backed_by(lay.blk), lay.blk, report, keep=kept)
    _stop_fuse2fs((), lay.rootfs_root, report, rootfs_root=lay.rootfs_root, keep=kept)
    _stop_fuse2fs((), lay.mnt_root, report, rootfs_root=lay.mnt_root, keep=kept)
    live_view = False
    if block_view and mounts.is_mountpoint(lay.blk):
        try:
            os.stat(lay.blk)
            live_view = True
            report.remaining.append(f"live block view at {lay.blk} (not touched)")
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                report.errors.append(f"stat {lay.blk}: {exc.strerror}")
            report.found.append(f"stale block view at {lay.blk}")
            stale = ReconcileReport()  # one leftover: do not count its mount a second time
            _unmount_all(lay.blk, stale)
            report.done += stale.done
            report.errors += stale.errors
    report.remaining += [f"mount {m.mount_point}" for m in mounts.mounts_under(lay.mnt_root)
                         if not _kept(m.mount_point, kept)]
    if block_view and not live_view:
        report.remaining += [f"mount {m.mount_point}" for m in mounts.mounts_under(lay.blk)]
    report.remaining += [f"mount {m.mount_point}" for m in mounts.mounts_under(lay.rootfs_root)
                         if m.mount_point != str(lay.rootfs_root)
                         and not _kept(m.mount_point, kept)]
    report.remaining += [f"loop {d}" for d in loopdev.devices_backed_by(lay.blk)
                         if not _kept(loopdev.backing_file(d) or "", kept)]
    report.remaining += [f"fuse2fs pid {p}" for root in (lay.rootfs_root, lay.mnt_root)
                         for p, proc in fuse2fs.processes_mounted_under(root).items()
                         if not _kept(proc.target or "", kept)]
    report.remaining += [f"idshift pid {p}"
                         for p, layer in idshift.processes_mounted_under(lay.rootfs_root).items()
                         if not _kept(layer.target, kept)]
    return report


def adoptable(run_dir: str | os.PathLike[str], volume: str, mode: str,
              entries: Iterable[JournalEntry | records.Entry], *,
              read_only: bool) -> Attachment | None:
    """The attachment a previous gatewayd left of `volume`, if its data path is whole: the
    journalled loop device still serves the volume's rootfs window and carries the kernel mount
    (bind), or the journalled fuse2fs is ours and alive (fuse), and RUN_DIR/rootfs/VOL is still
    that mount unless the host view was released. Blocking (mountinfo, /proc); the caller checked
    that the data plane still serves the volume's window."""
    lay = _layout(run_dir, volume)
    decoded = records.decode_all(entries)
    released = records.host_view_released(decoded)
    target = lay.rootfs(volume)
    if mode == BIND:
        loops = sorted(records.loop_devices(decoded))
        loop = next((d for d in loops if loopdev.backing_file(d) == str(lay.window(volume))), None)
        if loop is None:
            return None
        journalled = records.idmap_of(decoded)
        try:
            ids = IdMap(*journalled) if journalled is not None else None
        except GatewayError:
            return None  # a map no live domain could have: not a whole attachment
        on_target = mounts.mounts_at(target)
        if not released and ([m.source for m in on_target[-1:]] != [loop]
                             or idmap.is_idmapped(on_target[-1].options) != (ids is not None)):
            return None
        kernel = [m.source for m in mounts.mounts_at(lay.mnt(volume))]
        mnt = lay.mnt(volume) if kernel[-1:] == [loop] else None
        return Attachment(volume, BIND, lay.run_dir, target, loop=loop, read_only=read_only,
                          mnt=mnt, idmap=ids)
    if mode == FUSE and records.shifted(decoded):
        return _adoptable_shifted(lay, volume, decoded, read_only=read_only, released=released)
    if mode == FUSE:
        for pid in sorted(records.fuse2fs_pids(decoded)):
            handle = fuse2fs.adopt(pid, target, confine=lay.rootfs_root)
            if handle is not None and (released or handle.mounted()):
                return Attachment(volume, FUSE, lay.run_dir, target, read_only=read_only,
                                  fuse=handle)
    return None


def _adoptable_shifted(lay: RunLayout, volume: str, decoded: list[records.Entry], *,
                       read_only: bool, released: bool) -> Attachment | None:
    """Fuse mode with an id shift: the journalled fuse2fs is ours and serves RUN_DIR/mnt/VOL,
    and the journalled layer is ours and serves RUN_DIR/rootfs/VOL (both mounted unless the
    host view was released), with a map a live domain could have."""
    journalled = records.idmap_of(decoded)
    try:
        ids = IdMap(*journalled) if journalled is not None else None
    except GatewayError:
        return None
    if ids is None:
        return None
    mnt, target = lay.mnt(volume), lay.rootfs(volume)
    fuse = next((h for pid in sorted(records.fuse2fs_pids(decoded))
                 if (h := fuse2fs.adopt(pid, mnt, confine=lay.mnt_root)) is not None
                 and (released or h.mounted())), None)
    layer = next((g for pid in sorted(records.idshift_pids(decoded))
                  if (g := idshift.adopt(pid, target, confine=lay.rootfs_root)) is not None
                  and (released or g.mounted())), None)
    if fuse is None or layer is None:
        return None
    return Attachment(volume, FUSE, lay.run_dir, target, read_only=read_only, mnt=mnt,
                      fuse=fuse, idmap=ids, shift=layer)
