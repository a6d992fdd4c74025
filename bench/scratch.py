"""A throw-away gatewayd for the stand-alone benchmarks (bench/cli_overhead.py,
bench/fio_table.py): a temporary work directory, a real gatewayd in it, and on the way out a full
stop (mounts, exports, the data plane and QSD) and the directory removed."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gateway.testing.daemon import Daemon


@contextlib.contextmanager
def gateway(prefix: str) -> Iterator[tuple[Daemon, Path]]:
    """(a started gatewayd, its work directory for images and mounts of the caller's own)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    daemon = Daemon(state_dir=work / "state", run_dir=work / "run",
                    log_path=work / "gatewayd.log", extra_args=["--log-level", "info"])
    try:
        daemon.start()
        yield daemon, work
    finally:
        leaked = daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        if leaked:
            raise RuntimeError(f"left behind by the benchmark's gatewayd: {leaked}")
