"""A real gatewayd process for integration tests, driven through the real gatewayctl."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway import command

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class CtlResult:
    """What one gatewayctl run printed, and how it exited."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Daemon:
    state_dir: Path
    run_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: command.Child | None = None
    wrapper: list[str] = field(default_factory=list)  # e.g. prlimit ...; it must exec gatewayd

    @property
    def socket(self) -> Path:
        return self.run_dir / "admin.sock"

    def start(self, timeout: float = 30.0) -> None:
        argv = [*self.wrapper, str(BIN / "gatewayd"), "--state-dir", str(self.state_dir),
                "--run-dir", str(self.run_dir), "--log-level", "debug", *self.extra_args]
        self.proc = command.spawn(argv, stderr_path=str(self.log_path), env=self.env,
                                  new_session=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gatewayd exited {self.proc.returncode}: {self.log_tail()}")
            if self.ctl("status").returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gatewayd not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0, *,
             everything: bool = True) -> int:
        """Stop gatewayd. With SIGTERM and `everything` (the default) it is a full stop, as
        `gatewayctl shutdown --all --force` does: mounts, exports, the data plane and QSD go
        too. Without `everything`, or with another signal, only gatewayd goes: the data plane,
        QSD and every mount stay for the next gatewayd to adopt."""
        if self.proc is None:
            return 0
        if everything and sig == signal.SIGTERM and self.proc.poll() is None:
            self.ctl("--wait", "0", "shutdown", "--all", "--force", timeout=timeout)
            if command.wait(self.proc, timeout) is not None:
                code = self.proc.wait()
                self.proc = None
                return code
        command.stop(self.proc, grace=timeout, kill_wait=timeout, term=signal.Signals(sig))
        code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def leftovers(self) -> list[str]:
        """Mounts under the run dir, loop devices on its files, processes started for it."""
        from gateway.host import loopdev, mounts
        found = [f"mount {m.mount_point}" for m in mounts.mounts_under(self.run_dir)]
        found += [f"loop {d}" for d in loopdev.devices_backed_by(self.run_dir)]
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if str(self.run_dir).encode() in cmdline and b"gatewayctl" not in cmdline:
                shown = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
                found.append(f"process {pid_dir.name}: {shown}")
        return found

    def standby_loops(self) -> dict[str, str]:
        """Volume -> the loop device its idle export keeps for the next mount (not a leak)."""
        proc = self.ctl("volume", "ls", "--json")
        if proc.returncode != 0:
            return {}
        return {v["name"]: v["standby_loop"] for v in json.loads(proc.stdout)
                if v.get("standby_loop")}

    def cleanup(self) -> list[str]:
        """Stop the daemon, release the shared rootfs root it prepared; return what leaked."""
        from gateway.attach.attachment import release_rootfs_root
        self.stop()
        leaked = [item for item in self.leftovers() if not item.endswith(
            f"mount {self.run_dir / 'rootfs'}")]
        if not leaked:
            release_rootfs_root(self.run_dir)
        return leaked

    def ctl(self, *args: str, timeout: float = 120.0, user: str | None = None,
            check: bool = False, cwd: str | Path | None = None) -> CtlResult:
        """Run gatewayctl (as `user`, in the working directory `cwd`, when given)."""
        argv = [str(BIN / "gatewayctl"), "--socket", str(self.socket), *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        if cwd is not None:
            argv = ["env", f"--chdir={cwd}", *argv]  # coreutils env: chdir, then exec
        done = command.run(argv, timeout=timeout, check=False)
        proc = CtlResult(argv, done.returncode, done.text,
                         done.stderr.decode("utf-8", "replace"))
        if check and proc.returncode != 0:
            raise AssertionError(f"gatewayctl {' '.join(args)} failed: {proc.stderr}"
                                 f"\n--- gatewayd log ---\n{self.log_tail()}")
        return proc
