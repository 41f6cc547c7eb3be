"""Machine-local layer state: where it lives, what makes a layer settled, and damage tolerance."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from msgspec.structs import asdict, replace

from remote_cache.archive.plan import LayerPlan, TreeScan, scan_tree
from remote_cache.archive.tar import FILE, Member
from remote_cache.archive.walk import TreeStats, tree_identity
from remote_cache.cache import evidence, state
from remote_cache.cache.evidence import LayerRecord, local_layers
from remote_cache.cache.state import state_path
from remote_cache.oci import OCI_LAYER_ZSTD
from tests.trees import settle_ctimes

_DIGEST = "sha256:" + "ab" * 32
_LOCAL = "sha256:" + "cd" * 32


def _record(n: int = 0) -> LayerRecord:
    return LayerRecord(OCI_LAYER_ZSTD, "sha256:" + f"{n:064x}", 100 + n, _DIGEST)


def test_state_dir_from_env_then_xdg_then_home(
    tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    assert state_path(target).parent == state_dir
    assert state_path(tmp_path / "." / "vol") == state_path(target)  # keyed by the resolved path
    monkeypatch.delenv("REMOTE_CACHE_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state.state_dir() == tmp_path / "xdg" / "remote-cache"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state.state_dir() == tmp_path / "home" / ".local" / "state" / "remote-cache"


def test_write_then_load_round_trips_and_is_bounded(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    assert state.load(target).records == {}
    assert state.record_save(target, state.load(target), [(_LOCAL, _record())])
    assert state.load(target).records == {(_LOCAL, OCI_LAYER_ZSTD): _record()}
    doc = json.loads(state_path(target).read_text())
    assert doc["format"] == "remote-cache-state/4" and doc["path"] == str(target.resolve())
    many = [("sha256:" + f"{i:064x}", _record(i)) for i in range(state.MAX_RECORDS + 50)]
    assert state.record_save(target, state.load(target), many)
    kept = state.load(target).records
    assert len(kept) == state.MAX_RECORDS and (_LOCAL, OCI_LAYER_ZSTD) not in kept
    assert state_path(target).stat().st_size < state.MAX_STATE_BYTES
    assert [p.name for p in state_path(target).parent.iterdir()] == [state_path(target).name]


def test_unwritable_state_dir_is_not_an_error_but_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Silent, it left a user wondering why every save read every file (a state directory root
    # made under sudo, a read-only home): one warning with the fix, as pip does for its cache.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("REMOTE_CACHE_STATE_DIR", str(blocker / "state"))
    with caplog.at_level(logging.WARNING, logger="remote_cache"):
        assert state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())]) is False
    assert state.load(tmp_path).records == {}
    [warning] = [r.getMessage() for r in caplog.records if r.name == "remote_cache"]
    assert str(blocker / "state") in warning and "REMOTE_CACHE_STATE_DIR" in warning, warning
    assert "reads every file" in warning, warning


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"format": "remote-cache-state/1", "layers": {}}',
        b'{"format": "other", "layers": []}',
        b'{"format": "remote-cache-state/1", "layers": [{"local": "x"}]}',
    ],
)
def test_corrupt_state_is_empty(tmp_path: Path, body: bytes) -> None:
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    state_path(tmp_path).write_bytes(body)
    assert state.load(tmp_path).records == {}


def _tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"a" * 100)
    (root / "b").write_bytes(b"b" * 100)
    (root / "l").symlink_to("b")
    return root


def test_local_listing_follows_ctime_not_mtime(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    settle_ctimes()
    bound = evidence.clock_ns()
    before = local_layers(scan_tree(root), bound)
    assert len(before) == 1 and before[0].settled and before[0].local is not None
    # Same size, same mtime, other bytes: the portable listing cannot tell; the local one does.
    f = root / "d" / "a"
    st = f.stat()
    f.write_bytes(b"z" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = local_layers(scan_tree(root), evidence.clock_ns())
    assert after[0].listing == before[0].listing
    assert after[0].local != before[0].local


def test_files_changed_since_the_bound_are_not_settled(tmp_path: Path) -> None:
    bound = evidence.clock_ns()  # taken before the files are written: they may still change
    root = _tree(tmp_path / "t")
    layer = local_layers(scan_tree(root), bound)[0]
    assert layer.local is not None and not layer.settled
    assert not local_layers(scan_tree(root), settle_ctimes(), mtime_bound=0)[0].settled


def test_a_file_changed_after_the_scan_never_matches_what_was_recorded(tmp_path: Path) -> None:
    # A save records the listing its scan saw; a file written after that scan (say while the
    # layer was being packed) has a newer ctime, so no later scan can match the record.
    root = _tree(tmp_path / "t")
    recorded = local_layers(scan_tree(root), settle_ctimes())[0]
    f = root / "b"
    st = f.stat()
    f.write_bytes(b"y" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = local_layers(scan_tree(root), settle_ctimes())[0]
    assert again.listing == recorded.listing
    assert again.local != recorded.local


def test_a_whole_second_ctime_in_the_bound_s_second_is_not_settled_beside_finer_ones(tmp_path: Path) -> None:
    """A tree spanning two filesystems (a whole-second one mounted inside a nanosecond one): a file
    on the coarse one written in the bound's second (ctime = that second) can be written again
    after the scan, in the same second, and keep that ctime -- with npm's fixed mtime and the same
    size its local listing stays the same, and the next save would reuse the stale layer. The
    finer files beside it do not make its ctime any finer. (Seen on a loop-mounted ``ext4 -I 128``
    inside a tmpfs tree: ``probe/mixed.py``.)"""
    s = 1_000_000_000
    bound = 100 * s + s // 2  # clock_ns() before the scan: half-way through second 100
    # (mtimes put back long before, as npm does: second 1 here)
    fine = Member("a.js", FILE, 0o644, 0, 0, 20, 1, ino=5, ctime_ns=50 * s + 123_456_789)
    coarse = Member("m/package.json", FILE, 0o644, 0, 0, 20, 1, ino=6, ctime_ns=100 * s)
    scan = TreeScan(tmp_path, (LayerPlan(0, (fine, coarse), 2048),), TreeStats())
    assert not local_layers(scan, bound, mtime_bound=100)[0].settled


def _window(root: tuple[int, int] = (1, 2), start: int = 10, end: int = 20) -> evidence.RestoreWindow:
    key = (_LOCAL, OCI_LAYER_ZSTD)
    return evidence.RestoreWindow(start, end, root, {key: _record(7)}, {key: evidence.parents_digest({})})


def _parents_on_disk(root: Path, files: list[str]) -> str:
    """The parents digest of ``files`` as a restore takes it: each one's directory, by lstat."""
    dirs = {os.path.dirname(f) for f in files} - {""}
    return evidence.parents_digest({os.fsencode(d): os.lstat(root / d).st_ino for d in dirs})


def test_window_round_trips_next_to_local_records(tmp_path: Path) -> None:
    assert state.load(tmp_path).window is None
    assert state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    assert state.record_restore(tmp_path, _window())
    assert state.load(tmp_path).window == _window()
    assert state.load(tmp_path).records == {(_LOCAL, OCI_LAYER_ZSTD): _record()}  # kept
    assert state.record_save(
        tmp_path, state.load(tmp_path), [(_DIGEST, _record(1))]
    )  # a save keeps the window
    assert state.load(tmp_path).window == _window()
    assert state.record_restore(tmp_path, _window(start=30, end=40))  # replaced, not merged
    assert state.load(tmp_path).window == _window(start=30, end=40)
    bad = replace(_window(), layers={("not a digest", OCI_LAYER_ZSTD): _record(8)})
    assert state.record_restore(tmp_path, bad)  # a malformed annotation is dropped, not fatal
    assert state.load(tmp_path).window == replace(bad, layers={}, parents={})
    assert len(state.load(tmp_path).records) == 2


def _restored(names: str = _LOCAL, facts: str = _DIGEST) -> evidence.RestoredTree:
    """A restored tree of three entries: two 1-byte files and a directory."""
    return evidence.RestoredTree(
        location="registry.example/repo",
        tag="k",
        key="k",
        shape="remote-cache/x zstd platforms=linux/amd64",
        digest=_DIGEST,
        names=names,
        facts=facts,
        entries=3,
        size=2,
        files=2,
        layers=1,
        bytes=40,
    )


def test_the_restored_entry_s_generation_bounds_round_trip_with_its_window(tmp_path: Path) -> None:
    window = replace(_window(), bounds=(-7, 1795790365))
    assert state.record_restore(tmp_path, window)
    assert state.load(tmp_path).window == window
    # Not as a save writes them: only the bounds are dropped (a cut hint, not evidence).
    path = state.state_path(tmp_path)
    for bad in ([3, 2], ["1"], [True], [10**19], list(range(65)), "1,2"):
        doc = json.loads(path.read_text())
        doc["window"]["bounds"] = bad
        path.write_text(json.dumps(doc))
        assert state.load(tmp_path).window == _window(), bad


def test_the_restored_tree_round_trips_with_its_window(tmp_path: Path) -> None:
    window = replace(_window(), tree=_restored())
    assert state.record_restore(tmp_path, window)
    assert state.load(tmp_path).window == window
    assert state.record_save(tmp_path, state.load(tmp_path), [])  # a save keeps it, with the window
    assert state.load(tmp_path).window == window


@pytest.mark.parametrize(
    "tree",
    [
        {**asdict(_restored()), "names": "not a digest"},
        {**asdict(_restored()), "size": -1},
        {**asdict(_restored()), "extra": 1},
        {k: v for k, v in asdict(_restored()).items() if k != "key"},
        [],
    ],
)
def test_a_bad_restored_tree_spoils_the_whole_file(tmp_path: Path, tree: object) -> None:
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    assert state.record_restore(tmp_path, replace(_window(), tree=_restored()))
    doc = json.loads(state_path(tmp_path).read_text())
    doc["window"]["tree"] = tree
    state_path(tmp_path).write_text(json.dumps(doc))
    assert state.load(tmp_path).records == {} and state.load(tmp_path).window is None


def test_a_restored_tree_is_untouched_only_in_its_own_window_root_and_names(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"f")
    (tmp_path / "g").write_bytes(b"g")
    identity = tree_identity(tmp_path)
    root = evidence.dir_id(tmp_path)
    ctimes = sorted(identity.ctimes[1:])
    restored = _restored(evidence.names_digest(["g", "d"]), _facts_now(tmp_path))
    window = replace(_window(root, ctimes[0], ctimes[-1] + 1), tree=restored)
    assert evidence.untouched_since(window, identity, root)
    assert not evidence.untouched_since(replace(window, tree=None), identity, root)
    assert not evidence.untouched_since(window, identity, (root[0], root[1] + 1))  # another directory
    assert not evidence.untouched_since(window, identity, (root[0] + 1, root[1]))
    other_names = replace(restored, names=evidence.names_digest(["g", "d", "e"]))
    assert not evidence.untouched_since(replace(window, tree=other_names), identity, root)
    for counts in ({"entries": 4}, {"files": 1}, {"size": 3}):  # what the walk counts must agree
        other = replace(restored, **counts)
        assert not evidence.untouched_since(replace(window, tree=other), identity, root)
    # An entry changed at the window's end or later, or before its start, is outside it.
    assert not evidence.untouched_since(replace(window, end_ns=ctimes[-1]), identity, root)
    assert not evidence.untouched_since(replace(window, start_ns=ctimes[0] + 1), identity, root)
    # The root's own ctime is not compared: the swap moved it after the window.
    os.utime(tmp_path, (1, 1))
    assert evidence.untouched_since(window, tree_identity(tmp_path), root)
    # Modes and mtimes are compared with what the restore gave, whatever the ctimes say (a
    # clock stamping them behind this one; a filesystem that kept another mtime or mode).
    open_ended = replace(window, end_ns=1 << 62)
    mode = stat.S_IMODE(os.lstat(tmp_path / "g").st_mode)
    os.chmod(tmp_path / "g", mode ^ 0o100)
    assert not evidence.untouched_since(open_ended, tree_identity(tmp_path), root)
    os.chmod(tmp_path / "g", mode)
    assert evidence.untouched_since(open_ended, tree_identity(tmp_path), root)
    os.utime(tmp_path / "d" / "f", ns=(1, 1))
    assert not evidence.untouched_since(open_ended, tree_identity(tmp_path), root)


def _facts_now(root: Path) -> str:
    """:func:`evidence.facts_digest` of the tree made above (a directory d, files d/f and g)."""
    found = [os.lstat(root / name) for name in ("d", "d/f", "g")]
    return evidence.facts_digest(sum(st.st_mode for st in found), sum(st.st_mtime_ns for st in found))


@pytest.mark.parametrize(
    "window",
    [
        {"start": 20, "end": 10, "root": [1, 2], "layers": []},
        {"start": 1, "end": 10, "root": [1], "layers": []},
        {"start": "1", "end": 10, "root": [1, 2], "layers": []},
        {"start": 1, "end": 10, "root": [1, 2], "layers": [{"listing": "x"}]},
        # an older format's layer: no parents (its directories unknown)
        {
            "start": 1,
            "end": 10,
            "root": [1, 2],
            "layers": [
                {
                    "listing": _LOCAL,
                    "mediaType": OCI_LAYER_ZSTD,
                    "digest": _DIGEST,
                    "size": 1,
                    "diffID": _DIGEST,
                }
            ],
        },
        [],
    ],
)
def test_a_bad_window_spoils_the_whole_file(tmp_path: Path, window: object) -> None:
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    doc = json.loads(state_path(tmp_path).read_text())
    doc["window"] = window
    state_path(tmp_path).write_text(json.dumps(doc))
    assert state.load(tmp_path).records == {} and state.load(tmp_path).window is None


def test_state_of_another_path_and_older_format_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state.record_restore(tmp_path / "a", _window())
    state_path(tmp_path / "b").write_bytes(state_path(tmp_path / "a").read_bytes())
    assert state.load(tmp_path / "b").window is None
    doc = json.loads(state_path(tmp_path / "a").read_text())
    doc["format"] = "remote-cache-state/1"
    state_path(tmp_path / "a").write_text(json.dumps(doc))
    assert state.load(tmp_path / "a").window is None


def test_a_state_file_someone_else_owns_is_ignored(tmp_path: Path) -> None:
    # A shared REMOTE_CACHE_STATE_DIR (a CI cache mount, /tmp): another user could plant a file
    # vouching for layers whose files have changed since, and the next save would reuse stale
    # blobs. Evidence counts only in files this user owns, as ssh trusts only its own keys.
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    state.record_restore(tmp_path, _window())
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    assert state.load(tmp_path).window is not None and state.load(tmp_path).records
    os.chown(state_path(tmp_path), 65534, 65534)
    planted = state.load(tmp_path)
    assert planted.window is None and planted.records == {} and planted.tree is None


def test_a_state_file_others_can_write_is_ignored(tmp_path: Path) -> None:
    # Our own file, but group- or world-writable: another user may hard-link it (Linux's
    # protected_hardlinks allows that for a file they can write) or write into it, and plant
    # evidence (a review did: a changed file then saved as "unchanged"). A save writes 0600.
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    assert stat.S_IMODE(state_path(tmp_path).stat().st_mode) == 0o600
    for mode in (0o620, 0o602, 0o666):
        state_path(tmp_path).chmod(mode)
        assert state.load(tmp_path).records == {}, oct(mode)
    state_path(tmp_path).chmod(0o644)
    assert state.load(tmp_path).records


def test_a_fifo_or_a_link_at_the_state_path_is_no_evidence_and_no_hang(tmp_path: Path) -> None:
    # Opening a FIFO for reading waits for a writer: one planted at the state path (a shared
    # state directory) hung every save and restore of that directory.
    state.record_save(tmp_path, state.load(tmp_path), [(_LOCAL, _record())])
    path = state_path(tmp_path)
    kept = path.with_name("kept.json")
    path.rename(kept)
    os.mkfifo(path)
    loaded: list[state.Evidence] = []
    reader = threading.Thread(target=lambda: loaded.append(state.load(tmp_path)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():
        with open(path, "wb"):  # let the stuck reader go
            pass
        pytest.fail("state.load waited on a FIFO at the state path")
    assert loaded[0].records == {}
    path.unlink()
    path.symlink_to(kept)  # the state file is only ever a regular file written by a save
    assert state.load(tmp_path).records == {}


def test_a_format_2_save_record_is_not_trusted_under_format_3_s_settle_rule(tmp_path: Path) -> None:
    """Format 2 save records were made under the old settle rule (changed with the bump to format 3,
    commit 5d93ef1): a whole-second ctime in the bound's second beside finer ones counted as
    settled, so a format-2 file can hold a record whose file was rewritten later in that second,
    keeping its ctime, size and npm mtime: its local listing still matches and the record vouches
    for the stale layer (reproduced end to end with a loop-mounted ``ext4 -I 128`` inside the tree:
    the next save stored the old bytes). Such a record cannot be told apart: a format-2 file's
    records must not be trusted. (fails: defect)"""
    s = 1_000_000_000
    bound = 100 * s + s // 2
    fine = Member("a.js", FILE, 0o644, 0, 0, 20, 1, ino=5, ctime_ns=50 * s + 123_456_789)
    coarse = Member("m/package.json", FILE, 0o644, 0, 0, 20, 1, ino=6, ctime_ns=100 * s)
    scan = TreeScan(tmp_path, (LayerPlan(0, (fine, coarse), 2048),), TreeStats())
    layer = local_layers(scan, bound, mtime_bound=100)[0]
    assert not layer.settled and layer.local is not None  # format 3 would not record it
    # ... but format 2's rule did (it floored the bound only when every ctime was whole-second):
    doc = {
        "format": "remote-cache-state/2",
        "path": str(tmp_path.resolve()),
        "updated": int(time.time()),
        "layers": [
            {
                "local": layer.local,
                "mediaType": OCI_LAYER_ZSTD,
                "digest": _record().digest,
                "size": _record().size,
                "diffID": _record().diff_id,
            }
        ],
    }
    state_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    state_path(tmp_path).write_text(json.dumps(doc))
    assert state.load(tmp_path).records == {}


def test_the_filesystem_s_clock_settles_between_earlier_and_later_ctimes(tmp_path: Path) -> None:
    """The restore window's bounds: a ctime read from a probe file, then one it moves on to."""
    probe = tmp_path / "clock"
    start = evidence.fs_clock_ns(probe)
    (tmp_path / "early").write_bytes(b"e")
    bound = evidence.fs_settle(probe)
    (tmp_path / "late").write_bytes(b"l")
    early, late = ((tmp_path / name).stat().st_ctime_ns for name in ("early", "late"))
    assert start <= early < bound <= late


def test_window_hits_need_equal_listing_and_every_ctime_inside(tmp_path: Path) -> None:
    probe = tmp_path / "clock"
    start = evidence.fs_clock_ns(probe)
    root = _tree(tmp_path / "t")
    end = evidence.fs_settle(probe)
    scan = scan_tree(root)
    layers = local_layers(scan, end)
    rec = _record(3)
    key = (layers[0].listing, OCI_LAYER_ZSTD)
    window = evidence.RestoreWindow(
        start, end, (0, 0), {key: rec}, {key: _parents_on_disk(root, ["d/a", "b"])}
    )
    assert evidence.window_hits(scan, layers, window, OCI_LAYER_ZSTD) == {0: rec}
    assert evidence.window_hits(scan, layers, window, "application/other") == {}
    assert evidence.window_hits(scan, layers, None, OCI_LAYER_ZSTD) == {}
    late = replace(window, start_ns=end)  # files written before the window
    assert evidence.window_hits(scan, layers, late, OCI_LAYER_ZSTD) == {}
    f = root / "b"
    st = f.stat()
    f.write_bytes(b"y" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    scan = scan_tree(root)
    layers = local_layers(scan, evidence.clock_ns())
    assert layers[0].listing in {k[0] for k in window.layers}  # the listing cannot tell ...
    assert evidence.window_hits(scan, layers, window, OCI_LAYER_ZSTD) == {}  # ... the ctime can


def test_whole_second_ctimes_round_the_window_down(tmp_path: Path) -> None:
    s = 1_000_000_000

    def hits(ctime_s: int) -> bool:
        entry = Member("f", FILE, 0o644, 0, 0, 1, 1, ino=5, ctime_ns=ctime_s * s)
        scan = TreeScan(tmp_path, (LayerPlan(0, (entry,), 1024),), TreeStats())
        layers = local_layers(scan, 100 * s)
        key = (layers[0].listing, OCI_LAYER_ZSTD)
        window = evidence.RestoreWindow(
            10 * s + s // 2, 20 * s + s // 2, (0, 0), {key: _record()}, {key: evidence.parents_digest({})}
        )
        return bool(evidence.window_hits(scan, layers, window, OCI_LAYER_ZSTD))

    assert [hits(t) for t in (9, 10, 19, 20, 21)] == [False, True, True, False, False]


def test_a_format_3_window_from_the_machine_s_clock_is_not_trusted(tmp_path: Path) -> None:
    """Format 3 restore windows took their bounds from the restoring process's clock: one running
    ahead of the filesystem's ended after the restore did, and an npm-style edit made within that
    difference lies inside it (reproduced end to end with faketime: the next save reused the stale
    layer, then recorded it under the edited file's local listing). Such a window cannot be told
    apart from a sound one: a format-3 file is not trusted."""
    probe = tmp_path / "clock"
    root = _tree(tmp_path / "t")
    start = evidence.fs_clock_ns(probe)
    key = (_LOCAL, OCI_LAYER_ZSTD)
    window = evidence.RestoreWindow(
        start, evidence.fs_settle(probe), evidence.dir_id(root), {key: _record()}, {key: _DIGEST}
    )
    assert state.record_restore(root, window)
    assert state.load(root).window == window
    doc = json.loads(state_path(root).read_text())
    state_path(root).write_text(json.dumps({**doc, "format": "remote-cache-state/3"}))
    assert state.load(root).window is None
