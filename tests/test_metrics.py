"""`gatewayctl metrics`: Prometheus text with mount phase histograms, counts, errors, reconcile."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.daemon import Daemon
from gateway.testing.images import ImageSet, copy_image

pytestmark = pytest.mark.timeout(180)
BIND_PHASES = ("export", "probe", "window", "loop", "mount", "bind")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(daemon: Daemon) -> Samples:
    proc = daemon.ctl("metrics", check=True)
    out: Samples = {}
    for family in text_string_to_metric_families(proc.stdout):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_mount_failure_and_reconcile(tmp_path: Path, image_set: ImageSet) -> None:
    daemon = Daemon(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    log_path=tmp_path / "log", extra_args=["--libvirt-uri", ""])
    image = copy_image(image_set.path("gpt", "qcow2"), tmp_path / "m.qcow2")
    fuse_image = copy_image(image_set.path("none", "raw"), tmp_path / "f.raw")
    daemon.start()
    try:
        empty = scrape(daemon)
        assert value(empty, "gateway_volumes") == 0
        assert value(empty, "gateway_mounts") == 0

        daemon.ctl("volume", "add", "m", str(image), "--format", "qcow2", check=True)
        daemon.ctl("volume", "add", "f", str(fuse_image), "--format", "raw", check=True)
        daemon.ctl("mount", "m", check=True)
        daemon.ctl("mount", "f", "--mode", "fuse", check=True)
        s = scrape(daemon)
        assert value(s, "gateway_volumes") == 2
        assert value(s, "gateway_exports") == 2
        assert value(s, "gateway_mounts") == 2
        for phase in BIND_PHASES:
            count = value(s, "gateway_mount_phase_seconds_count", phase=phase)
            total = value(s, "gateway_mount_phase_seconds_sum", phase=phase)
            expected = 2 if phase in ("export", "probe", "window") else 1
            assert count == expected, (phase, count)
            assert 0 <= total < 60, (phase, total)
            assert value(s, "gateway_mount_phase_seconds_bucket", phase=phase, le="+Inf") == count
        assert value(s, "gateway_mount_phase_seconds_count", phase="fuse2fs") == 1
        assert value(s, "gateway_requests_total", op="mount") == 2
        assert value(s, "gateway_qsd_restarts") == 0
        assert value(s, "gateway_reconcile_leftovers_found_total") == 0

        # Failed requests are counted by error code.
        assert daemon.ctl("volume", "show", "nope").returncode == 1
        assert daemon.ctl("mount", "nope").returncode == 1
        assert daemon.ctl("volume", "add", "x", str(tmp_path), "--format", "raw").returncode == 1
        s = scrape(daemon)
        assert value(s, "gateway_errors_total", code="not-found") == 2
        assert value(s, "gateway_errors_total", code="invalid-argument") == 1
        assert value(s, "gateway_requests_total", op="volume-show") == 1

        # kill -9 with both mounts up: the data plane kept them, the next gatewayd adopts both
        # and says so; a mount broken while it was away is found and cleaned.
        daemon.stop(signal.SIGKILL)
        daemon.start()
        s = scrape(daemon)
        report = json.loads(daemon.ctl("status", "--json", check=True).stdout)["reconcile"]
        assert report["adopted"] == ["f", "m"], json.dumps(report, indent=1)
        assert value(s, "gateway_reconcile_leftovers_found_total") == 0
        assert value(s, "gateway_mounts") == 2
        assert value(s, "gateway_volumes") == 2
        assert value(s, "gateway_exports") == 2
        assert value(s, "gateway_errors_total", code="not-found") == 0  # counters start afresh
        daemon.stop(signal.SIGKILL)
        subprocess.run(["umount", str(daemon.run_dir / "rootfs" / "m")], check=True)
        daemon.start()
        s = scrape(daemon)
        found = value(s, "gateway_reconcile_leftovers_found_total")
        cleaned = value(s, "gateway_reconcile_leftovers_cleaned_total")
        assert found >= 1 and cleaned == found  # m's kernel mount (its loop goes with it)
        assert value(s, "gateway_mounts") == 1
        for name in ("f", "m"):
            daemon.ctl("umount", name, check=True)
            daemon.ctl("unexport", name, check=True)
        live = [m for m in daemon.leftovers() if "/rootfs/" in m or "/mnt/" in m]
        assert live == []
    finally:
        daemon.stop()
        assert daemon.cleanup() == []
