"""CI smoke of the mount-latency benchmark: one iteration of a few paths, results in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts: needs root")


@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.mount_latency", "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "latest.json").read_text())
    assert results["smoke"] is True
    assert not results.get("leaks"), results.get("leaks")
    for key in ("date", "kernel", "cpus", "qemu", "git_rev"):
        assert results["host"][key], key
    paths = results["latency"]["paths"]
    assert {"gateway bind qcow2 (api)", "gateway bind qcow2 (cli)", "floor"} <= set(paths)
    for d in paths.values():
        assert len(d["cold"]) == 1 and len(d["warm"]) == 1
        assert all(0 < v < 60 for v in d["cold"] + d["warm"])
    assert results["concurrency"]["wall"]
    assert all(t["status"] in ("met", "missed", "skipped") for t in results["targets"])
    assert (out / "latest.md").read_text().startswith("Mount latency")
    fio = results["fio"]  # fio is in APT_PACKAGES
    assert [(r["workload"], r["depth"]) for r in fio["rows"]] == [
        ("4K random read", 32), ("1 MiB sequential write", 32)]
    assert all(r["block view"] > 0 and r["nbdfuse"] > 0 for r in fio["rows"])
    cli = results["cli_overhead"]["commands"]
    assert set(cli) == {"status", "volume show", "mount (warm, bind)"}
    assert all(len(d["cli"]) == 3 and len(d["api"]) == 3 for d in cli.values())
    names = {t["name"] for t in results["targets"]}
    assert "gatewayctl overhead p50 <= 15 ms (status)" in names
    assert "block view 4K random read qd32 >= 0.9x nbdfuse" in names
    assert "gatewayctl overhead" in (out / "latest.md").read_text()
