"""The export and attachment state tables and the typed attachment journal, without I/O."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from gateway.attach import journal
from gateway.attach import states as attach_states
from gateway.attach.journal import (
    BindStep,
    ExportStep,
    FsckStep,
    Fuse2fsStep,
    HostViewReleased,
    IdmapStep,
    IdshiftStep,
    LoopStep,
    MountStep,
    Phase,
    Unknown,
)
from gateway.attach.states import AttachmentEvent, AttachmentState
from gateway.catalog import AttachmentRecord
from gateway.errors import InternalError
from gateway.export import manager as export_manager
from gateway.export import states as export_states
from gateway.export.states import ExportEvent, ExportState

pytestmark = pytest.mark.timeout(30)


def reachable(start: Any, table: Iterable[tuple[Any, Any]], target: Any) -> set[Any]:
    """States reachable from `start`, following (state, event) -> target(entry)."""
    pairs = list(table)
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (src, _), entry in pairs:
            dst = target(entry)
            if src == state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


# ---- the export lifecycle ---------------------------------------------------------------------

EXPORT_PAIRS = list(itertools.product(ExportState, ExportEvent))
EXPORT_UNDEFINED = {(s, e) for s, e in EXPORT_PAIRS if (s, e) not in export_states.TRANSITIONS}


@pytest.mark.parametrize(("state", "event"), sorted(export_states.TRANSITIONS))
def test_every_export_transition(state: ExportState, event: ExportEvent) -> None:
    step = export_states.transition(state, event)
    assert step is export_states.TRANSITIONS[(state, event)]
    assert isinstance(step.state, ExportState)
    for action in (*step.before, *step.after):
        assert action in export_states.ACTIONS, action


@pytest.mark.parametrize(("state", "event"), sorted(EXPORT_UNDEFINED))
def test_every_undefined_export_transition_raises(state: ExportState,
                                                  event: ExportEvent) -> None:
    with pytest.raises(export_states.UndefinedTransition) as info:
        export_states.transition(state, event)
    assert isinstance(info.value, InternalError) and info.value.code == "internal"
    assert "\n" not in str(info.value) and event.value in str(info.value)


def test_only_timer_and_qsd_events_are_undefined_outside_idle() -> None:
    assert EXPORT_UNDEFINED == {(s, e) for s in (ExportState.ABSENT, ExportState.SERVING)
                                for e in (ExportEvent.EXPIRE, ExportEvent.QSD_RESTART)}


def test_export_table_is_consistent() -> None:
    table = export_states.TRANSITIONS
    states = reachable(ExportState.ABSENT, table.items(), lambda t: t.state)
    assert states == set(ExportState)
    for state in ExportState:  # every export can be closed
        assert ExportState.ABSENT in reachable(state, table.items(), lambda t: t.state)
        assert table[(state, ExportEvent.CLOSE)].state is ExportState.ABSENT
    assert {e for _, e in table} == set(ExportEvent)
    used = {a for t in table.values() for a in (*t.before, *t.after)}
    assert used == set(export_states.ACTIONS)
    # every action the table names has a runner, and nothing else does
    assert set(export_manager.ACTION_RUNNERS) == set(export_states.ACTIONS)


def test_export_transitions_keep_their_invariants() -> None:
    for (state, event), step in export_states.TRANSITIONS.items():
        actions = (*step.before, *step.after)
        # only an absent export connects, and a connected one leaves through unview + hang-up
        assert ("connect" in actions) == (state is ExportState.ABSENT
                                          and step.state is ExportState.SERVING)
        if state is not ExportState.ABSENT and step.state is ExportState.ABSENT:
            assert "unview" in step.before and "hang-up" in step.after
            assert "unexport" in step.after
        # refusable steps come before the state changes, cleanup after it
        assert not {"connect", "unview", "want", "hand-standby"} & set(step.after)
        assert not {"hang-up", "unexport", "expire-later"} & set(step.before)
        # a standby handed in by a release is kept (idle) or closed first; nobody else has one
        if event in (ExportEvent.RELEASE, ExportEvent.RELEASE_NOW):
            assert step.state is ExportState.IDLE or step.before[:1] == ("close-given",)
        else:
            assert "close-given" not in actions
        # an idle period's standby never outlives it unless a claim takes it
        if state is ExportState.IDLE:
            assert {"close-standby", "drop-standby", "hand-standby"} & set(actions)
        # the catalog wants exactly the serving ones
        if step.state is ExportState.SERVING and state is not ExportState.SERVING:
            assert {"connect", "want"} & set(actions)
        if step.state is ExportState.IDLE:
            assert "forget" in step.after and "expire-later" in step.after
        if step.state is ExportState.ABSENT and event is not ExportEvent.SHUTDOWN and actions:
            assert "forget" in step.after
        if event is ExportEvent.SHUTDOWN:
            assert "forget" not in actions  # a restart brings desired exports back


def test_verbs_as_the_export_manager_sees_them() -> None:
    t = export_states.transition
    S, E = ExportState, ExportEvent
    assert t(S.IDLE, E.CLAIM) == (S.SERVING, ("want", "hand-standby"), ())
    assert t(S.IDLE, E.OPEN) == (S.SERVING, ("want",), ("drop-standby",))
    assert t(S.SERVING, E.RELEASE) == (S.IDLE, ("flush",), ("forget", "expire-later"))
    assert t(S.SERVING, E.RETIRE) == (S.SERVING, (), ())
    assert t(S.IDLE, E.RETIRE).state is S.ABSENT
    assert t(S.ABSENT, E.CLOSE) == (S.ABSENT, (), ("forget", "unexport"))
    assert t(S.SERVING, E.SHUTDOWN).after == ("flush", "hang-up", "unexport")


# ---- the attachment lifecycle -----------------------------------------------------------------

ATTACH_PAIRS = list(itertools.product(AttachmentState, AttachmentEvent))
ATTACH_UNDEFINED = [(s, e) for s, e in ATTACH_PAIRS if (s, e) not in attach_states.TRANSITIONS]
STORED = [s for s in AttachmentState if s is not AttachmentState.ABSENT]


@pytest.mark.parametrize(("state", "event"), sorted(attach_states.TRANSITIONS))
def test_every_attachment_transition(state: AttachmentState, event: AttachmentEvent) -> None:
    assert attach_states.transition(state, event) is attach_states.TRANSITIONS[(state, event)]


@pytest.mark.parametrize(("state", "event"), sorted(ATTACH_UNDEFINED))
def test_every_undefined_attachment_transition_raises(state: AttachmentState,
                                                      event: AttachmentEvent) -> None:
    with pytest.raises(attach_states.UndefinedTransition) as info:
        attach_states.transition(state, event)
    assert isinstance(info.value, InternalError) and info.value.code == "internal"
    assert "\n" not in str(info.value)


def test_attachment_table_is_consistent() -> None:
    table = attach_states.TRANSITIONS
    assert reachable(AttachmentState.ABSENT, table.items(), lambda s: s) == set(AttachmentState)
    for state in STORED:
        assert AttachmentState.ABSENT in reachable(state, table.items(), lambda s: s)
        # whatever a gatewayd finds at start goes
        assert table[(state, AttachmentEvent.RESTART)] is AttachmentState.ABSENT
    assert {e for _, e in table} == set(AttachmentEvent)
    # a record starts only with BEGIN, and only a mount under way can be aborted
    assert [k for k in table if k[0] is AttachmentState.ABSENT] == [
        (AttachmentState.ABSENT, AttachmentEvent.BEGIN)]
    assert [k for k in table if k[1] is AttachmentEvent.ABORT] == [
        (AttachmentState.ATTACHING, AttachmentEvent.ABORT)]
    # the roadmap states exist in the table before anything enters them
    assert (AttachmentState.ADOPTING, AttachmentEvent.VERIFIED) in table


def test_attachment_lifecycles() -> None:
    S, E = AttachmentState, AttachmentEvent

    def run(*events: AttachmentEvent) -> AttachmentState:
        state = S.ABSENT
        for event in events:
            state = attach_states.transition(state, event)
        return state

    assert run(E.BEGIN, E.ATTACHED) is S.MOUNTED
    assert run(E.BEGIN, E.ABORT) is S.ABSENT
    assert run(E.BEGIN, E.ATTACHED, E.DETACH, E.DETACHED) is S.ABSENT
    assert run(E.BEGIN, E.ATTACHED, E.DETACH, E.DETACH_FAILED) is S.MOUNTED  # still stands
    assert run(E.BEGIN, E.ATTACHED, E.DETACH, E.CLEANUP_FAILED) is S.FAILED
    assert run(E.BEGIN, E.ATTACHED, E.LOST, E.DETACH, E.DETACH_FAILED) is S.FAILED
    assert run(E.BEGIN, E.ATTACHED, E.LOST, E.DETACH, E.DETACHED) is S.ABSENT
    assert run(E.BEGIN, E.ATTACHED, E.ADOPT, E.VERIFIED, E.DETACH, E.DETACHED) is S.ABSENT


def test_stored_states_keep_the_strings_catalogs_hold() -> None:
    assert [s.value for s in (AttachmentState.ATTACHING, AttachmentState.MOUNTED,
                              AttachmentState.FAILED)] == ["attaching", "mounted", "failed"]
    for state in STORED:
        assert attach_states.stored(state.value) is state
    # never stored, or written by a newer gatewayd: nothing is trusted, it is torn down
    assert attach_states.stored("absent") is AttachmentState.FAILED
    assert attach_states.stored("hibernating") is AttachmentState.FAILED


# ---- the journal ------------------------------------------------------------------------------

W, M, R = "/run/sg/blk/v/rootfs", "/run/sg/mnt/v", "/run/sg/rootfs/v"
# Exactly what the previous version wrote (gateway/attach/attachment.py and manager.py).
LEGACY: list[tuple[str, dict[str, Any]]] = [
    ("export", {"auto": True}),
    ("export", {"auto": False}),
    ("loop", {"phase": "start", "file": W, "read_only": False}),
    ("loop", {"phase": "start", "file": W, "read_only": True, "standby": "/dev/loop7"}),
    ("loop", {"phase": "done", "file": W, "device": "/dev/loop7"}),
    ("loop", {"phase": "done", "file": W, "device": "/dev/loop7", "cache": False}),
    ("mount", {"phase": "start", "device": "/dev/loop7", "target": M, "fstype": "ext4",
               "flags": 6, "data": "errors=remount-ro"}),
    ("mount", {"phase": "start", "device": "/dev/loop7", "target": M, "fstype": "xfs",
               "flags": 4, "data": None}),
    ("mount", {"phase": "done", "device": "/dev/loop7", "target": M}),
    ("bind", {"phase": "start", "source": M, "target": R}),
    ("bind", {"phase": "done", "target": R}),
    ("fsck", {"phase": "start", "image": W}),
    ("fsck", {"phase": "done", "exit": 1}),
    ("fuse2fs", {"phase": "start", "image": W, "target": R}),
    ("fuse2fs", {"phase": "done", "pid": 4242, "target": R}),
    ("host-view-released", {"paths": [R, M], "released": [True, False]}),
]
RECORDS: list[journal.Entry] = [
    ExportStep(True), ExportStep(False),
    LoopStep(Phase.START, file=W, read_only=False),
    LoopStep(Phase.START, file=W, read_only=True, standby="/dev/loop7"),
    LoopStep(Phase.DONE, file=W, device="/dev/loop7"),
    LoopStep(Phase.DONE, file=W, device="/dev/loop7", cache=False),
    MountStep(Phase.START, "/dev/loop7", M, "ext4", 6, "errors=remount-ro"),
    MountStep(Phase.START, "/dev/loop7", M, "xfs", 4, None),
    MountStep(Phase.DONE, "/dev/loop7", M),
    BindStep(Phase.START, target=R, source=M),
    BindStep(Phase.DONE, target=R),
    FsckStep(Phase.START, image=W),
    FsckStep(Phase.DONE, exit=1),
    Fuse2fsStep(Phase.START, target=R, image=W),
    Fuse2fsStep(Phase.DONE, pid=4242, target=R),
    HostViewReleased((R, M), (True, False)),
]


@pytest.mark.parametrize("index", range(len(LEGACY)))
def test_legacy_entries_decode_and_encode_unchanged(index: int) -> None:
    step, detail = LEGACY[index]
    entry = journal.decode(step, detail)
    assert entry == RECORDS[index]
    assert journal.encode(entry) == (step, detail)
    assert list(journal.encode(entry)[1]) == list(detail)  # the same key order, too


# Kinds newer than LEGACY (user-namespace attachments: bind mode's idmapped mount, fuse mode's
# id-shifting layer).
NEWER: list[journal.Entry] = [
    IdmapStep(Phase.START, 2000000000, 2000000000, 65536, source=M, target=R),
    IdmapStep(Phase.DONE, target=R),
    IdshiftStep(Phase.START, 2000065536, 2000065536, 65536, source=M, target=R),
    IdshiftStep(Phase.DONE, target=R, pid=4343),
]


def test_every_kind_round_trips() -> None:
    kinds = {type(e) for e in [*RECORDS, *NEWER]}
    assert kinds == set(journal.KINDS.values())
    for entry in [*RECORDS, *NEWER,
                  Unknown("kernel-nbd", {"device": "/dev/nbd0", "phase": "start"})]:
        assert journal.decode(*journal.encode(entry)) == entry


def test_unknown_and_malformed_entries_never_crash() -> None:
    odd = journal.decode("kernel-nbd", {"phase": "start", "device": "/dev/nbd0"})
    assert odd == Unknown("kernel-nbd", {"phase": "start", "device": "/dev/nbd0"})
    assert journal.encode(odd) == ("kernel-nbd", {"phase": "start", "device": "/dev/nbd0"})
    assert journal.phase_of(odd) is None
    assert journal.decode("loop", {"device": 5, "phase": "sideways"}) == LoopStep(None)
    assert journal.decode("fuse2fs", {"pid": True}) == Fuse2fsStep(None)
    assert journal.decode("fuse2fs", {"pid": "12"}) == Fuse2fsStep(None)
    assert journal.decode("mount", {"flags": 1.5}) == MountStep(None)
    assert journal.decode("host-view-released", {"released": True}) == HostViewReleased(
        (), (True,))
    assert journal.decode("loop", ["not", "an", "object"]) == Unknown("loop", {})  # type: ignore[arg-type]
    assert journal.decode("export", {}) == ExportStep(False)
    # a catalog test's entry without a phase
    assert journal.decode("loop", {"device": "/dev/loop3"}) == LoopStep(None, device="/dev/loop3")


# The readers the typed helpers replace, as the previous version wrote them.
def old_journal_facts(entries: Iterable[tuple[str, Mapping[str, object]]]
                      ) -> tuple[set[str], set[int]]:
    loops: set[str] = set()
    pids: set[int] = set()
    for step, detail in entries:
        if step in ("loop", "mount") and isinstance(detail.get("device"), str):
            loops.add(str(detail["device"]))
        elif step == "fuse2fs":
            pid = detail.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1:
                pids.add(pid)
    return {d for d in loops if os.path.basename(d).startswith("loop")}, pids


def old_made_own_export(entries: Iterable[tuple[str, Mapping[str, object]]]) -> bool:
    return any(step == "export" and detail.get("auto") for step, detail in entries)


def old_released(entries: Iterable[tuple[str, Mapping[str, object]]]) -> bool:
    released = False
    for step, detail in entries:
        if step == "host-view-released":
            flag = detail.get("released")
            released = any(flag) if isinstance(flag, list) else bool(flag)
    return released


JOURNALS: list[list[tuple[str, dict[str, Any]]]] = [
    [],
    LEGACY,
    LEGACY[:1],
    [LEGACY[1], ("loop", {"phase": "done", "device": "/dev/loop12"}),
     ("mount", {"phase": "start", "device": "/dev/nbd0"}), ("fuse2fs", {"pid": 1}),
     ("fuse2fs", {"pid": False}), ("fuse2fs", {"phase": "done", "pid": 77})],
    [("host-view-released", {"paths": [R], "released": [True]}),
     ("host-view-released", {"paths": [R], "released": [False, False]})],
    [("host-view-released", {"released": True}), ("kernel-nbd", {"device": "/dev/loop9"})],
    [("export", {"auto": 1}), ("mount", {"phase": "done", "device": "/dev/loop3"})],
]


@pytest.mark.parametrize("index", range(len(JOURNALS)))
def test_helpers_read_what_the_old_readers_read(index: int) -> None:
    raw = JOURNALS[index]
    entries = journal.decode_all(raw)
    loops, pids = old_journal_facts(raw)
    assert journal.loop_devices(entries) == loops
    assert journal.fuse2fs_pids(entries) == pids
    assert journal.made_own_export(entries) == old_made_own_export(raw)
    assert journal.host_view_released(entries) == old_released(raw)
    assert journal.started_fuse2fs(entries) == any(step == "fuse2fs" for step, _ in raw)


def test_a_record_from_an_older_catalog_reads_typed() -> None:
    record = AttachmentRecord(volume="v", mode="bind", state=attach_states.stored("mounted"),
                              rootfs=R, window_start=0, window_size=1, created="then",
                              steps=tuple(LEGACY))
    assert record.state is AttachmentState.MOUNTED
    assert record.to_json()["state"] == "mounted"
    assert record.entries == RECORDS
    assert journal.decode_all([*RECORDS[:2], LEGACY[2]]) == RECORDS[:3]
