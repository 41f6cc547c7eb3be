"""What a save uploads when a real tool uses a restored cache between saves: Go's build cache, npm's.

    .venv/bin/python bench/real_caches.py go WORKDIR [--cache DIR] [--hours 3]     (needs go)
    .venv/bin/python bench/real_caches.py npm WORKDIR --project DIR [--cache DIR] [--runs 3]
                                                              (needs npm and its registry)

Both run in WORKDIR (tmpfs is best) on an OCI layout (no server). Not tests: they print what
happened.

``go``: Go rewrites its cache's metadata as it uses it (``cmd/go/internal/cache``): it sets the
mtime of each entry it uses to the current time once that mtime is an hour old
(``mtimeInterval``), and once a day (``trimInterval``) deletes the entries unused for five days
(``trimLimit``). A build that changes nothing still changes the files a save reads.

1. a real Go build cache: ``GOCACHE=WORKDIR/cache go build -a std cmd`` (or a copy of ``--cache``),
   with every mtime put ``--hours`` back, as a cache saved by an earlier CI run; saved, then
   restored into a fresh directory (a new runner);
2. ``go build std cmd`` with that directory as GOCACHE (every package a cache hit), counting the
   files whose mtime moved, then a save: what it uploads;
3. the same build and save again: within the hour nothing is touched again;
4. the files step 2 touched touched again two hours later (simulated: their mtimes set two hours
   ahead, as Go would set them then), then a save;
5. Go's daily trim (simulated: a tenth of the files dated six days back and the last trim two
   days back, saved), then ``go build std cmd``, which trims, then a save.

``npm``: npm's cache (``_cacache``: content by hash, index entries that npm appends to when it
revalidates what it fetched). The cache (a copy of ``--cache DIR``'s ``_cacache``, by default
``~/.npm``'s) is saved; then ``--runs`` times, as CI jobs on fresh runners: restored into a fresh
directory, ``npm ci`` of ``--project`` (a directory with ``package.json`` and
``package-lock.json``) with that cache, and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

CLI = Path(sys.executable).with_name("remote-cache")


def _go_build(cache: Path, *args: str) -> None:
    env = dict(os.environ, GOCACHE=str(cache), GOFLAGS="")
    subprocess.run(["go", "build", *args, "std", "cmd"], env=env, cwd=cache.parent, check=True)


def _cli(*args: str) -> dict[str, object]:
    done = subprocess.run([str(CLI), *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"remote-cache {' '.join(args)} failed: {done.stderr.strip()}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


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
    return [path for path, mtime in after.items() if before.get(path, mtime) != mtime], len(
        after.keys() - before.keys()
    )


def _save(tree: Path, ref: str, step: str) -> None:
    r = _cli("save", str(tree), ref)
    total, sent = int(str(r["bytes_total"])), int(str(r["bytes_uploaded"]))
    shares = f"{sent / 1e6:.1f} MB of {total / 1e6:.1f} MB uploaded ({sent / total:.0%})"
    print(f"{step}: save {r['outcome']}, {shares}")


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


def _trim(cache: Path, ref: str) -> None:
    """Step 5: Go's daily trim of entries unused for five days, and the save after it."""
    entries = [p for p in _files(cache) if p.name not in ("trim.txt", "README")]
    _set_mtimes(random.Random(1).sample(entries, len(entries) // 10), -6 * 24)
    (cache / "trim.txt").write_text(f"{int(time.time()) - 2 * 86400}\n")
    _save(cache, ref, "a tenth of the entries dated six days back (setting up the trim)")
    _go_build(cache)
    gone = sum(1 for p in entries if not p.exists())
    _save(cache, ref, f"go build std cmd trimmed {gone} of {len(entries)} entries")


def _fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _go(args: argparse.Namespace) -> None:
    work = _fresh(args.workdir)
    restored, ref = work / "restored", f"oci:{work / 'layout'}:go"
    files = _first_save(work, args.cache, args.hours, ref)
    _cli("restore", ref, str(restored))
    touched, _ = _written(restored, partial(_go_build, restored))
    size = sum(p.stat().st_size for p in touched) / 1e6
    print(
        f"go build std cmd on the restored cache: {len(touched)} of {files} files ({size:.1f} MB), new mtimes"
    )
    _save(restored, ref, "after that build")
    again, _ = _written(restored, partial(_go_build, restored))
    print(f"the same build again: {len(again)} files, new mtimes")
    _save(restored, ref, "after it")
    _set_mtimes(touched, 2)
    _save(restored, ref, f"those {len(touched)} files touched again two hours later")
    _trim(restored, ref)


def _npm(args: argparse.Namespace) -> None:
    work = _fresh(args.workdir)
    ref, project = f"oci:{work / 'layout'}:npm", work / "project"
    shutil.copytree((args.cache or Path.home() / ".npm") / "_cacache", work / "saved", symlinks=True)
    _save(work / "saved", ref, f"the npm cache ({len(_files(work / 'saved'))} files)")
    project.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(args.project / name, project / name)
    for run in range(1, args.runs + 1):
        runner = work / f"runner-{run}"  # npm's --cache names the directory holding _cacache
        _cli("restore", ref, str(runner / "_cacache"))
        shutil.rmtree(project / "node_modules", ignore_errors=True)
        npm = ["npm", "ci", "--cache", str(runner), "--no-audit", "--no-fund", "--loglevel=error"]
        changed, added = _written(
            runner / "_cacache",
            partial(subprocess.run, npm, cwd=project, check=True, stdout=subprocess.DEVNULL),
        )
        _save(
            runner / "_cacache",
            ref,
            f"run {run}: restored, npm ci wrote {len(changed)} files and added {added}",
        )


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
    npm.add_argument("--cache", type=Path, help="the npm cache directory to start from (default ~/.npm)")
    npm.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    (_go if args.tool == "go" else _npm)(args)


if __name__ == "__main__":
    main()
