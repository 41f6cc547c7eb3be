"""Real signals to a real ``remote-cache`` process: what it leaves behind, and what the next run cleans.

Each transfer is held in place by the fault proxy (a stalled blob request) so the signal lands
mid-transfer every time; the packing case polls for the save's spool directory instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from remote_cache.archive.swap import JOURNAL
from remote_cache.archive.target import IN_PLACE_PREFIX
from remote_cache.cpus import usable_cpus
from tests.cli.output import CLI, clean_env
from tests.mounts import tmpfs
from tests.object_servers import new_bucket, object_env
from tests.processes import children, process_state
from tests.registry_server import FaultProxy, RegistryServer
from tests.trees import assert_same_tree, make_tree, snapshot


def _env(tmp_path: Path, pycache: Path) -> dict[str, str]:
    """The CLI tests' clean environment, with a temporary directory of this test's own."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**clean_env(tmp_path, pycache), "TMPDIR": str(tmpdir)}


def _run(env: dict[str, str], *args: str) -> int:
    """Run the console script to its end: its exit code."""
    return subprocess.run([str(CLI), *args], env=env).returncode


def _start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(CLI), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def _stalled(proxy: FaultProxy, method: str) -> Callable[[], bool]:
    return lambda: any(r.outcome == "stall" and r.method == method for r in proxy.requests)


def _stalled_restore(
    proxy: FaultProxy, ref: str, target: Path, env: dict[str, str], times: int
) -> subprocess.Popen[str]:
    """A restore started, and held by the proxy once its first blob download is under way."""
    proxy.stall(after_bytes=1024, method="GET", path_contains="/blobs/", times=times)
    proc = _start(["restore", ref, str(target)], env)
    _wait_for(_stalled(proxy, "GET"), "the restore to be mid-download")
    return proc


def _stalled_save(
    proxy: FaultProxy, src: Path, ref: str, env: dict[str, str], times: int
) -> subprocess.Popen[str]:
    """A save started, and held by the proxy at its first blob upload."""
    proxy.stall(method="PUT", path_contains="/blobs/uploads/", times=times)
    proc = _start(["save", str(src), ref], env)
    _wait_for(_stalled(proxy, "PUT"), "the save to be mid-upload")
    return proc


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` was sent to process ``pid`` and is not delivered yet."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("ShdPnd:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs if d.exists() for p in d.iterdir() if "remote-cache" in p.name)


@pytest.fixture
def served(registry: RegistryServer, repo_name: str, fault_proxy_factory: Any) -> Any:
    proxy: FaultProxy = fault_proxy_factory(registry)
    return proxy, f"{proxy.host}/{repo_name}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_restore_cleans_up_and_leaves_the_target(
    served: Any, tmp_path: Path, pycache: Path, signum: int
) -> None:
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=200, big_bytes=4 << 20)
    assert _run(env, "save", str(src), f"{repo}:k", "-q") == 0
    target = tmp_path / "work" / "target"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("the old tree")
    before = snapshot(target)
    proc = _stalled_restore(proxy, f"{repo}:k", target, env, times=100)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"remote-cache: interrupted by {signal.Signals(signum).name}"
    assert snapshot(target) == before
    assert _leftovers(target.parent, target, Path(env["TMPDIR"])) == []


def test_a_signal_during_a_save_cleans_up_and_keeps_the_entry(
    served: Any, tmp_path: Path, pycache: Path
) -> None:
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=200, big_bytes=4 << 20)
    proc = _stalled_save(proxy, src, f"{repo}:k", env, times=100)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "unexpected" not in err
    assert _leftovers(Path(env["TMPDIR"])) == []
    proxy.clear()
    assert _run(env, "restore", f"{repo}:k", str(tmp_path / "o")) == 3, "an interrupted save moved no tag"


def test_a_signal_while_the_tag_is_written_lets_the_save_finish(
    served: Any, tmp_path: Path, pycache: Path
) -> None:
    """The tag write is where a save commits: a signal arriving during it lets it finish, "saved"
    and exit 0, as a restore's swap does. (It said "interrupted", exit 143, with the entry
    replaced all the same once the write had gone out.)"""
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=20, big_bytes=1 << 16)
    proxy.slow_upload(100, method="PUT", path_contains="/manifests/k")  # the tag: ~10 s to send
    proc = _start(["save", str(src), f"{repo}:k"], env)
    platforms = lambda: sum(r.method == "PUT" and "/manifests/sha256:" in r.path for r in proxy.requests)  # noqa: E731
    _wait_for(lambda: platforms() == 2, "the save to write its platforms' manifests")
    time.sleep(0.5)  # the tag's PUT is under way
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("save saved k:"), err
    proxy.clear()
    assert _run(env, "restore", f"{repo}:k", str(tmp_path / "o")) == 0
    assert_same_tree(src, tmp_path / "o")


def test_the_deadline_still_ends_a_save_whose_tag_write_stalls(
    served: Any, tmp_path: Path, pycache: Path
) -> None:
    """A signal lets the tag write finish; ``--deadline`` does not wait for it (it bounds the
    whole step): a stalled tag write ends at the deadline, not at the stall timeout."""
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=20, big_bytes=1 << 16)
    proxy.stall(method="PUT", path_contains="/manifests/k", times=10)
    started = time.monotonic()
    proc = subprocess.run(
        [str(CLI), "save", str(src), f"{repo}:k", "--timeout", "20", "--deadline", "3s"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert time.monotonic() - started < 10, proc.stderr
    assert proc.returncode == 1 and "--deadline" in proc.stderr, proc.stderr


def test_ctrl_c_while_packing_never_says_unexpected(tmp_path: Path, pycache: Path) -> None:
    """A Ctrl-C that lands while layers are being packed (into a layout: no network to wait on)."""
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=3000, big_bytes=48 << 20)
    spool = Path(env["TMPDIR"])
    interrupted = 0
    for attempt in range(3):
        proc = _start(["save", str(src), f"oci:{tmp_path / 'layout'}:k{attempt}", "--full"], env)
        _wait_for(lambda p=proc: _leftovers(spool) != [] or p.poll() is not None, "packing to start")
        time.sleep(0.05 * attempt)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        if proc.returncode == 0:
            continue  # it finished first: nothing to show
        interrupted += 1
        assert proc.returncode == 130, err
        assert err.strip() == "remote-cache: interrupted by SIGINT", err
        assert _leftovers(spool) == []
    assert interrupted, "every save finished before its SIGINT landed: nothing was shown"


def test_a_killed_restore_and_save_leave_work_the_next_run_removes(
    served: Any, tmp_path: Path, pycache: Path
) -> None:
    """SIGKILL cannot be cleaned up after: the next run finds the dead run's work directories
    (their lock is free) and removes them."""
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=200, big_bytes=4 << 20)
    saving = _stalled_save(proxy, src, f"{repo}:k", env, times=1)
    saving.kill()
    saving.communicate(timeout=30)
    spool = Path(env["TMPDIR"])
    assert _leftovers(spool) != [], "a killed save leaves its spool"

    proxy.clear()
    assert _run(env, "save", str(src), f"{repo}:k", "-q") == 0
    assert _leftovers(spool) == [], "the next save removed the dead one's spool"

    target = tmp_path / "target"
    restoring = _stalled_restore(proxy, f"{repo}:k", target, env, times=1)
    restoring.kill()
    restoring.communicate(timeout=30)
    assert _leftovers(tmp_path) != [], "a killed restore leaves its work directory"
    proxy.clear()
    assert _run(env, "restore", f"{repo}:k", str(target), "-q") == 0
    assert _leftovers(tmp_path) == []
    assert_same_tree(src, target)


def test_a_second_signal_stops_at_once(served: Any, tmp_path: Path, pycache: Path) -> None:
    """Clean-up waits for what is in flight; a second signal does not wait (rc 128+signal)."""
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=50, big_bytes=1 << 20)
    assert _run(env, "save", str(src), f"{repo}:k", "-q") == 0
    proc = _stalled_restore(proxy, f"{repo}:k", tmp_path / "t", env, times=100)
    proc.send_signal(signal.SIGTERM)
    # A second SIGTERM sent while the first is still pending would be merged into it by the
    # kernel: one signal, its clean-up run to the end, and rc 143 all the same.
    _wait_for(lambda: not _pending(proc.pid, signal.SIGTERM), "the first SIGTERM's delivery", interval=0.001)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode in (143, -signal.SIGTERM)
    assert "interrupted by" not in err, f"the first signal's clean-up ran to its end: {err}"


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="signals and flock as on Linux")


def _flat_tree(root: Path, letter: str) -> Path:
    """Many top-level entries: an in-place swap of them takes long enough to interleave."""
    root.mkdir(parents=True)
    for i in range(3000):
        (root / f"{letter}{i:05d}").write_bytes(letter.encode() * 10)
    (root / "common").write_bytes(letter.encode())
    return root


@pytest.mark.parametrize("b_in_place", [True, False], ids=["both-in-place", "one-exchanges"])
def test_concurrent_restores_into_one_target_end_as_one_tree(
    tmp_path: Path, pycache: Path, b_in_place: bool
) -> None:
    env = _env(tmp_path, pycache)
    layout = f"oci:{tmp_path / 'layout'}"
    trees = {name: _flat_tree(tmp_path / f"tree-{name}", name) for name in ("a", "b")}
    for name, tree in trees.items():
        assert _run(env, "save", str(tree), f"{layout}:{name}", "-q") == 0
    expected = {name: snapshot(tree) for name, tree in trees.items()}
    target = tmp_path / "out" / "t"
    ends = set()
    for _round in range(4):
        subprocess.run(["rm", "-rf", str(target.parent)], check=True)
        target.mkdir(parents=True)
        (target / "old").write_text("old")
        # The current directory is restored in place (entries swapped); a path elsewhere is
        # exchanged whole, unless another run works inside it.
        a = subprocess.Popen(
            [str(CLI), "restore", f"{layout}:a", ".", "--force", "-q"],
            cwd=target,
            env=env,
            stderr=subprocess.PIPE,
        )
        b_args, b_cwd = ([".", "--force"], target) if b_in_place else ([str(target)], tmp_path)
        b = subprocess.Popen(
            [str(CLI), "restore", f"{layout}:b", *b_args, "-q"], cwd=b_cwd, env=env, stderr=subprocess.PIPE
        )
        for proc in (a, b):
            _out, err = proc.communicate(timeout=120)
            if proc is a and not b_in_place and proc.returncode == 2:
                # b exchanged the directory a runs in before a began: a's current directory is
                # gone, and a says so (b's tree stands whole).
                assert b"current directory no longer exists" in err, err
                continue
            assert proc.returncode == 0, err
        got = snapshot(target)
        ends.add(next((name for name, tree in expected.items() if tree == got), "mixed"))
        assert _leftovers(target, target.parent) == []
    assert "mixed" not in ends, f"rounds ended as {ends}"


def _signal_at_the_swap(ref: str, target: Path, env: dict[str, str], signum: int, in_place: bool) -> int:
    """Restore ``ref`` over ``target`` (exchanged whole, or in place as the current directory) and
    send ``signum`` once the new tree's last entry is there; the exit code, checked against the
    target: 0 and the new tree, or interrupted and the old one."""
    before, last = snapshot(target), target / "n02999"
    where = ([".", "--force"], target) if in_place else ([str(target)], None)
    proc = _start(["restore", ref, *where[0], "-q"], env, cwd=where[1])
    _wait_for(lambda: os.path.lexists(last) or proc.poll() is not None, "the swap", interval=0)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        assert proc.returncode == 128 + signum, err
        assert snapshot(target) == before, "interrupted, over the new tree"
    assert _leftovers(target, target.parent) == []
    return proc.returncode


@pytest.mark.parametrize(
    ("signum", "in_place"), [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)]
)
def test_a_signal_once_the_new_tree_is_in_place_is_a_success(
    tmp_path: Path, pycache: Path, signum: signal.Signals, in_place: bool
) -> None:
    """The signal lands once the new tree is there (the old one, 6000 entries, still being
    removed): the restore is done, and its exit code says so. It used to exit 130/143,
    "interrupted", over a target already holding the new tree."""
    env = _env(tmp_path, pycache)
    ref = f"oci:{tmp_path / 'layout'}:k"
    new = _flat_tree(tmp_path / "new", "n")
    assert _run(env, "save", str(new), ref, "-q") == 0
    outcomes = []
    for _round in range(3):
        target = tmp_path / "target"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        old = _flat_tree(target, "o")
        for i in range(3000):
            (old / f"p{i:05d}").write_bytes(b"o")
        outcomes.append(_signal_at_the_swap(ref, target, env, signum, in_place))
        if outcomes[-1] == 0:
            assert snapshot(target) == snapshot(new)
    assert 0 in outcomes, f"never signalled after the swap: {outcomes}"


def _under_flock(directory: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``flock DIRECTORY remote-cache ARGS``, its whole process group killed if it runs a minute."""
    proc = subprocess.Popen(
        ["flock", str(directory), str(CLI), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"remote-cache {' '.join(args)} hung under flock") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_save_does_not_wait_for_a_lock_on_its_directory(tmp_path: Path, pycache: Path) -> None:
    """``flock DIR CMD`` guards a cache directory: a save of DIR run under it must not wait for
    that lock (it hung, past --deadline and the first SIGTERM). Only a dead restore's unfinished
    swap there makes it wait, and then --deadline stops it."""
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=20, big_bytes=1 << 20)
    ref = f"oci:{tmp_path / 'layout'}:k"
    proc = _under_flock(src, ["save", str(src), ref, "-q"], env)
    assert proc.returncode == 0, proc.stderr
    work = src / ".remote-cache-restore-dead"  # what a restore killed in place leaves: 0700, free lock
    work.mkdir(mode=0o700)
    (work / "lock").write_text("")
    proc = _under_flock(src, ["save", str(src), ref, "--deadline", "2s"], env)
    assert proc.returncode == 1 and "--deadline" in proc.stderr, proc.stderr


def _restored_for_a_prewalk(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """A tree restored from an entry (the evidence that makes its save walk first, in a child:
    remote_cache.cache.prewalk) with 50 directories of 100 files (a walk that lasts a while), and
    the entry's reference."""
    src = tmp_path / "src"
    an_hour_ago = time.time() - 3600  # (files of the save's own second get no listing: no evidence)
    for i in range(50):
        (src / f"d{i:02d}").mkdir(parents=True)
        for j in range(100):
            os.close(os.open(src / f"d{i:02d}" / f"f{j:03d}", os.O_CREAT | os.O_WRONLY, 0o644))
            os.utime(src / f"d{i:02d}" / f"f{j:03d}", (an_hour_ago, an_hour_ago))
        os.utime(src / f"d{i:02d}", (an_hour_ago, an_hour_ago))
    ref = f"oci:{tmp_path / 'layout'}:k"
    assert _run(env, "save", str(src), ref, "-q") == 0
    assert _run(env, "restore", ref, str(tmp_path / "restored"), "-q") == 0
    return tmp_path / "restored", ref


def _with_its_child_stopped(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """The CLI started, and the child it forked for the save's walk stopped mid-walk (SIGSTOP:
    as one stuck on a dead mount); a run whose child ended first is let finish, and run again."""
    for _ in range(20):
        proc = _start(args, env)
        child = _first_child(proc)
        if child and _walking(child):
            os.kill(child, signal.SIGSTOP)
            _wait_for(partial(_stop_landed, child), "the stop to land", interval=0.001)
            if process_state(child) == "T":
                return proc, child
        proc.communicate(timeout=30)
    raise AssertionError("no child could be stopped mid-walk")


def _first_child(proc: subprocess.Popen[str]) -> int:
    """The first child process ``proc`` forks, as soon as it appears; 0 if it ends without one."""
    while proc.poll() is None:
        if forked := children(proc.pid):
            return forked[0]
    return 0


def _walking(pid: int) -> bool:
    """Wait until the child has let go of the streams it shared with its parent (its first
    step): True, or False when it ended first."""
    while True:
        try:
            if os.readlink(f"/proc/{pid}/fd/1") == os.devnull:
                return True
        except OSError:
            return False


def _stop_landed(pid: int) -> bool:
    return process_state(pid) in "TZ-"


@pytest.mark.skipif(usable_cpus() < 2, reason="the save walks in a child only with 2+ CPUs to use")
def test_a_signal_while_the_save_waits_for_its_walk_leaves_no_child(tmp_path: Path, pycache: Path) -> None:
    """A stopped child must not hold the save past a signal, nor outlive it."""
    env = _env(tmp_path, pycache)
    restored, ref = _restored_for_a_prewalk(tmp_path, env)
    proc, child = _with_its_child_stopped(["save", str(restored), ref], env)
    try:
        time.sleep(0.5)  # the save waits for the walk
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:  # (a failure here must not leave either behind)
        if process_state(child) == "T":
            os.kill(child, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "remote-cache: interrupted by SIGTERM"
    assert process_state(child) == "-"
    assert _leftovers(Path(env["TMPDIR"])) == []


@pytest.mark.skipif(usable_cpus() < 2, reason="the save walks in a child only with 2+ CPUs to use")
def test_a_save_that_ends_before_its_walk_leaves_no_child_behind(tmp_path: Path, pycache: Path) -> None:
    """A usage error found after the child was forked ends the save at once: the caller's pipes
    close with it (the child holds none of its streams), and the child, left alone, ends too."""
    env = _env(tmp_path, pycache)
    restored, ref = _restored_for_a_prewalk(tmp_path, env)
    proc, child = _with_its_child_stopped(["save", str(restored), ref, "--username", "bob"], env)
    try:
        _out, err = proc.communicate(timeout=10)  # (hung while the child held stdout and stderr)
        assert proc.returncode == 2 and "needs a password" in err, err
        assert process_state(child) == "T"  # alive, stopped: its parent is gone
        os.kill(child, signal.SIGCONT)
        _wait_for(lambda: process_state(child) in "Z-", "the child to see its parent gone", timeout=5)
    finally:
        if process_state(child) in "TRSD":
            os.kill(child, signal.SIGKILL)


def test_a_save_reads_the_tree_a_dead_swap_it_finishes_leaves(tmp_path: Path, pycache: Path) -> None:
    """A restore killed in place once its swap was journaled: the save finishes the swap, then
    saves what it left (the new tree), not the tree a walk before it would have seen (its first
    walk, which may run before, is not taken then)."""
    env = _env(tmp_path, pycache)
    src, target = tmp_path / "src", tmp_path / "target"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_text("old")
    an_hour_ago = time.time() - 3600  # (files of the save's own second get no listing: no evidence)
    for path in (src / "a" / "f", src / "a"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    ref = f"oci:{tmp_path / 'layout'}:k"
    assert _run(env, "save", str(src), ref, "-q") == 0
    assert _run(env, "restore", ref, str(target), "-q") == 0  # a whole tree recorded for k
    work = target / f"{IN_PLACE_PREFIX}killed"  # what the killed restore left, lock free
    (work / "staging" / "a").mkdir(parents=True)
    (work / "staging" / "a" / "f").write_text("new")
    (work / "old").mkdir()
    (work / "lock").write_text("")
    (work / JOURNAL).write_text('{"staging": "staging", "old": ["a"], "new": ["a"], "remove_old": false}')
    work.chmod(0o700)
    assert _run(env, "save", str(target), ref, "-q") == 0
    assert (target / "a" / "f").read_text() == "new" and not work.exists()
    assert _run(env, "restore", ref, str(tmp_path / "check"), "-q") == 0
    assert (tmp_path / "check" / "a" / "f").read_text() == "new"


@pytest.mark.parametrize(
    ("stop", "extra", "code", "last_line"),
    [
        ("SIGTERM", ("--json",), 143, "remote-cache: interrupted by SIGTERM"),
        ("SIGINT", ("--fail-open",), 130, "remote-cache: interrupted by SIGINT"),
        ("deadline", ("--deadline", "2s"), 1, "--deadline 2s: stopped and cleaned up"),
    ],
)
def test_a_bucket_request_that_stalls_does_not_hold_a_signal_or_the_deadline(
    moto: Any,
    fault_proxy_factory: Any,
    tmp_path: Path,
    pycache: Path,
    stop: str,
    extra: tuple[str, ...],
    code: int,
    last_line: str,
) -> None:
    """obstore's calls block a worker thread until the request ends (up to the stall timeout, ten
    times that for an upload): a signal or ``--deadline`` must not wait for them."""
    proxy: FaultProxy = fault_proxy_factory(moto)
    env = {**_env(tmp_path, pycache), **object_env(moto)}
    ref = f"s3://{new_bucket(moto)}/c:k"
    src = tmp_path / "src"
    make_tree(src, small_files=50, big_bytes=1 << 20)
    assert _run(env, "save", str(src), ref, "-q") == 0
    via_proxy = {**env, "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    changed = tmp_path / "changed"
    make_tree(changed, small_files=60, big_bytes=2 << 20)
    target = tmp_path / "work" / "target"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("the old tree")
    before = snapshot(target)
    for method, args in (("GET", ["restore", ref, str(target)]), ("PUT", ["save", str(changed), ref])):
        proxy.clear()
        proxy.stall(after_bytes=1024 if method == "GET" else None, method=method, path_contains="/blobs/",
                    times=100)  # fmt: skip
        started = time.monotonic()
        proc = _start([*args, "--timeout", "60", *extra], via_proxy)
        _wait_for(_stalled(proxy, method), f"the {args[0]} to stall")
        if stop != "deadline":
            proc.send_signal(getattr(signal, stop))
        try:
            out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == code, (args[0], err)
        if "--json" in extra:  # still one JSON object, saying what happened
            assert json.loads(out) == {"command": args[0], "outcome": "interrupted", "signal": stop,
                                       "exit_code": code}, out  # fmt: skip
        assert err.strip().splitlines()[-1].endswith(last_line), (args[0], err)
        assert time.monotonic() - started < 15, (args[0], err)
    assert snapshot(target) == before
    assert _leftovers(target.parent, target, Path(env["TMPDIR"])) == []
    out = tmp_path / "out"
    assert _run(env, "restore", ref, str(out), "-q") == 0, "the interrupted save kept the entry"
    assert_same_tree(src, out)


def test_a_failure_to_report_still_leaves_at_once(
    moto: Any, fault_proxy_factory: Any, tmp_path: Path, pycache: Path
) -> None:
    """The command leaves with ``os._exit`` on every path: stdout on a full disk makes reporting
    fail, and a normal interpreter exit would join the worker thread still held by a stalled
    bucket upload (ten times --timeout)."""
    proxy: FaultProxy = fault_proxy_factory(moto)
    proxy.stall(method="PUT", path_contains="/blobs/", times=100)
    env = {**_env(tmp_path, pycache), **object_env(moto), "AWS_ENDPOINT_URL": f"http://{proxy.host}"}
    src = tmp_path / "src"
    make_tree(src, small_files=5, big_bytes=200_000)
    started = time.monotonic()
    with open("/dev/full", "w") as full:
        args = [
            "save",
            str(src),
            f"s3://{new_bucket(moto)}/c:k",
            "--timeout",
            "3",
            "--deadline",
            "1s",
            "--json",
        ]
        proc = subprocess.run(
            [str(CLI), *args], env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 15, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_signal_during_extraction_stops_it_without_extracting_the_rest(
    tmp_path: Path, pycache: Path
) -> None:
    """Every layer downloaded (a local layout), the extraction under way: the signal waited for
    the extraction thread to go through every layer before the restore could end -- stopping
    took as long as finishing, and a runner's grace period (SIGTERM, then SIGKILL) ran out. Now
    the extraction stops before its next member: the restore ends within a small part of what
    finishing took. (On a tmpfs: 40,000 files on a disk take long to make, and vary.)"""
    env = _env(tmp_path, pycache)
    with tmpfs(tmp_path / "fast", "size=512m") as fast:
        src = fast / "src"
        for d in range(160):
            (src / f"d{d}").mkdir(parents=True)
            for f in range(250):
                (src / f"d{d}" / f"f{f}").write_bytes(b"x")
        ref = f"oci:{fast / 'layout'}:k"
        assert _run(env, "save", "-q", str(src), ref) == 0
        started = time.monotonic()
        assert _run(env, "restore", "-q", ref, str(fast / "full")) == 0
        whole = time.monotonic() - started
        target = fast / "work" / "target"
        target.mkdir(parents=True)
        proc = _start(["restore", "-q", ref, str(target)], env)
        staged = lambda: sum(1 for _ in (fast / "work").glob(".target.remote-cache-*/new/d1*/f*"))  # noqa: E731
        _wait_for(lambda: staged() >= 500, "the extraction to be under way", interval=0.005)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        after = time.monotonic() - signalled
        assert proc.returncode == 143, err
        assert after < 0.4 * whole, f"{after:.2f} s to stop, {whole:.2f} s to restore it all"
        assert os.listdir(target) == [] and _leftovers(target.parent) == []


def _sigint_when_imported(module: str) -> str:
    """A hook sending SIGINT when ``module`` is first about to be imported (an import finder's
    look; once, as a Ctrl-C is: an import it stopped is tried again by whoever needs it next)."""
    return f"""
        class Hook:
            fired = False
            def find_spec(self, name, path=None, target=None):
                if name == {module!r} and not self.fired:
                    self.fired = True
                    os.kill(os.getpid(), _signal.SIGINT)
                return None
        sys.meta_path.insert(0, Hook())
    """


#: Where a Ctrl-C is sent from, before the command runs: a hook at that point of the start-up.
_EARLY_HOOKS = {
    # while the standard library's first modules load, as the entry point begins (enum: signal's)
    "entering": _sigint_when_imported("enum"),
    # while the modules the package re-exports load (it did so before the entry point ran)
    "starting": _sigint_when_imported("remote_cache.errors"),
    # while the tool's modules load
    "loading": _sigint_when_imported("remote_cache.cli.commands"),
    # while typer builds the commands from their signatures (outside click's own handling)
    "building": """
        import typer.main
        build = typer.main.get_command
        def hooked(*args):
            os.kill(os.getpid(), _signal.SIGINT)
            return build(*args)
        typer.main.get_command = hooked
    """,
    # while click reads the command line (where typer turns a KeyboardInterrupt into exit 130)
    "parsing": """
        import importlib
        app = importlib.import_module("remote_cache.cli.app")
        spell = app._flag_values
        def hooked(args):
            os.kill(os.getpid(), _signal.SIGINT)
            return spell(args)
        app._flag_values = hooked
    """,
}


def _save_with_hook(hook: str, tmp_path: Path, pycache: Path) -> subprocess.CompletedProcess[str]:
    """``remote-cache save ... --json`` in a fresh interpreter, ``hook`` run first."""
    src = tmp_path / "src"
    make_tree(src, small_files=3)
    code = "\n".join(
        [
            # (_signal: the signal module's first import, enum's with it, is one the hooks watch)
            "import os, sys, _signal",
            # A Ctrl-C as a terminal delivers it: a shell's background job starts with SIGINT
            # ignored, and Python then leaves it ignored until the command's loop takes it.
            "_signal.signal(_signal.SIGINT, _signal.default_int_handler)",
            textwrap.dedent(hook),
            "sys.argv[0] = 'remote-cache'",
            "from remote_cache.cli import main",
            "main()",
        ]
    )
    args = ["save", str(src), f"oci:{tmp_path / 'layout'}:k", "--json"]
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=_env(tmp_path, pycache), capture_output=True, text=True
    )


@pytest.mark.parametrize("where", sorted(_EARLY_HOOKS))
def test_a_ctrl_c_before_the_command_runs_is_an_interruption(
    where: str, tmp_path: Path, pycache: Path
) -> None:
    """A Ctrl-C while the tool loads, while typer builds its commands or while it reads the
    command line ends the command as one during it does: exit 130 and its one line -- not a
    traceback, typer's silent 130, or an "unexpected KeyboardInterrupt" error (exit 1)."""
    proc = _save_with_hook(_EARLY_HOOKS[where], tmp_path, pycache)
    assert (proc.returncode, proc.stdout) == (130, ""), proc.stderr
    assert proc.stderr.splitlines() == ["remote-cache: interrupted by SIGINT"], proc.stderr


@pytest.mark.parametrize("where", ["loading", "building", "parsing", "starting its loop"])
def test_a_sigterm_before_the_command_runs_is_an_interruption(
    where: str, tmp_path: Path, pycache: Path
) -> None:
    """A SIGTERM (a CI runner cancelling the job) while the tool loads, builds its commands, reads
    the command line or starts its loop ends it as one during the command does: exit 143 and its
    one line, with --json its object once the options are read. It killed the tool in silence."""
    hook = _EARLY_HOOKS.get(where) or _sigint_when_imported("asyncio")
    proc = _save_with_hook(hook.replace("_signal.SIGINT", "_signal.SIGTERM"), tmp_path, pycache)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.splitlines() == ["remote-cache: interrupted by SIGTERM"], proc.stderr
    if where == "starting its loop":
        assert json.loads(proc.stdout)["outcome"] == "interrupted", proc.stdout
    else:
        assert proc.stdout == "", proc.stdout


def test_a_ctrl_c_once_the_options_are_read_gets_its_json(tmp_path: Path, pycache: Path) -> None:
    """Sent while the command starts its event loop (asyncio imported), the Ctrl-C is reported
    with the JSON object --json asked for."""
    proc = _save_with_hook(_sigint_when_imported("asyncio"), tmp_path, pycache)
    assert proc.returncode == 130, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "interrupted", proc.stdout
    assert proc.stderr.splitlines() == ["remote-cache: interrupted by SIGINT"], proc.stderr


#: Where the command is once its body returned: its event loop closing, its report written.
_SETTLED = {
    "closing": ("asyncio.runners", "Runner", "close"),
    "reporting": ("remote_cache.cli.app", "", "_report"),
}


def _signals_before(where: str, *signums: signal.Signals) -> str:
    """A hook sending ``signums`` to the command just before the function ``_SETTLED[where]`` runs."""
    module, owner, name = _SETTLED[where]
    sends = "".join(f"os.kill(os.getpid(), {int(s)}); " for s in signums)
    return f"""
        import importlib
        owner = importlib.import_module({module!r})
        owner = getattr(owner, {owner!r}) if {owner!r} else owner
        real = getattr(owner, {name!r})
        def hooked(*args):
            {sends}
            return real(*args)
        setattr(owner, {name!r}, hooked)
    """


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", sorted(_SETTLED))
def test_a_signal_while_the_outcome_is_reported_changes_nothing(
    when: str, signum: signal.Signals, tmp_path: Path, pycache: Path
) -> None:
    """The save is done once its body returned: a signal then (its event loop closing, its report
    written) neither changes its exit code nor adds a line saying it was interrupted. A SIGTERM
    there ended the process (no report, exit 143 for a save that was done), and a SIGINT while
    the loop closed said "interrupted" (exit 130); a second signal still leaves at once."""
    proc = _save_with_hook(_signals_before(when, signum), tmp_path, pycache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "saved", proc.stdout
    assert "interrupted" not in proc.stderr, proc.stderr
    (tmp_path / "twice").mkdir()
    twice = _save_with_hook(_signals_before(when, signum, signum), tmp_path / "twice", pycache)
    assert (twice.returncode, twice.stdout) == (128 + signum, ""), twice.stderr


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_sigint_ignored_from_the_start_stays_ignored(served: Any, tmp_path: Path, pycache: Path) -> None:
    """A script's background job starts with SIGINT ignored (job control off): a Ctrl-C meant
    for the script is not for it. The CLI ignored it only until its event loop installed a
    handler, then stopped (exit 130): a save interrupted 1 time in 4 by a SIGINT 0.2-0.5 s in.
    SIGTERM still stops it."""
    proxy, repo = served
    env = _env(tmp_path, pycache)
    src = tmp_path / "src"
    make_tree(src, small_files=200, big_bytes=4 << 20)
    assert _run(env, "save", str(src), f"{repo}:k", "-q") == 0
    for signum, code in ((signal.SIGINT, 0), (signal.SIGTERM, 143)):
        proxy.clear()
        proxy.stall(after_bytes=1024, method="GET", path_contains="/blobs/", times=1)
        target = tmp_path / f"out-{signum}"
        proc = subprocess.Popen(
            [str(CLI), "restore", f"{repo}:k", str(target), "--timeout", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ignoring_sigint,
        )  # fmt: skip
        _wait_for(_stalled(proxy, "GET"), "the restore to be mid-download")
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        if code == 0:
            assert_same_tree(src, target)
