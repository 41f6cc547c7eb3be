"""The layer cut's generations (``remote_cache.archive.plan``, rule 7), on synthetic walks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_cache.archive.plan import FUTURE_SLACK, MAX_GENERATIONS, scan_tree, settle_bounds, split_members
from remote_cache.archive.tar import DIR, FILE, HARDLINK, Member

SMALL = {"min_bytes": 8 << 10, "max_bytes": 32 << 10}
OLD, NEW = 1_000_000, 2_000_000


def _walk(new: set[int] = frozenset(), dirs: int = 8, files: int = 12) -> list[Member]:
    """Directories d0..dN with files f0..fM of 1000 bytes, in walk order; file ``d*10+f`` in
    ``new`` has a later mtime."""
    members = []
    for d in range(dirs):
        members.append(Member(f"d{d}", DIR, 0o755, 0, 0, 0, OLD))
        for f in range(files):
            when = NEW if d * 100 + f in new else OLD
            members.append(Member(f"d{d}/f{f}", FILE, 0o644, 0, 0, 1000, when))
    return members


def _paths(layers: list) -> list[list[str]]:
    return [[m.path for m in layer.members] for layer in layers]


def test_one_generation_cuts_as_the_rule_always_did() -> None:
    members = _walk()
    bounds = settle_bounds(members)
    assert bounds == (OLD,)
    assert _paths(split_members(members, bounds=bounds, **SMALL)) == _paths(split_members(members, **SMALL))


def test_files_newer_than_the_bound_make_layers_of_their_own() -> None:
    old = _walk()
    new_ones = {d * 100 + 11 for d in range(8)}  # the last file of every directory, rewritten
    members = _walk(new_ones)
    bounds = settle_bounds(members, settle_bounds(old))
    assert bounds == (OLD, NEW)
    layers = split_members(members, bounds=bounds, **SMALL)
    paths = _paths(layers)
    assert all(p.count("/") == 0 for p in paths[0])  # the directories first
    newest = {f"d{d}/f11" for d in range(8)}
    first_new = next(i for i, layer in enumerate(paths) if newest & set(layer))
    assert all(not newest & set(layer) for layer in paths[:first_new])
    assert {p for layer in paths[first_new:] for p in layer} == newest
    flat = [p for layer in paths for p in layer]
    assert sorted(flat) == sorted(m.path for m in members) and len(flat) == len(set(flat))
    # The old generation's layers no longer hold those files; new ones cut from the others.
    assert sum(layer.tar_bytes for layer in layers) == sum(m.tar_size for m in members)


@pytest.mark.parametrize("link_mtime", [NEW, OLD], ids=["its-own", "older"])
def test_a_hard_link_stays_beside_its_file_in_a_later_generation(link_mtime: int) -> None:
    # Whatever the link's own mtime: its target's places it (tar needs the target first).
    members = _walk()
    members.insert(1 + 12, Member("d0/new", FILE, 0o644, 0, 0, 1000, NEW))
    members.insert(2 + 12, Member("d0/new-link", HARDLINK, 0o644, 0, 0, 0, link_mtime, "d0/new"))
    layers = _paths(split_members(members, bounds=(OLD, NEW), **SMALL))
    assert layers[-1] == ["d0/new", "d0/new-link"]


def test_a_tree_smaller_than_a_layer_is_one_layer_whatever_the_bounds() -> None:
    members = _walk({0, 101}, dirs=2, files=2)
    assert len(split_members(members, bounds=(OLD, NEW), **SMALL)) == 1


def test_settling_twice_changes_nothing() -> None:
    members = _walk({d * 100 for d in range(8)})
    once = settle_bounds(members, (OLD,))
    assert settle_bounds(members, once) == once
    assert settle_bounds([Member("d", DIR, 0o755, 0, 0, 0, OLD)], (5,)) == ()  # nothing to split
    assert settle_bounds([], ()) == ()


def test_a_generation_as_big_as_the_one_before_merges_into_it() -> None:
    members = _walk()
    bounds = settle_bounds(members)
    for n, expected in enumerate([2, 2, 3, 2, 3, 3, 4], start=1):
        when = OLD + 10 * n
        members.append(Member(f"z{n}", FILE, 0o644, 0, 0, 1000, when))
        bounds = settle_bounds(members, bounds)
        assert len(bounds) == expected, n
    assert bounds[0] == OLD and bounds[-1] == OLD + 70


def test_generations_are_capped() -> None:
    members = _walk()
    bounds = settle_bounds(members)
    for n in range(1, 3 * MAX_GENERATIONS):
        size = 1 << (3 * MAX_GENERATIONS - n)  # each smaller than the last: none merges by size
        members.append(Member(f"z{n}", FILE, 0o644, 0, 0, size, OLD + n))
        bounds = settle_bounds(members, bounds)
        assert len(bounds) <= MAX_GENERATIONS


def test_a_scan_is_cut_again_only_where_the_bounds_split_it_otherwise(tmp_path: Path) -> None:
    for d in range(4):
        (tmp_path / f"d{d}").mkdir()
        for f in range(12):
            (tmp_path / f"d{d}" / f"f{f}").write_bytes(b"x" * 1000)
    scan = scan_tree(tmp_path, **SMALL)
    assert scan.stats.files == 48 and scan.sizes == (SMALL["min_bytes"], SMALL["max_bytes"])
    newest = max(m.mtime for m in scan.members)
    same = scan.cut((newest,))
    assert same.layers is scan.layers and same.bounds == (newest,)
    assert scan.cut((newest - 10**9,)).layers is scan.layers  # all newer: still one generation
    first = scan.members[1].path  # (after the root's first directory)
    os.utime(tmp_path / first, (newest + 5, newest + 5))
    scan = scan_tree(tmp_path, **SMALL)
    two = scan.cut((newest, newest + 5))  # that file alone in a generation: cut again
    assert two.layers is not scan.layers and _paths(list(two.layers))[-1] == [first]


def test_bounds_at_or_after_the_newest_file_are_dropped() -> None:
    members = _walk({0, 1})  # two files newer than the rest
    # A file once dated a year ahead (deleted since), or a store's word: later files must still
    # make a generation of their own.
    assert settle_bounds(members, (OLD, OLD + 10**7)) == (OLD, NEW)
    assert settle_bounds(members, (10**17,)) == (NEW,)
    assert settle_bounds(members, (NEW + 1,)) == (NEW,)


def test_files_dated_in_the_future_do_not_close_the_newest_generation() -> None:
    members = _walk({0})
    members.append(Member("d7/ahead", FILE, 0o644, 0, 0, 1000, NEW + 10**8))
    assert settle_bounds(members, (OLD,), clock=NEW + 100 - FUTURE_SLACK) == (OLD, NEW)
    layers = _paths(split_members(members, bounds=(OLD, NEW), **SMALL))
    assert layers[-1] == ["d7/ahead"]  # a generation after the last bound, of its own
    assert settle_bounds(members, (OLD,)) == (OLD, NEW + 10**8)  # (no clock given: as dated)
