"""The save's walk in a forked child (:mod:`remote_cache.cache.prewalk`): what it finds, that a
save takes it, and that no child outlives what asked for it.

Each case runs in a fresh interpreter: a process with other threads (pytest's, anyio's idle
workers) never forks, by design.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from remote_cache.cpus import usable_cpus
from tests.trees import socket_file

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or usable_cpus() < 2, reason="forks only on Linux with 2+ CPUs to use"
)

_PRELUDE = """
import os, signal, sys, threading, time
from pathlib import Path
import anyio
from remote_cache.cache import state as state_file
from remote_cache.cache.evidence import Evidence, TreeRecord
from remote_cache.cache.prewalk import PreWalk, walk

def known(path, tag="k"):
    # A whole tree recorded for the path under the tag (as a save there leaves): a prewalk's cue.
    digest = "sha256:" + "0" * 64
    record = TreeRecord(digest, "oci:elsewhere", tag, "options", digest, 0, 0, 0, 0)
    assert state_file.record_save(path, Evidence(), [], record)
    return path

from tests.processes import children as children_of, process_state as state

def children():
    return children_of(os.getpid())

def gone(pid):
    return state(pid) == "-"

def stopped_child(tree):
    # A prewalk whose child is stopped mid-walk (SIGSTOP: as one stuck on a dead mount); a child
    # that ended before the stop landed is reaped and another one started. A process with other
    # threads never forks: an earlier anyio.run's worker thread ends after its loop closed, later
    # on a loaded machine (then no child was started, and the test failed).
    deadline = time.monotonic() + 10
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(50):
        pre = PreWalk.start(tree, "k")
        [pid] = children()
        os.kill(pid, signal.SIGSTOP)
        while state(pid) not in ("T", "Z"):  # (a stop lands on a sleeping child when it wakes)
            time.sleep(0.001)
        if state(pid) == "T":
            return pre, pid
        pre.close()
    raise AssertionError("no child could be stopped mid-walk")
"""


_END = "\nsys.stdout.flush()\nos._exit(0)\n"


def _in_fresh_process(code: str, *args: str, state: Path) -> str:
    """Run ``code`` (after the prelude) in a new interpreter keeping its state in ``state``; its
    stdout, or the test fails."""
    done = subprocess.run(
        # (Ended by os._exit as the CLI is: no wait for idle worker threads.)
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code) + _END, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "REMOTE_CACHE_STATE_DIR": str(state)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _awkward_tree(root: Path) -> Path:
    for i in range(300):
        d = root / f"d{i % 7}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"x" * i)
    (root / "link").symlink_to("d0")
    os.mkfifo(root / "d1" / "pipe")
    socket_file(root / "d2" / "s.sock")
    (root / ".wh.hidden").write_text("named like a whiteout")
    (root / os.fsdecode(b"not-utf8-\xff")).write_text("a name that is not UTF-8")
    return root


def _subtrees(root: Path, dirs: int = 50, files: int = 100) -> Path:
    """A tree of ``dirs`` directories of ``files`` empty files: a walk long enough to be caught
    mid-way, in parts a split deals out."""
    for i in range(dirs):
        (root / f"d{i:02d}").mkdir(parents=True)
        for j in range(files):
            os.close(os.open(root / f"d{i:02d}" / f"f{j:03d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def test_the_child_finds_what_a_walk_here_finds(tmp_path: Path) -> None:
    tree = _awkward_tree(tmp_path / "tree")
    out = _in_fresh_process(
        """
        tree = known(Path(sys.argv[1]))
        pre = PreWalk.start(tree, "k")
        assert pre is not None and len(children()) == 1
        got = anyio.run(pre.result)
        here = walk(tree)
        assert got is not None
        assert got.identity.digest == here.identity.digest
        assert (got.identity.ctimes, got.identity.facts, got.identity.top) == (
            here.identity.ctimes, here.identity.facts, here.identity.top)
        assert (got.root, got.mounts, got.skipped) == (here.root, here.mounts, here.skipped)
        assert got.bound <= here.bound
        assert children() == []  # reaped
        print(sorted(s.kind for s in got.skipped))
        """,
        str(tree),
        state=tmp_path / "state",
    )
    assert out.split("\n")[0] == "['fifo', 'named like an OCI whiteout', 'socket']"


def test_a_walk_the_save_shares_is_the_same_walk(tmp_path: Path) -> None:
    """The child stopped as soon as it is forked: the save takes every part still left and walks
    them, then reads the child's (none, or the one it took) once it goes on."""
    tree = _subtrees(tmp_path / "tree")
    out = _in_fresh_process(
        """
        import logging
        logging.getLogger("remote_cache").addHandler(logging.StreamHandler(sys.stdout))
        logging.getLogger("remote_cache").setLevel(logging.DEBUG)
        tree = known(Path(sys.argv[1]))
        pre, pid = stopped_child(tree)
        threading.Timer(0.5, os.kill, (pid, signal.SIGCONT)).start()
        got = anyio.run(pre.result)
        assert got is not None and got.identity == walk(tree).identity
        assert children() == []
        """,
        str(tree),
        state=tmp_path / "state",
    )
    here, total = re.fullmatch(
        r"the save's first walk: (\d+) of (\d+) parts walked here, the rest by its child", out.strip()
    ).groups()
    assert 0 < int(here) <= int(total) == 50


def test_a_child_that_dies_gives_none(tmp_path: Path) -> None:
    """A tree that cannot be looked at forks nothing, and a child that dies before it answers
    gives nothing: the save then walks itself (and reports what is wrong)."""
    tree = _subtrees(tmp_path / "tree")
    _in_fresh_process(
        """
        assert PreWalk.start(known(Path(sys.argv[1]) / "missing"), "k") is None and children() == []
        pre, pid = stopped_child(known(Path(sys.argv[1])))
        os.kill(pid, signal.SIGKILL)
        assert anyio.run(pre.result) is None
        assert children() == []
        """,
        str(tree),
        state=tmp_path / "state",
    )


def test_close_kills_a_child_that_never_answers(tmp_path: Path) -> None:
    """A child stopped mid-walk (SIGSTOP: as one stuck on a dead mount) is killed and reaped by
    close(), and a result() waited for under a deadline gives up instead of hanging."""
    tree = _subtrees(tmp_path / "tree")
    _in_fresh_process(
        """
        tree = known(Path(sys.argv[1]))
        for stop_first in ("close", "cancel"):
            pre, pid = stopped_child(tree)
            started = time.monotonic()
            if stop_first == "close":
                pre.close()
            else:
                async def ask():
                    with anyio.move_on_after(0.3):
                        await pre.result()
                        raise AssertionError("a stopped child answered")
                anyio.run(ask)
            assert time.monotonic() - started < 5
            assert children() == [] and gone(pid), stop_first
            assert anyio.run(pre.result) is None  # asked again: nothing, and no hang
        """,
        str(tree),
        state=tmp_path / "state",
    )


def test_no_child_while_other_threads_run_or_no_tree_is_known_for_the_tag(tmp_path: Path) -> None:
    _in_fresh_process(
        """
        tree = Path(sys.argv[1])
        assert PreWalk.start(tree, "k") is None and children() == []  # nothing recorded here
        known(tree, "other")
        assert PreWalk.start(tree, "k") is None and children() == []  # a tree, but for another tag
        known(tree)
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        try:
            assert PreWalk.start(tree, "k") is None and children() == []
        finally:
            stop.set()
            other.join()
        assert PreWalk.start(tree, "k") is not None
        """,
        str(tmp_path),
        state=tmp_path / "state",
    )


def test_a_save_takes_the_tree_its_prewalk_saw(tmp_path: Path) -> None:
    """The child's walk is what the save judges: a change made after the child walked (here while
    it waits to be read) is not seen by that save, as one made just after a save's own walk would
    not be; the next save sees it."""
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_text("first")
    saves = """
        from remote_cache.cache import evidence
        from remote_cache.cache.save import save
        from remote_cache.oci.reference import parse_reference
        from tests.stores import opened
        from tests.trees import settle_ctimes

        evidence.FRESH_NS = 0  # a tree written a moment ago may get a fingerprint
        tree, layout, first = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "first"
        settle_ctimes()
        # Forked before the saves: their worker threads would stop it.
        pre = None if first else PreWalk.start(tree, "k")

        async def main():
            async with opened(parse_reference(f"oci:{layout}")) as store:
                if first:
                    print((await save(store, "k", tree)).unchanged)
                    return
                while any(state(child) != "Z" for child in children()):
                    time.sleep(0.005)  # the child (if the tree needs one) has walked, answered, ended
                (tree / "a" / "f").write_text("second")
                taken = await save(store, "k", tree, prewalk=pre)
                assert children() == []
                again = await save(store, "k", tree)
                print(taken.unchanged, again.unchanged)

        anyio.run(main)
        """
    layout, state = str(tmp_path / "layout"), tmp_path / "state"
    assert _in_fresh_process(saves, str(tree), layout, "first", state=state).split() == ["False"]
    assert _in_fresh_process(saves, str(tree), layout, "then", state=state).split() == ["True", "False"]


def test_a_signal_during_the_fork_leaves_no_child_and_no_blocked_signal(tmp_path: Path) -> None:
    """A Ctrl-C landing while the child is forked (here sent from an at-fork hook) reaches the
    parent once the fork is done, as a KeyboardInterrupt, with the child killed and reaped, its
    pipes closed and the signal mask as it was."""
    tree = _subtrees(tmp_path / "tree")
    _in_fresh_process(
        """
        tree = known(Path(sys.argv[1]))
        fds = sorted(os.listdir("/proc/self/fd"))
        os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGINT))
        try:
            PreWalk.start(tree, "k")
            raise AssertionError("the Ctrl-C was lost")
        except KeyboardInterrupt:
            pass
        assert children() == []
        assert sorted(os.listdir("/proc/self/fd")) == fds
        assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == set()
        """,
        str(tree),
        state=tmp_path / "state",
    )


def test_a_swap_finished_by_the_save_drops_its_prewalk(tmp_path: Path) -> None:
    """A restore killed in place once its swap was journaled, its work appearing after the child
    walked: the save finishes the swap and saves the tree it left, not the child's walk."""
    tree = _subtrees(tmp_path / "tree", dirs=10, files=2)
    (tree / "d00" / "f000").write_text("old")
    saves = """
        from remote_cache.archive.swap import JOURNAL
        from remote_cache.archive.target import IN_PLACE_PREFIX
        from remote_cache.cache import evidence
        from remote_cache.cache.save import save
        from remote_cache.oci.reference import parse_reference
        from tests.stores import opened
        from tests.trees import settle_ctimes

        evidence.FRESH_NS = 0  # a tree written a moment ago may get a fingerprint
        tree, layout, first = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "first"
        settle_ctimes()
        pre = None if first else PreWalk.start(tree, "k")  # (before the save's threads)
        assert first or children() != [], "no child to test"

        async def main():
            async with opened(parse_reference(f"oci:{layout}")) as store:
                if first:
                    await save(store, "k", tree)
                    return
                while any(state(child) != "Z" for child in children()):
                    time.sleep(0.005)  # the child has walked the tree as it was
                work = tree / f"{IN_PLACE_PREFIX}killed"  # then a killed restore's work appears
                (work / "staging" / "d00").mkdir(parents=True)
                (work / "staging" / "d00" / "f000").write_text("new")
                (work / "old").mkdir()
                (work / "lock").write_text("")
                (work / JOURNAL).write_text(
                    '{"staging": "staging", "old": ["d00"], "new": ["d00"], "remove_old": false}'
                )
                work.chmod(0o700)
                saved = await save(store, "k", tree, prewalk=pre)
                print(saved.unchanged, (tree / "d00" / "f000").read_text())

        anyio.run(main)
        """
    layout, state = str(tmp_path / "layout"), tmp_path / "state"
    _in_fresh_process(saves, str(tree), layout, "first", state=state)
    assert _in_fresh_process(saves, str(tree), layout, "then", state=state).split() == ["False", "new"]
