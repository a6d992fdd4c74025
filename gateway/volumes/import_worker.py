"""The tarball import worker: extraction and `mkfs.ext4 -d` inside an unprivileged user namespace.

gatewayd (root) never extracts a tarball itself. `build_filesystem` (gatewayd's side, called from
lifecycle.build_import in a worker thread):
1. opens the tarball (O_NOFOLLOW; it must be a regular file) and hands the descriptor to the worker
   as its stdin: the worker never opens a user-supplied path;
2. makes SCRATCH/fs.raw (the filesystem, FS_SIZE bytes, sparse) and gives it and SCRATCH (0700) to
   ID_BASE, the host id of root inside the namespace;
3. starts `python -m gateway.volumes.import_worker` (through gateway.command) with SCRATCH as its
   working directory. The worker calls unshare(CLONE_NEWUSER) and says "ready"; gatewayd writes
   /proc/PID/uid_map and gid_map ("0 ID_BASE 65536") and says go; the worker becomes uid and gid 0
   inside (ID_BASE outside) with no supplementary groups, no_new_privs and a parent-death signal,
   and says "dropped"; gatewayd checks the worker's host ids in /proc/PID/status and only then
   lets it read the tarball;
4. the worker extracts into ./tree with gateway.volumes.tarball's rules (member by member, bounded
   by the volume size and the member cap; its address space is capped while it parses headers), then
   runs `mkfs.ext4 -q -F [-L LABEL] -d tree fs.raw` itself, so the owners the image records are
   the in-namespace ids, i.e. exactly the archive's;
5. gatewayd takes fs.raw back (the same inode, chown 0:0, mode 0600) and SCRATCH (chown 0:0).
The worker's messages are JSON lines on its stdout; an error is one line `{"error": MESSAGE,
"code": CODE}` (or, if the worker died, the last line of its stderr). Cancellation and timeouts
kill the worker's process group (zstd and mkfs.ext4 included); the caller removes SCRATCH, which
root can do whatever the mapped ids made in it.

ID_BASE = 0x7FFF0000 (2147418112): host uids and gids 2147418112..2147483647 (up to 2^31 - 1) are
reserved for import namespaces. Nothing else on the host may use them: keep them out of
/etc/subuid and /etc/subgid ranges; they lie outside the ranges systemd hands out to users,
dynamic users and containers. If user namespaces are disabled (user.max_user_namespaces = 0, a
seccomp filter), imports fail with a clear error; there is no fallback to extraction as root.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import resource
import select
import signal
import stat
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import gateway
from gateway import command
from gateway.errors import CommandError, FormatError, GatewayError, InvalidArgument
from gateway.host import mkfs
from gateway.volumes import tarball

ID_BASE = 0x7FFF0000
ID_COUNT = tarball.ID_COUNT
FS_FILE = "fs.raw"
TREE = "tree"
TIMEOUT = 3600.0
POLL = 0.1
EXTRACT_MEMORY = 1 << 30  # address space cap while tar headers are parsed (a huge PAX header)
EXTRACT_SHARE = 80.0  # progress: extraction 0..80, mkfs.ext4 80..100
MAX_MESSAGE = 1 << 16
KILL_WAIT = 60.0  # seconds for a SIGKILLed worker (or zstd) to be gone: it may be in I/O
ZSTD_EXIT_WAIT = 5.0  # seconds for zstd to exit after its stream ended
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
ERRORS: dict[str, type[GatewayError]] = {"format-error": FormatError,
                                         "invalid-argument": InvalidArgument}
Progress = Callable[[float], None]


class ImportWorkerError(CommandError):
    pass


@dataclass(frozen=True)
class Built:
    data_bytes: int  # file data extracted
    members: int
    host_uid: int  # the worker's ids on the host while it extracted (checked: ID_BASE)
    host_gid: int


# --- gatewayd's side (root) -------------------------------------------------------------------

def open_tarball(path: Path) -> int:
    """A read-only descriptor of the tarball, refused unless it is a regular file (no symlink)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot open the tarball: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def host_ids(pid: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Real, effective, saved and filesystem uids, the same gids, and the supplementary groups of
    process `pid`, as the host sees them (/proc/PID/status)."""
    found: dict[str, tuple[int, ...]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            found[key] = tuple(int(v) for v in value.split())
    return found["Uid"], found["Gid"], found.get("Groups", ())


def _check_dropped(pid: int) -> tuple[int, int]:
    uids, gids, groups = host_ids(pid)
    if set(uids) != {ID_BASE} or set(gids) != {ID_BASE} or groups:
        raise ImportWorkerError(f"import worker runs as host uids {uids}, gids {gids}, groups "
                                f"{groups}, not {ID_BASE}: refusing to extract")
    return ID_BASE, ID_BASE


def _map_ids(pid: int) -> None:
    for name in ("uid_map", "gid_map"):
        try:
            Path(f"/proc/{pid}/{name}").write_text(f"0 {ID_BASE} {ID_COUNT}\n")
        except OSError as exc:
            raise ImportWorkerError(f"cannot map ids into the import namespace: "
                                    f"{exc.strerror}") from exc


def _prepare(scratch: Path, fs_size: int) -> tuple[int, int]:
    """Give SCRATCH and a new FS_FILE of `fs_size` bytes to the namespace's root; (dev, ino)."""
    os.chown(scratch, ID_BASE, ID_BASE)
    fd = os.open(scratch / FS_FILE,
                 os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, fs_size)
        os.fchown(fd, ID_BASE, ID_BASE)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def _reclaim(scratch: Path, ident: tuple[int, int]) -> None:
    """FS_FILE back to root (0600), refused unless it is still the file `_prepare` made."""
    fd = os.open(scratch / FS_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != ident:
            raise ImportWorkerError(f"import worker replaced {FS_FILE}")
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _Worker:
    """gatewayd's end of one running worker: its messages, control pipe, process group."""

    def __init__(self, proc: command.Child, messages: int, control: int, log: str,
                 watch: Callable[[], None]) -> None:
        self.proc = proc
        self.control = control
        self.log = log
        self._lines = self._read(messages, watch)

    @staticmethod
    def _read(fd: int, watch: Callable[[], None]) -> Iterator[bytes]:
        buffer = b""
        while True:
            watch()
            if not select.select([fd], [], [], POLL)[0]:
                continue
            chunk = os.read(fd, MAX_MESSAGE)
            if not chunk:
                return
            *lines, buffer = (buffer + chunk).split(b"\n")
            if len(buffer) > MAX_MESSAGE:
                raise ImportWorkerError("import worker: message too long")
            yield from (line for line in lines if line.strip())

    def expect(self, key: str) -> dict[str, Any]:
        line = next(self._lines, None)
        if line is None:
            raise self._died()
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ImportWorkerError(f"import worker: unreadable message {line[:80]!r}") from exc
        if not isinstance(message, dict):
            raise ImportWorkerError(f"import worker: unexpected message {line[:80]!r}")
        if "error" in message:
            error = ERRORS.get(str(message.get("code")), ImportWorkerError)
            raise error(str(message["error"]))
        if key not in message:
            raise ImportWorkerError(f"import worker: expected {key!r}, got {line[:80]!r}")
        return message

    def say(self, word: bytes) -> None:
        os.write(self.control, word)

    def finished(self) -> None:
        """Wait for the end of the worker's output (it exits after its last message)."""
        for line in self._lines:
            raise ImportWorkerError(f"import worker: unexpected message {line[:80]!r}")

    def _died(self) -> ImportWorkerError:
        self.stop()
        code = self.proc.returncode
        why = ("would not exit" if code is None
               else f"killed by signal {-code}" if code < 0 else f"exit {code}")
        return ImportWorkerError(f"import worker failed: {command.stderr_tail(self.log) or why}")

    def stop(self) -> None:
        """Kill what is left of the worker's process group, then reap the worker."""
        if self.proc.returncode is None:
            command.stop(self.proc, grace=0, kill_wait=KILL_WAIT, group=True)


@dataclass(frozen=True)
class Options:
    max_bytes: int
    max_members: int = tarball.MAX_MEMBERS
    label: str | None = None
    zstd: bool = False

    def argv(self, control: int) -> list[str]:
        argv = [sys.executable, "-P", "-m", "gateway.volumes.import_worker", "--control",
                str(control), "--max-bytes", str(self.max_bytes), "--max-members",
                str(self.max_members)]
        if self.label:
            argv += ["--label", self.label]
        return [*argv, "--zstd"] if self.zstd else argv


def _converse(worker: _Worker) -> Built:
    worker.expect("ready")
    _map_ids(worker.proc.pid)
    worker.say(b"g")
    worker.expect("dropped")
    uid, gid = _check_dropped(worker.proc.pid)
    worker.say(b"x")
    extracted = worker.expect("extracted")
    worker.expect("done")
    worker.finished()
    return Built(int(extracted["extracted"]), int(extracted["members"]), uid, gid)


def _watcher(tar_fd: int, progress: Progress | None, cancel: threading.Event | None,
             timeout: float) -> Callable[[], None]:
    deadline = time.monotonic() + timeout
    size = max(1, os.fstat(tar_fd).st_size)

    def watch() -> None:
        if cancel is not None and cancel.is_set():
            raise ImportWorkerError("tarball import cancelled")
        if time.monotonic() > deadline:
            raise ImportWorkerError(f"tarball import timed out after {timeout:g}s")
        if progress is not None:  # the worker (or its zstd) reads our shared file description
            progress(EXTRACT_SHARE * min(1.0, os.lseek(tar_fd, 0, os.SEEK_CUR) / size))
    return watch


def _run(scratch: Path, tar_fd: int, options: Options, watch: Callable[[], None]) -> Built:
    control_r, control_w = os.pipe()
    messages_r, messages_w = os.pipe()
    root = str(Path(gateway.__file__).resolve().parent.parent)
    with tempfile.NamedTemporaryFile(prefix="gateway-import-", suffix=".log") as log:
        try:
            proc = command.spawn(options.argv(control_r), env={"PYTHONPATH": root},
                                 stderr_path=log.name, stdin=tar_fd, stdout=messages_w,
                                 pass_fds=(control_r,), cwd=scratch, error=ImportWorkerError)
        except BaseException:
            for fd in (control_w, messages_r):
                os.close(fd)
            raise
        finally:
            os.close(control_r)
            os.close(messages_w)
        worker = _Worker(proc, messages_r, control_w, log.name, watch)
        try:
            return _converse(worker)
        finally:
            worker.stop()
            os.close(control_w)
            os.close(messages_r)


def build_filesystem(source: Path, scratch: Path, fs_size: int, options: Options, *,
                     progress: Progress | None = None, cancel: threading.Event | None = None,
                     timeout: float = TIMEOUT) -> Built:
    """Make SCRATCH/fs.raw: an ext4 of `fs_size` bytes filled from the tarball at `source`, built
    in the import namespace (see the module docstring). `scratch` is an empty directory (0700)
    in the state directory; the caller removes it. Setting `cancel` kills the worker."""
    options = Options(options.max_bytes, options.max_members, mkfs.check_label(options.label),
                      tarball.check_suffix(source.name))
    tar_fd = open_tarball(source)
    try:
        try:
            ident = _prepare(scratch, fs_size)
            built = _run(scratch, tar_fd, options, _watcher(tar_fd, progress, cancel, timeout))
        finally:
            os.chown(scratch, 0, 0)
        _reclaim(scratch, ident)
    finally:
        os.close(tar_fd)
    if progress is not None:
        progress(100.0)
    return built


# --- the worker (in the namespace) --------------------------------------------------------------

def _send(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _await(control: int, word: bytes) -> None:
    if os.read(control, 1) != word:
        raise ImportWorkerError("import worker: gatewayd stopped the import")


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise ImportWorkerError(f"import worker: prctl {option}: "
                                f"{os.strerror(ctypes.get_errno())}")


def _enter_namespace(control: int) -> None:
    """unshare, wait for the id maps, become root inside (ID_BASE outside), wait for the check."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise ImportWorkerError("cannot make a user namespace for the import: "
                                f"{os.strerror(ctypes.get_errno())}")
    _send(ready=True)
    _await(control, b"g")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # after setresuid, which clears it
    if os.getppid() != parent:
        raise ImportWorkerError("import worker: gatewayd went away")
    _send(dropped=True)
    _await(control, b"x")
    os.close(control)


def _extract_from(stream: IO[bytes], mode: Literal["r|*", "r|"],
                  options: argparse.Namespace) -> tarball.Extracted:
    try:
        tar = tarfile.open(fileobj=stream, mode=mode)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FormatError(f"cannot read the tarball: {exc}") from exc
    with tar:
        return tarball.extract(tar, TREE, max_bytes=options.max_bytes,
                               max_members=options.max_members)


def _drain(stream: IO[bytes], limit: int) -> None:
    """Read the stream to its end (zstd checks its frame checksums there), at most `limit`."""
    while chunk := stream.read(1 << 20):
        limit -= len(chunk)
        if limit < 0:
            raise FormatError("tarball has too much data after its end")


def _at_end(fd: int) -> bool:
    """Whether the pipe `fd` is at its end (all writers gone), without blocking."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, MAX_MESSAGE) == b""
    except BlockingIOError:
        return False


def _zstd_failure(proc: command.Child, stderr: int) -> str | None:
    """zstd's last stderr line if it failed (it has exited or is exiting), else None."""
    code = command.wait(proc, ZSTD_EXIT_WAIT)
    if code is None or code == 0:
        return None
    os.set_blocking(stderr, False)
    try:
        text = os.read(stderr, MAX_MESSAGE)
    except BlockingIOError:
        text = b""
    return command.last_line(text) or f"exit {code}"


def _extract_zstd(options: argparse.Namespace) -> tarball.Extracted:
    """Extract through a `zstd -d -c` child reading our stdin; its failure (bad frame, checksum)
    is reported rather than the truncated tar stream it leaves."""
    data_r, data_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = command.spawn(["zstd", "-d", "-c", "-q"], stdin=0, stdout=data_w, stderr=err_w,
                             new_session=False, error=ImportWorkerError)
    finally:
        os.close(data_w)
        os.close(err_w)
    try:
        with os.fdopen(data_r, "rb") as stream:
            try:
                extracted = _extract_from(stream, "r|", options)
                _drain(stream, options.max_bytes)
            except FormatError as exc:
                failure = _zstd_failure(proc, err_r) if _at_end(data_r) else None
                if failure is None:
                    raise
                raise FormatError(f"cannot decompress the tarball: {failure}") from exc
        failure = _zstd_failure(proc, err_r)
        if failure is not None:
            raise FormatError(f"cannot decompress the tarball: {failure}")
        return extracted
    finally:
        command.stop(proc, grace=0, kill_wait=KILL_WAIT)
        os.close(err_r)


def _extract(options: argparse.Namespace) -> tarball.Extracted:
    os.umask(0o022)
    os.mkdir(TREE, tarball.ROOT_MODE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (options.max_bytes, options.max_bytes))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = EXTRACT_MEMORY if hard == resource.RLIM_INFINITY else min(EXTRACT_MEMORY, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        if options.zstd:
            return _extract_zstd(options)
        return _extract_from(sys.stdin.buffer, "r|*", options)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway.volumes.import_worker")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--max-members", type=int, default=tarball.MAX_MEMBERS)
    parser.add_argument("--label")
    parser.add_argument("--zstd", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = _parse(argv)
    for module in ("gzip", "bz2", "lzma", "zlib"):  # tarfile imports them lazily: do it now
        importlib.import_module(module)
    try:
        _enter_namespace(options.control)
        extracted = _extract(options)
        _send(extracted=extracted.data_bytes, members=extracted.members)
        mkfs.mkfs(Path(FS_FILE), "ext4", label=options.label, tree=Path(TREE))
        _send(done=True)
        return 0
    except GatewayError as exc:
        _send(error=exc.message, code=exc.code)
    except MemoryError:
        _send(error="cannot read the tarball: out of memory (a header too large?)",
              code=FormatError.code)
    except Exception as exc:
        _send(error=f"import worker: {type(exc).__name__}: {exc}", code="internal")
    return 1


if __name__ == "__main__":
    sys.exit(main())
