"""The fuse-mode id shift's pure core, and its journal record (no I/O)."""

from __future__ import annotations

import errno

import pytest

from gateway.attach import journal
from gateway.attach.journal import IdshiftStep, Phase
from gateway.idshift.shift import OVERFLOW_ID, Shift, Unmapped

SHIFT = Shift(2_000_000_000, 2_100_000_000, 65536)


@pytest.mark.timeout(5)
def test_disk_ids_show_in_the_slice_and_come_back() -> None:
    assert (SHIFT.host_uid(0), SHIFT.host_gid(0)) == (2_000_000_000, 2_100_000_000)
    assert SHIFT.host_uid(65535) == 2_000_065_535
    assert SHIFT.host_uid(65536) == OVERFLOW_ID  # beyond the slice: nobody
    assert SHIFT.host_gid(4_000_000) == OVERFLOW_ID
    for disk in (0, 1000, 65535):
        assert SHIFT.owner_uid(SHIFT.host_uid(disk)) == disk
        assert SHIFT.chown_gid(SHIFT.host_gid(disk)) == disk


@pytest.mark.timeout(5)
def test_host_ids_outside_the_slice_have_no_disk_id() -> None:
    with pytest.raises(Unmapped) as made:
        SHIFT.owner_uid(0)  # host root creating through the layer
    assert made.value.errno == errno.EOVERFLOW
    with pytest.raises(Unmapped) as given:
        SHIFT.chown_gid(2_100_065_536)
    assert given.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        Shift(0, 1, 65536)


@pytest.mark.timeout(5)
def test_idshift_journal_entries_round_trip() -> None:
    start = IdshiftStep(Phase.START, 5, 6, 65536, source="/r/mnt/v", target="/r/rootfs/v")
    done = IdshiftStep(Phase.DONE, target="/r/rootfs/v", pid=4321)
    entries = journal.decode_all([journal.encode(start), journal.encode(done)])
    assert entries == [start, done]
    assert journal.idmap_of(entries) == (5, 6, 65536)
    assert journal.idshift_pids(entries) == {4321}
    assert journal.shifted(entries) and not journal.shifted([])
