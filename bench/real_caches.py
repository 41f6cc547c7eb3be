"""What a save uploads when a real tool uses a restored cache between saves: Go's build cache, npm's.

    .venv/bin/python bench/real_caches.py go WORKDIR [--cache DIR] [--hours 3]     (needs go)
    .venv/bin/python bench/real_caches.py npm WORKDIR --project DIR [--runs 3]
                                                              (needs npm and its registry)

Each works in a new directory under WORKDIR (tmpfs is best), on an OCI layout (no server), and
removes it at the end. Not tests: they print what happened.

``go``: Go writes to its cache as it uses it (``cmd/go/internal/cache``): it sets the mtime of
each entry it uses to the current time once that mtime is an hour old (``mtimeInterval``), and at
the end of a build, at most once a day (``trimInterval``), deletes the entries unused for five
days and an hour (``trimLimit``). A build that changes nothing still changes the files a save reads.

1. a real Go build cache: ``go build -a std cmd`` into an empty GOCACHE (or a copy of ``--cache``),
   every mtime put ``--hours`` back, as a cache saved by an earlier CI run; saved, then restored
   into a fresh directory (a new runner);
2. ``go build std cmd`` with that directory as GOCACHE (every package a cache hit: it adds no
   file), counting the files whose mtime moved, then a save: what it uploads;
3. the same build and save again: within the hour nothing is touched again;
4. the files step 2 touched, touched again two hours later (simulated: their mtimes set two hours
   ahead, as Go would set them then), then a save;
5. Go's daily trim (simulated: a tenth of the entries the build does not use dated six days back
   and the last trim two days back, saved), then ``go build std cmd``, which trims, then a save.

``npm``: npm's cache (``_cacache``: content by hash, and index files npm appends a line to when it
fetches or revalidates). ``npm ci`` of ``--project`` (a directory with ``package.json`` and
``package-lock.json``) into an empty cache makes it, and it is saved; then ``--runs`` times, as CI
jobs on fresh runners: restored into a fresh directory, ``npm ci`` again with it, saved.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

CLI = Path(sys.executable).with_name("remote-cache")


def _cli(*args: str) -> dict[str, object]:
    done = subprocess.run([str(CLI), *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"remote-cache {' '.join(args)} failed: {done.stderr.strip()}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _save(tree: Path, ref: str, step: str) -> None:
    r = _cli("save", str(tree), ref)
    total, sent = r["bytes_total"], r["bytes_uploaded"]
    assert isinstance(total, int) and isinstance(sent, int)
    shares = f"{sent / 1e6:.1f} MB of {total / 1e6:.1f} MB uploaded ({sent / total:.0%})"
    print(f"{step}: save {r['outcome']}, {shares}")


def _files(root: Path) -> list[Path]:
    return [Path(d, f) for d, _, names in os.walk(root) for f in names]


def _set_mtimes(paths: list[Path], hours_from_now: float) -> None:
    then = time.time() + hours_from_now * 3600
    for path in paths:
        os.utime(path, (then, then))


def _mtimes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in _files(root)}


def _written(root: Path, action: Callable[[], object]) -> tuple[list[Path], int]:
    """Run ``action``: the files under ``root`` it gave a new mtime, and how many it added."""
    before = _mtimes(root)
    action()
    after = _mtimes(root)
    added = len(after.keys() - before.keys())
    return [path for path, mtime in after.items() if before.get(path, mtime) != mtime], added


@contextmanager
def _workdir(parent: Path) -> Iterator[Path]:
    """A new directory under ``parent``, removed at the end (``parent`` itself is left alone)."""
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real-caches-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- go ----------------------------------------------------------------------------------------


def _go_build(cache: Path, *args: str) -> None:
    env = dict(os.environ, GOCACHE=str(cache), GOFLAGS="")
    subprocess.run(["go", "build", *args, "std", "cmd"], env=env, cwd=cache.parent, check=True)


def _go_entries(cache: Path) -> list[Path]:
    """The cache's entries, as Go's trim sees them (``-a`` action records, ``-d`` outputs)."""
    return [p for p in _files(cache) if p.name.endswith(("-a", "-d"))]


def _first_save(work: Path, cache: Path | None, hours: float, ref: str) -> int:
    """Step 1: the cache as an earlier run saved it; its number of files."""
    first = work / "cache"
    if cache:
        shutil.copytree(cache, first, symlinks=True)
    else:
        _go_build(first, "-a")
    files = _files(first)
    _set_mtimes(files, -hours)
    _save(first, ref, f"a Go build cache of {len(files)} files, mtimes {hours:g} h old")
    return len(files)


def _trim(cache: Path, ref: str, used: list[Path]) -> None:
    """Step 5: Go's daily trim of entries unused for five days, and the save after it."""
    unused = sorted(set(_go_entries(cache)) - set(used))
    entries = len(_go_entries(cache))
    _set_mtimes(random.Random(1).sample(unused, entries // 10), -6 * 24)
    (cache / "trim.txt").write_text(f"{int(time.time()) - 2 * 86400}\n")
    _save(cache, ref, f"a tenth of the {entries} entries, ones the build does not use, dated six days back")
    _go_build(cache)
    gone = entries - len(_go_entries(cache))
    _save(cache, ref, f"go build std cmd trimmed {gone} entries")


def _go(args: argparse.Namespace, work: Path) -> None:
    restored, ref = work / "restored", f"oci:{work / 'layout'}:go"
    files = _first_save(work, args.cache, args.hours, ref)
    _cli("restore", ref, str(restored))
    touched, added = _written(restored, partial(_go_build, restored))
    size = sum(p.stat().st_size for p in touched) / 1e6
    wrote = f"{len(touched)} of {files} files ({size:.1f} MB) got a new mtime, {added} were added"
    print(f"go build std cmd on the restored cache (every package a hit when none was added): {wrote}")
    _save(restored, ref, "after that build")
    again, _ = _written(restored, partial(_go_build, restored))
    print(f"the same build again: {len(again)} files got a new mtime")
    _save(restored, ref, "after it")
    _set_mtimes(touched, 2)
    _save(restored, ref, f"those {len(touched)} files touched again two hours later (simulated)")
    _trim(restored, ref, touched)


# -- npm ---------------------------------------------------------------------------------------


def _npm_ci(project: Path, cache: Path) -> None:
    """``npm ci`` of ``project`` with ``cache`` as npm's cache directory (it holds ``_cacache``)."""
    npm = ["npm", "ci", "--cache", str(cache), "--no-audit", "--no-fund", "--loglevel=error"]
    shutil.rmtree(project / "node_modules", ignore_errors=True)
    subprocess.run(npm, cwd=project, check=True, stdout=subprocess.DEVNULL)


def _npm(args: argparse.Namespace, work: Path) -> None:
    ref, project = f"oci:{work / 'layout'}:npm", work / "project"
    project.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(args.project / name, project / name)
    _npm_ci(project, work / "seed")
    seed = work / "seed" / "_cacache"
    _save(seed, ref, f"npm ci into an empty cache: {len(_files(seed))} files")
    for run in range(1, args.runs + 1):
        runner = work / f"runner-{run}"
        _cli("restore", ref, str(runner / "_cacache"))
        changed, added = _written(runner / "_cacache", partial(_npm_ci, project, runner))
        index = sum(1 for p in changed if "index-v5" in p.parts)
        wrote = f"npm ci wrote to {len(changed)} files ({index} of them index files) and added {added}"
        _save(runner / "_cacache", ref, f"run {run}: restored on a fresh runner, {wrote}")
        shutil.rmtree(runner)


def main() -> None:
    ap = argparse.ArgumentParser()
    tools = ap.add_subparsers(dest="tool", required=True)
    go = tools.add_parser("go", help="Go's build cache")
    go.add_argument("workdir", type=Path)
    go.add_argument("--cache", type=Path, help="copy this Go build cache instead of building one")
    go.add_argument("--hours", type=float, default=3.0, help="age given to the first save's mtimes")
    npm = tools.add_parser("npm", help="npm's cache")
    npm.add_argument("workdir", type=Path)
    npm.add_argument("--project", type=Path, required=True, help="holds package.json and package-lock.json")
    npm.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with _workdir(args.workdir) as work:
        (_go if args.tool == "go" else _npm)(args, work)


if __name__ == "__main__":
    main()
