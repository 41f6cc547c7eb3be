"""Interop with independent OCI tools: skopeo and umoci read what we write, we read what they write.

Nothing needs relaxing: umoci's ``rootfs/`` equals the source tree in types, modes, mtimes,
contents, symlinks and hard-link groups. The one thing umoci decides itself is ``rootfs/``'s
own mode and mtime (our layers carry no entry for the root), which ``assert_same_tree`` never
compares. Debian's umoci 0.4.7 cannot read zstd layers ("blob is not correct mediatype"), so
zstd images reach it through ``skopeo copy --dest-compress-format gzip`` (a recompression that
keeps every tar entry), and gzip images directly. umoci cannot unpack our multi-platform index
in place either ("tag is ambiguous"); ``skopeo copy`` first picks one platform, as a runtime would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from remote_cache.cache.restore import restore
from remote_cache.cache.save import save
from remote_cache.keys import tag_for_key
from remote_cache.oci.descriptor import Platform
from remote_cache.oci.layout import LayoutStore
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.store import open_store
from tests.stores import opened
from tests.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None or shutil.which("umoci") is None,
    reason="skopeo and umoci (Debian packages) are needed for interop tests",
)

KEY = "interop key/1"


def run(*argv: str | Path) -> str:
    """Run a tool; on failure show its stderr in the assertion message."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}"
    return proc.stdout


def umoci_rootfs(tmp_path: Path, source: str, *, recompress: bool, extra: tuple[str, ...] = ()) -> Path:
    """``skopeo copy SOURCE oci:DIR:t`` then ``umoci unpack --rootless``; returns the bundle's rootfs."""
    layout = tmp_path / "copied"
    bundle = tmp_path / "bundle"
    compress = ("--dest-compress", "--dest-compress-format", "gzip") if recompress else ()
    run("skopeo", "copy", *extra, *compress, source, f"oci:{layout}:t")
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:t", bundle)
    return bundle / "rootfs"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_layout_we_write_is_read_by_skopeo_and_umoci(tmp_path: Path, compression: str) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=150, big_bytes=1 << 20)
    layout = tmp_path / "layout"
    await save(LayoutStore(layout), KEY, src, compression=compression)
    rootfs = umoci_rootfs(tmp_path, f"oci:{layout}:{tag_for_key(KEY)}", recompress=compression == "zstd")
    assert_same_tree(src, rootfs)


async def test_registry_image_we_write_is_read_by_skopeo_and_umoci(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=150, big_bytes=1 << 20)
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        saved = await save(store, KEY, src)
    image = f"docker://{registry.host}/{repo_name}:{saved.tag}"

    raw = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--raw", image))
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert {m["platform"]["architecture"] for m in raw["manifests"]} == {"amd64", "arm64"}
    for arch in ("amd64", "arm64"):
        info = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--override-arch", arch, image))
        assert info["Architecture"] == arch and info["Os"] == "linux"
        assert info["Digest"] == saved.digest
        assert len(info["Layers"]) == saved.layers_total

    rootfs = umoci_rootfs(tmp_path, image, recompress=True, extra=("--src-tls-verify=false",))
    assert_same_tree(src, rootfs)


def _umoci_image(tmp_path: Path, src: Path) -> Path:
    """An image made by umoci alone: ``init``, ``new``, ``insert`` of ``src`` at the root."""
    layout = tmp_path / "umoci-layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    run("umoci", "insert", "--rootless", "--image", f"{layout}:t", src, "/")
    return layout


async def test_we_restore_an_umoci_image_from_a_layout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=150, big_bytes=1 << 20)
    layout = _umoci_image(tmp_path, src)
    run("umoci", "tag", "--image", f"{layout}:t", tag_for_key(KEY))
    dest = tmp_path / "dest"
    result = await restore(LayoutStore(layout), KEY, dest)
    assert result.key == KEY
    assert_same_tree(src, dest)


async def test_we_restore_an_umoci_repack_copied_by_skopeo_into_the_registry(
    registry: Any, repo_name: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=150, big_bytes=1 << 20)
    layout = _umoci_image(tmp_path, src)
    # A second layer through the other umoci path: unpack, add files, repack.
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:t", bundle)
    for root in (src, bundle / "rootfs"):
        (root / "added-by-repack").mkdir()
        (root / "added-by-repack" / "note.txt").write_text("second layer\n")
        # Same mtimes in both trees, whatever second each was written in.
        os.utime(root / "added-by-repack" / "note.txt", (1_700_000_000, 1_700_000_000))
        os.utime(root / "added-by-repack", (1_700_000_000, 1_700_000_000))
    run("umoci", "repack", "--image", f"{layout}:t", bundle)
    run(
        "skopeo", "copy", "--dest-tls-verify=false",
        f"oci:{layout}:t", f"docker://{registry.host}/{repo_name}:{tag_for_key(KEY)}",
    )  # fmt: skip
    async with opened(parse_reference(f"{registry.host}/{repo_name}")) as store:
        dest = tmp_path / "dest"
        result = await restore(store, KEY, dest)
    assert result.layers == 2
    assert_same_tree(src, dest)


_NPM_MTIME = 499162860  # npm's fixed 1985-10-26 mtime


def _backdate(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (_NPM_MTIME, _NPM_MTIME), follow_symlinks=False)


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
