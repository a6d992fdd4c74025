"""Issue 17, pure cores: id slices, the ranges they come from, the search ACL, the journalled
map, the catalog's slice rows and the domain XML of a user-namespace domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.attach import journal
from gateway.attach.journal import IdmapStep, Phase
from gateway.attach.states import AttachmentState
from gateway.catalog import Catalog, Volume
from gateway.errors import Conflict, InvalidArgument
from gateway.host import acl
from gateway.libvirt import domain
from gateway.userns import ranges, slices
from gateway.userns.slices import SLICE_SIZE, IdMap, IdRange

START = 1_000_000


@pytest.mark.timeout(10)
def test_parse_range() -> None:
    assert slices.parse_range(f"{START}:{3 * SLICE_SIZE}") == IdRange(START, START,
                                                                       3 * SLICE_SIZE)
    for bad in ("", "100000", "0:65536", "100000:100", "a:b", "100000:-65536",
                f"{2**32 - 10}:65536"):
        with pytest.raises(InvalidArgument, match="START:COUNT"):
            slices.parse_range(bad)


@pytest.mark.timeout(10)
def test_allocate_takes_the_lowest_free_slot_and_never_overlaps() -> None:
    rng = IdRange(START, START + 7, 3 * SLICE_SIZE)
    first = slices.allocate(rng, [])
    assert first == IdMap(START, START + 7)
    second = slices.allocate(rng, [first])
    assert second == IdMap(START + SLICE_SIZE, START + 7 + SLICE_SIZE)
    # a live map from another configuration that overlaps slot 0 partly
    odd = IdMap(START + 100, START + 100, 100)
    assert slices.allocate(rng, [odd]) == second
    # a host uid inside slot 0 and gids reserved over slot 1
    assert slices.allocate(rng, [], reserved_uids=[(START + 5, START + 6)],
                           reserved_gids=[(START + 7 + SLICE_SIZE, START + 8 + SLICE_SIZE)]
                           ) == IdMap(START + 2 * SLICE_SIZE, START + 7 + 2 * SLICE_SIZE)
    third = slices.allocate(rng, [first, second])
    with pytest.raises(Conflict, match="no free id slice left"):
        slices.allocate(rng, [first, second, third])


@pytest.mark.timeout(10)
def test_check_requested() -> None:
    rng = IdRange(START, START, 2 * SLICE_SIZE)
    ids = IdMap(START + SLICE_SIZE, START + SLICE_SIZE)
    assert slices.check_requested(rng, ids, []) == ids
    with pytest.raises(InvalidArgument, match="lies outside"):
        slices.check_requested(rng, IdMap(START + 2 * SLICE_SIZE, START), [])
    with pytest.raises(InvalidArgument, match="65536 ids"):
        slices.check_requested(rng, IdMap(START, START, 1000), [])
    with pytest.raises(Conflict, match="overlaps the live slice"):
        slices.check_requested(rng, ids, [IdMap(START + SLICE_SIZE + 1, START)])
    with pytest.raises(Conflict, match="host uids"):
        slices.check_requested(rng, ids, [],
                               reserved_uids=[(START + SLICE_SIZE, START + 2 * SLICE_SIZE)])


@pytest.mark.timeout(10)
def test_idmap_lines_and_limits() -> None:
    ids = IdMap(START, START + 1)
    assert (ids.uid_map(), ids.gid_map()) == (f"0 {START} 65536\n", f"0 {START + 1} 65536\n")
    for bad in ((0, START), (START, 2**32 - 100)):
        with pytest.raises(InvalidArgument):
            IdMap(*bad)


@pytest.mark.timeout(10)
def test_ranges_from_subordinate_files(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text(f"# c\nalice:100000:65536\nstorage-gateway:{START}:{4 * SLICE_SIZE}\nbad\n")
    subgid.write_text(f"storage-gateway:{START + 5}:{2 * SLICE_SIZE}\nalice:100000:65536\n")
    source = ranges.load(None, subuid=subuid, subgid=subgid)
    assert source.id_range.uid_start == START and source.id_range.gid_start == START + 5
    assert source.id_range.count == 2 * SLICE_SIZE  # the shorter of the two
    assert (100000, 165536) in source.reserved.uids  # alice's range is not ours
    assert (START, START + 4 * SLICE_SIZE) not in source.reserved.uids
    assert (0, 1) in source.reserved.uids and (0, 1) in source.reserved.gids  # root
    configured = IdRange(2 * START, 2 * START, SLICE_SIZE)
    assert ranges.load(configured, subuid=subuid, subgid=subgid).id_range == configured
    subgid.write_text("")
    with pytest.raises(InvalidArgument, match="--userns-range START:COUNT"):
        ranges.load(None, subuid=subuid, subgid=subgid)


@pytest.mark.timeout(10)
def test_search_acl_entries() -> None:
    base = acl.from_mode(0o700)
    added = acl.with_user(base, 4242, acl.SEARCH)
    assert (acl.USER, acl.SEARCH, 4242) in added
    assert (acl.MASK, acl.SEARCH, acl.UNDEFINED) in added
    assert acl.decode(acl.encode(added)) == sorted(added, key=lambda e: (e[0], e[2]))
    assert sorted(acl.with_user(added, 4242, None)) == sorted(base)  # no mask left either
    with pytest.raises(acl.AclError):
        acl.decode(b"\x01\x00")


@pytest.mark.timeout(10)
def test_idmap_journal_entry_round_trip() -> None:
    start = IdmapStep(Phase.START, START, START + 1, SLICE_SIZE, source="/r/mnt/v",
                      target="/r/rootfs/v")
    step, detail = journal.encode(start)
    assert step == "idmap"
    assert journal.decode(step, detail) == start
    done = IdmapStep(Phase.DONE, target="/r/rootfs/v")
    assert journal.idmap_of([journal.ExportStep(True), start, done]) == (START, START + 1,
                                                                        SLICE_SIZE)
    assert journal.idmap_of([journal.ExportStep(True)]) is None


@pytest.mark.timeout(10)
def test_catalog_slices_live_and_go_with_their_attachment(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    rng = IdRange(START, START, 2 * SLICE_SIZE)
    for name in ("a", "b", "c"):
        catalog.add_volume(Volume(name, f"/images/{name}", "raw", 1 << 20))
        catalog.begin_attachment(name, "bind", f"/run/rootfs/{name}",
                                 state=AttachmentState.ATTACHING)

    def pick(taken: list[IdMap]) -> IdMap:
        return slices.allocate(rng, taken)

    a = catalog.claim_slice("a", pick, "dom-a")
    b = catalog.claim_slice("b", pick)
    assert (a.uid_first, b.uid_first) == (START, START + SLICE_SIZE)
    with pytest.raises(Conflict):
        catalog.claim_slice("c", pick)
    assert catalog.userns_slice("c") is None  # the failed claim wrote nothing
    assert catalog.userns_slices() == {"a": (a, "dom-a"), "b": (b, None)}
    catalog.end_attachment("a")  # the slice goes with the attachment row
    assert catalog.userns_slice("a") is None
    assert catalog.claim_slice("c", pick) == a
    catalog.begin_attachment("b", "bind", "/run/rootfs/b")  # a new attachment, no slice yet
    assert catalog.userns_slice("b") is None
    catalog.close()


@pytest.mark.timeout(10)
def test_domain_xml_of_a_userns_domain() -> None:
    ids = IdMap(START, START + 1)
    xml = domain.domain_xml("d1", "/run/rootfs/v", "v", "bind", ids=ids)
    assert "<privnet />" in xml and 'userns="yes"' in xml
    assert f'<uid start="0" target="{START}" count="65536" />' in xml
    assert domain.idmap_from_xml(xml) == ids
    assert domain.attachment_from_xml(xml) == ("v", "bind")
    plain = domain.domain_xml("d1", "/run/rootfs/v", "v", "bind")
    assert domain.idmap_from_xml(plain) is None and "privnet" not in plain
    assert domain.idmap_from_xml("<domain><idmap><uid start='1' target='5' count='3'/>"
                                 "<gid start='0' target='5' count='3'/></idmap></domain>") is None
