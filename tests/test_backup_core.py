"""The backup job's QMP commands, as pure data: explicit drivers, no backing, sane ids."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidArgument
from gateway.nbd.backup import (
    COPY_WORKERS,
    HELD_SPEED,
    BackupTarget,
    backup_args,
    cancel_args,
    job_progress,
    release_args,
    target_commands,
)
from gateway.nbd.nodes import NODE_NAME

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_target_nodes_name_their_driver_and_never_a_backing_file(fmt: str) -> None:
    target = BackupTarget(job_id="snap-1-web", path="/proc/7/fd/9", fmt=fmt)  # type: ignore[arg-type]
    (add_file, file_args), (add_fmt, fmt_args) = target_commands(target)
    assert add_file == add_fmt == "blockdev-add"
    assert file_args["driver"] == "file" and file_args["filename"] == "/proc/7/fd/9"
    assert fmt_args["driver"] == fmt and fmt_args["file"] == file_args["node-name"]
    assert fmt_args["auto-read-only"] is False and file_args["locking"] == "on"
    assert file_args["cache"] == {"direct": True}
    assert target_commands(target, direct=False)[0][1]["cache"] == {"direct": False}
    if fmt == "qcow2":
        assert "backing" in fmt_args and fmt_args["backing"] is None
    else:
        assert "backing" not in fmt_args
    assert all(NODE_NAME.fullmatch(n) for n in target.nodes)


def test_backup_is_full_from_the_live_node_into_the_target() -> None:
    target = BackupTarget(job_id="j1", path="/x", fmt="qcow2", compress=True)
    args = backup_args("gwf-0123", target)
    assert args == {"job-id": "j1", "device": "gwf-0123", "target": target.nodes[0],
                    "sync": "full", "compress": True, "auto-finalize": True,
                    "auto-dismiss": True, "x-perf": {"max-workers": COPY_WORKERS}}
    assert cancel_args("j1") == {"device": "j1", "force": True}


def test_rate_limit_and_a_held_start() -> None:
    limited = BackupTarget(job_id="j2", path="/x", fmt="raw", rate_limit=4 << 20)
    assert backup_args("n", limited)["speed"] == 4 << 20
    # held until the freeze is released, then the job's own speed (0: none)
    assert backup_args("n", limited, held=True)["speed"] == HELD_SPEED
    assert release_args(limited) == {"device": "j2", "speed": 4 << 20}
    free = BackupTarget(job_id="j3", path="/x", fmt="qcow2")
    assert "speed" not in backup_args("n", free)
    assert release_args(free) == {"device": "j3", "speed": 0}
    with pytest.raises(InvalidArgument, match="rate_limit"):
        BackupTarget(job_id="j4", path="/x", fmt="raw", rate_limit=0)


def test_only_qcow2_compresses() -> None:
    with pytest.raises(InvalidArgument, match="compressed"):
        BackupTarget(job_id="j", path="/x", fmt="raw", compress=True)
    with pytest.raises(InvalidArgument, match="format"):
        BackupTarget(job_id="j", path="/x", fmt="vmdk")  # type: ignore[arg-type]


def test_job_progress_from_query_jobs() -> None:
    jobs = [{"id": "other", "current-progress": 1, "total-progress": 2},
            {"id": "j", "current-progress": 25, "total-progress": 100, "status": "running"}]
    assert job_progress(jobs, "j") == 25.0
    assert job_progress(jobs, "gone") is None
    assert job_progress([{"id": "j", "total-progress": 0}], "j") == 0.0
    assert job_progress("garbage", "j") is None
