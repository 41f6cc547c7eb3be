"""Round trips, timed: a small entry's restore, restore-key fallback and the save after a restore,
through a relay that adds network latency in front of a loopback docker-registry.

Usage: python bench/latency.py [--delay-ms 20] [--rounds 4] [--other-tree DIR] [--corpus DIR]

On loopback a request costs almost nothing, so ``bench.py`` cannot show what a remote registry
charges for each request made before the first blob: here every byte reaches the other side
``--delay-ms`` later (both ways; bandwidth is not limited: chunks are queued, not slept on).
``--other-tree DIR`` runs a second checkout's code (e.g. ``git worktree add DIR REV``) side by
side, alternating, with the same relay. ``--corpus DIR`` times that tree instead of the small
entry (e.g. the Go-shaped one ``make_gocache.py`` builds). Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("remote-cache")


def _run(tree: Path, *args: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    started = time.monotonic()
    done = subprocess.run([str(CLI), *args, "-q"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return time.monotonic() - started


def _round(tree: Path, host: str, name: str, src: Path, work: Path) -> tuple[float, float, float]:
    """(restore, fallback restore, save after the restore) of a fresh entry, seconds."""
    ref = f"{host}/latency/{name}"
    _run(tree, "save", str(src), f"{ref}:k")
    out = work / f"out-{name}"
    restore = _run(tree, "restore", f"{ref}:k", str(out))
    fallback = _run(tree, "restore", f"{ref}:absent", str(work / f"fb-{name}"), "--restore-key", "k")
    save_after = _run(tree, "save", str(out), f"{ref}:k")
    for done in (out, work / f"fb-{name}"):
        shutil.rmtree(done, ignore_errors=True)
    return restore, fallback, save_after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=float, default=20.0, help="added each way")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--other-tree", type=Path, help="a second checkout to time side by side")
    ap.add_argument("--corpus", type=Path, help="the tree to save and restore (default: 50 small files)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.registry_server import start_registry, tcp_relay

    trees = {"this": ROOT} | ({"other": args.other_tree.resolve()} if args.other_tree else {})
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        work = Path(tmp)
        os.environ["REMOTE_CACHE_STATE_DIR"] = str(work / "state")  # the runs' own, not the user's
        src = args.corpus.resolve() if args.corpus else _small_entry(work / "src")
        registry = start_registry(work / "registry")
        try:
            with tcp_relay(registry.host, delay=args.delay_ms / 1000) as relay:
                times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
                for n in range(args.rounds):
                    for name, tree in trees.items():
                        times[name].append(_round(tree, relay.host, f"{name}{n}", src, work))
        finally:
            registry.stop()
    what = f"the tree {args.corpus}" if args.corpus else "a 50-file entry"
    print(f"{args.delay_ms:g} ms each way, {what}, medians of {args.rounds} rounds (seconds):")
    print(f"{'code':8s} {'restore':>8s} {'fallback':>9s} {'save after':>11s}")
    for name, rows in times.items():
        medians = [statistics.median(row[i] for row in rows) for i in range(3)]
        print(f"{name:8s} {medians[0]:8.3f} {medians[1]:9.3f} {medians[2]:11.3f}")


def _small_entry(src: Path) -> Path:
    """50 files of 2000 random bytes, written an hour ago, as a cache's files are by the time a job
    saves them (files written in the save's own second get no listing: a restore could vouch for
    none of them)."""
    (src / "d").mkdir(parents=True)
    for i in range(50):
        (src / "d" / f"f{i}").write_bytes(os.urandom(2000))
    hour_ago = time.time() - 3600
    for path in (src / "d", *(src / "d").iterdir()):
        os.utime(path, (hour_ago, hour_ago))
    return src


if __name__ == "__main__":
    main()
