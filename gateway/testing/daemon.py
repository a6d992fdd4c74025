"""A real gatewayd process for integration tests, driven through the real gatewayctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class Daemon:
    state_dir: Path
    run_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    wrapper: list[str] = field(default_factory=list)  # e.g. prlimit ...; it must exec gatewayd

    @property
    def socket(self) -> Path:
        return self.run_dir / "admin.sock"

    def start(self, timeout: float = 30.0) -> None:
        argv = [*self.wrapper, str(BIN / "gatewayd"), "--state-dir", str(self.state_dir),
                "--run-dir", str(self.run_dir), "--log-level", "debug", *self.extra_args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env})
        log.close()
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
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
            check: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "gatewayctl"), "--socket", str(self.socket), *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"gatewayctl {' '.join(args)} failed: {proc.stderr}"
                                 f"\n--- gatewayd log ---\n{self.log_tail()}")
        return proc
