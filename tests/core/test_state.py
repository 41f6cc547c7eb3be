"""Machine-local layer state: where it lives, what makes a layer settled, and damage tolerance."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from remote_cache import state as state_mod
from remote_cache.layers import scan_tree
from remote_cache.oci import OCI_LAYER_ZSTD
from remote_cache.state import LayerRecord, load_state, local_layers, state_path, write_state

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
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert state_mod.state_dir() == tmp_path / "xdg" / "remote-cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_mod.state_dir() == tmp_path / "home" / ".cache" / "remote-cache"


def test_write_then_load_round_trips_and_is_bounded(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    assert load_state(target) == {}
    assert write_state(target, [(_LOCAL, _record())])
    assert load_state(target) == {(_LOCAL, OCI_LAYER_ZSTD): _record()}
    doc = json.loads(state_path(target).read_text())
    assert doc["format"] == "remote-cache-state/1" and doc["path"] == str(target.resolve())
    many = [("sha256:" + f"{i:064x}", _record(i)) for i in range(state_mod.MAX_RECORDS + 50)]
    assert write_state(target, many)
    kept = load_state(target)
    assert len(kept) == state_mod.MAX_RECORDS and (_LOCAL, OCI_LAYER_ZSTD) not in kept
    assert state_path(target).stat().st_size < state_mod.MAX_STATE_BYTES
    assert [p.name for p in state_path(target).parent.iterdir()] == [state_path(target).name]


def test_unwritable_state_dir_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("REMOTE_CACHE_STATE_DIR", str(blocker / "state"))
    assert write_state(tmp_path, [(_LOCAL, _record())]) is False
    assert load_state(tmp_path) == {}


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
    write_state(tmp_path, [(_LOCAL, _record())])
    state_path(tmp_path).write_bytes(body)
    assert load_state(tmp_path) == {}


def _tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"a" * 100)
    (root / "b").write_bytes(b"b" * 100)
    (root / "l").symlink_to("b")
    return root


def test_local_listing_follows_ctime_not_mtime(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    state_mod.settle(time.time_ns())
    bound = state_mod.clock_ns()
    before = local_layers(scan_tree(root), bound)
    assert len(before) == 1 and before[0].settled and before[0].local is not None
    # Same size, same mtime, other bytes: the portable listing cannot tell; the local one does.
    f = root / "d" / "a"
    st = f.stat()
    f.write_bytes(b"z" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = local_layers(scan_tree(root), state_mod.clock_ns())
    assert after[0].listing == before[0].listing
    assert after[0].local != before[0].local


def test_files_changed_since_the_bound_are_not_settled(tmp_path: Path) -> None:
    bound = state_mod.clock_ns()  # taken before the files are written: they may still change
    root = _tree(tmp_path / "t")
    layer = local_layers(scan_tree(root), bound)[0]
    assert layer.local is not None and not layer.settled
    assert not local_layers(scan_tree(root), state_mod.settle(time.time_ns()), mtime_bound=0)[0].settled


def test_a_file_changed_after_the_scan_never_matches_what_was_recorded(tmp_path: Path) -> None:
    # A save records the listing its scan saw; a file written after that scan (say while the
    # layer was being packed) has a newer ctime, so no later scan can match the record.
    root = _tree(tmp_path / "t")
    recorded = local_layers(scan_tree(root), state_mod.settle(time.time_ns()))[0]
    f = root / "b"
    st = f.stat()
    f.write_bytes(b"y" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = local_layers(scan_tree(root), state_mod.settle(time.time_ns()))[0]
    assert again.listing == recorded.listing
    assert again.local != recorded.local
