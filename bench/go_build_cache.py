"""What a save uploads after Go builds that reuse a restored Go build cache. Needs ``go``.

    .venv/bin/python bench/go_build_cache.py WORKDIR [--cache DIR] [--hours 3]

Go rewrites its cache's metadata as it uses it (``cmd/go/internal/cache``): it sets the mtime of
each entry it uses to the current time once that mtime is an hour old (``mtimeInterval``), and
once a day (``trimInterval``) deletes the entries unused for five days (``trimLimit``). A build
that changes nothing still changes the files a save reads. This runs, in WORKDIR (tmpfs is best),
on an OCI layout (no server):

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

Not a test: it prints what happened.
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


def _build_counting(cache: Path) -> list[Path]:
    """``go build std cmd`` on ``cache``: the files it gave a new mtime."""
    before = _mtimes(cache)
    _go_build(cache)
    return [path for path, mtime in _mtimes(cache).items() if before.get(path, mtime) != mtime]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--cache", type=Path, help="copy this Go build cache instead of building one")
    ap.add_argument("--hours", type=float, default=3.0, help="age given to the first save's mtimes")
    args = ap.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    restored, ref = work / "restored", f"oci:{work / 'layout'}:go"
    files = _first_save(work, args.cache, args.hours, ref)
    _cli("restore", ref, str(restored))
    touched = _build_counting(restored)
    size = sum(p.stat().st_size for p in touched) / 1e6
    print(
        f"go build std cmd on the restored cache: {len(touched)} of {files} files ({size:.1f} MB), new mtimes"
    )
    _save(restored, ref, "after that build")
    print(f"the same build again: {len(_build_counting(restored))} files, new mtimes")
    _save(restored, ref, "after it")
    _set_mtimes(touched, 2)
    _save(restored, ref, f"those {len(touched)} files touched again two hours later")
    _trim(restored, ref)


if __name__ == "__main__":
    main()
