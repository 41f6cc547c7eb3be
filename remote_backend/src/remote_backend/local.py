"""Moving directories between the engine and this function's own container, where the core runs.

Into the engine, :func:`imported`: ``currentModule.workdir(path)`` is ``host.directory`` of
``/scratch/path`` (``core/schema/module.go``, ``currentModuleWorkdir``), snapshotted when the
field is resolved (``core/schema/host.go``; ``sync`` does it, and answers an ID that stands for
that snapshot), with every entry made uid/gid 0 and its xattrs dropped
(``engine/client/filesync.go``, ``normalizeLocalImportStat``); names, modes, mtimes, symlinks and
hard links are kept (``internal/fsutil/stat_unix.go``, ``setUnixOpt``). So the core lists the
owners beside the tree (:func:`remote_cache.archive.owners.write_owner_lists`) and BusyBox in the
helper image puts them back (``PUT_OWNERS``) on the tree mounted at ``OUT_DIR``, whose content
after the exec is that mount's output: a whole snapshot, as for exports.

Out of the engine, :func:`exported`: ``Directory.export(path)`` called inside a module function
writes into that function's runtime container, its "host": the engine sends the tree to the
calling client's filesync target (``engine/engineutil/filesync.go``, ``LocalDirExport``), which
for a module function is the session process ``/.init`` starts inside the runtime container
(``cmd/init/main.go``, ``mainSession``). That process gives every entry its own uid and gid
(``engine/client/filesync.go``, ``FilesyncTarget.DiffCopy``) and keeps names, modes, mtimes and
hard links. So the owners are listed first, next to the engine's copy, by BusyBox in the pinned
helper image (``OWNERS``), and put back on ours (:mod:`remote_cache.archive.owners`).

Paths are fresh directories under the function's working directory, the runtime workdir
``/scratch`` (``core/sdk/module_runtime.go``; ``currentModule.workdir`` reads from it), removed
when the block ends; the runtime container itself is thrown away after the call.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import dagger
from dagger import dag

from remote_cache.archive.owners import apply_owners, parse_owners, write_owner_lists
from remote_cache.dagger import scripts
from remote_cache.dagger.report import report
from remote_cache.dagger.toolbox import run_script

__all__ = ["exported", "imported", "scratch_dir"]

#: Where the helper sees the directory whose owners it lists.
_OWNERS_DIR = "/.remote-cache-owners"


@asynccontextmanager
async def scratch_dir() -> AsyncIterator[Path]:
    """A fresh, empty directory under the working directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=".remote-cache-", dir=Path.cwd()))
    try:
        yield path
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, path, True)


async def owners_listing(source: dagger.Directory) -> str:
    """The ``OWNERS`` listing of ``source``, made in the engine where its owners are still known."""
    helper = dag.container().from_(scripts.HELPER_IMAGE).with_mounted_directory(_OWNERS_DIR, source)
    return await run_script(helper, scripts.OWNERS, _OWNERS_DIR).stdout()


@asynccontextmanager
async def exported(source: dagger.Directory) -> AsyncIterator[Path]:
    """``source`` as a directory of this container, owners included; removed afterwards."""
    owners = parse_owners(await owners_listing(source))
    async with scratch_dir() as scratch:
        tree = scratch / "tree"
        await source.export(str(tree))
        failed = await anyio.to_thread.run_sync(apply_owners, tree, owners)
        if failed:
            report(f"warning: the owners of {len(failed)} entries could not be kept, e.g. {failed[0]}")
        yield tree


async def imported(tree: Path, lists: Path) -> dagger.Directory:
    """``tree`` (under the working directory) as an engine Directory, owners included; the files
    may be removed once this returns (the engine holds its own copies). ``lists``: a fresh path
    for the owner lists."""
    owned = await anyio.to_thread.run_sync(write_owner_lists, tree, lists)
    content = await _snapshot(tree)
    if not owned:
        return content
    helper = (
        dag.container()
        .from_(scripts.HELPER_IMAGE)
        .with_mounted_directory(scripts.OUT_DIR, content)
        .with_mounted_directory(_OWNERS_DIR, await _snapshot(lists))
    )
    fixed = run_script(helper, scripts.PUT_OWNERS, scripts.OUT_DIR, _OWNERS_DIR)
    return await fixed.directory(scripts.OUT_DIR).sync()


async def _snapshot(path: Path) -> dagger.Directory:
    """The engine's copy of ``path``, taken now: ``sync`` resolves ``host.directory``, and the
    Directory it returns stands for that result by ID (``node(id:)``), never for the path again."""
    return await dag.current_module().workdir(str(path.relative_to(Path.cwd()))).sync()
