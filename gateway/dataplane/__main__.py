"""`python -m gateway.dataplane --run-dir RUN_DIR`: the data-plane process (started by gatewayd)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from gateway import log as gwlog
from gateway.daemon import heap
from gateway.dataplane.service import serve


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)
    parser = argparse.ArgumentParser(prog="python -m gateway.dataplane")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    gwlog.setup(ns.log_level)
    heap.retain_io_buffers()
    trio.run(serve, ns.run_dir.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
