"""Review probes of the restore window (remote_cache.cache.evidence): cases it must not vouch for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.oci.descriptor import Platform
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.store import open_store

_NPM_MTIME = 499162860  # npm's fixed 1985-10-26 mtime


def _backdate(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (_NPM_MTIME, _NPM_MTIME), follow_symlinks=False)


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci (Debian package) appends the layer")
async def test_a_layer_a_later_layer_overwrote_is_not_vouched_for(tmp_path: Path) -> None:
    """An entry another tool appended a layer to (``umoci insert``, ``crane append``: README says
    entries are plain OCI images) whose file overwrites one of our annotated layer's files with the
    same size, mode and (npm's fixed) mtime, in the same directory. After restoring it, the tree
    holds the new bytes with ctimes inside the window, in the directory the restore wrote them
    into, and the save's planned layer has the annotated layer's listing: the window must not
    vouch for that layer, whose blob holds the overwritten bytes."""
    layout = tmp_path / "layout"
    store = open_store(parse_reference(f"oci:{layout}"))
    src, over = tmp_path / "src", tmp_path / "over"
    (src / "d").mkdir(parents=True)
    over.mkdir()
    (src / "d" / "f").write_bytes(b"AAAA")
    (src / "d" / "g").write_bytes(b"keep")
    (over / "f").write_bytes(b"BBBB")
    _backdate(src)
    _backdate(over)
    one = [Platform("linux", "amd64")]  # umoci reads gzip, one platform
    await save(store, "k1", src, compression="gzip", platforms=one)
    subprocess.run(["umoci", "insert", "--image", f"{layout}:k1", str(over / "f"), "/d/f"], check=True)
    work = tmp_path / "work"
    await restore(store, "k1", work)
    assert (work / "d" / "f").read_bytes() == b"BBBB"
    await save(store, "k2", work, compression="gzip", platforms=one)
    out = tmp_path / "out"
    await restore(store, "k2", out)
    assert (out / "d" / "f").read_bytes() == b"BBBB"  # the tree saved, not the layer it overwrote
