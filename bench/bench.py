"""Benchmark ``remote-cache save``/``restore`` against raw tar+zstd and the usual peer tools, side by side.

Run from the checkout (everything lives in tmpfs, under ``--workdir``)::

    .venv/bin/python bench/bench.py --make-corpus path/to/make-corpus.sh --rounds 3
    .venv/bin/python bench/bench.py --store s3 --rounds 3

With ``--store registry`` (default) it starts its own loopback ``docker-registry`` and, for N
rounds in alternating order, times:

* raw:   ``tar | zstd -T0 -3`` + one blob POST/PUT  /  one blob GET + ``zstd -d | tar -x``;
* rc:    ``remote-cache save`` / ``remote-cache restore`` (the real console script);
* umoci: ``umoci init/new/insert`` + ``skopeo copy`` (gzip)  /  ``skopeo copy`` + ``umoci unpack``.

With ``--store s3`` it starts its own loopback S3 (moto, the test server) and times:

* raw:   ``tar | zstd -T0 -3`` + one ``aws s3 cp`` of the archive  /  ``aws s3 cp`` + ``zstd -d | tar -x``;
* rc:    ``remote-cache save`` / ``restore`` to ``s3://BUCKET/bench/...``;
* boto3: the same archive with boto3's own ``upload_file`` / ``download_file`` (its parallel
  multipart transfers), then ``zstd -d | tar -x``;

plus re-saves with remote-cache: with nothing changed, after adding one package (a copy of a ~1%
subset of the corpus under a new name), and of a one-file tree and a restore of it (the floors
of any save and restore: start-up, imports, requests). It prints medians and ratios against raw.
Machines are noisy: compare ratios from one run, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import layer_sizing  # this directory's, as the script's own

from remote_cache.cache.evidence import FRESH_NS

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/dev/shm/remote-cache-bench")
BIN = Path(sys.executable).parent
TARGETS = {"save": 1.25, "restore": 1.5}
COPY_SUFFIX = "-bench-copy"


# -------------------------------------------------------------------------------------------
# Registry


@dataclass
class Registry:
    """A loopback docker-registry the benchmark owns."""

    host: str
    stop: Callable[[], None]
    pid: int


def start_registry(workdir: Path) -> Registry:
    """Start docker-registry with storage under ``workdir`` (reusing the test helper when importable)."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        helper: Any = importlib.import_module("tests.registry_server")
    except ImportError:
        return _start_registry_fallback(workdir)
    finally:
        sys.path.remove(str(REPO_ROOT))
    server = helper.start_registry(workdir)
    return Registry(server.host, server.stop, server.process.pid)


def _start_registry_fallback(workdir: Path) -> Registry:
    import socket

    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v2/"
    for _ in range(300):
        with suppress(OSError):
            urllib.request.urlopen(url, timeout=1).close()
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise SystemExit(f"docker-registry did not start; see {workdir / 'registry.log'}")

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()

    return Registry(f"127.0.0.1:{port}", stop, proc.pid)


# -------------------------------------------------------------------------------------------
# Helpers


def sh(command: str | list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a command (a shell pipeline when a string), failing loudly with its stderr."""
    proc = subprocess.run(command, shell=isinstance(command, str), capture_output=True, **kw)
    if proc.returncode != 0:
        shown = command if isinstance(command, str) else " ".join(command)
        raise SystemExit(
            f"command failed ({proc.returncode}): {shown}\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far, and of theirs (a
    shell's pipeline counts once the shell has waited for it)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def tree_stats(root: Path) -> tuple[int, int]:
    """(regular-file bytes, entries) under root, symlinks not followed."""
    size = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                size += st.st_size
    return size, count


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -------------------------------------------------------------------------------------------
# The three methods


@dataclass
class Context:
    corpus: Path
    work: Path
    host: str
    cli: Path
    expected: tuple[int, int]
    env: dict[str, str]
    #: The store's server process: its CPU counts on the machine the methods run on.
    server_pid: int
    #: The S3 bucket, with --store s3 (``host`` is then the endpoint's host:port).
    bucket: str = ""
    results: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)
    #: time.monotonic() after which the corpus counts as settled (see remote_cache())
    settled_at: float = 0.0
    #: The +1 directory re-upload shares of the corpus (bench/layer_sizing.py), in %.
    sizing: list[float] = field(default_factory=list)
    #: The same for +1% in new files scattered over the tree (a hash-sharded cache's growth).
    scattered: list[float] = field(default_factory=list)

    def record(self, name: str, seconds: float) -> None:
        self.results.setdefault(name, []).append(seconds)

    def step(self, name: str, func: Callable[[], Any]) -> Any:
        """Run ``func`` as the step ``name``: record its wall time, the CPU of the processes it ran
        and the store's CPU during it."""
        store, own = process_cpu(self.server_pid), children_cpu()
        seconds, result = timed(func)
        self.record(name, seconds)
        self.note(f"{name}: own CPU", children_cpu() - own)
        self.note(f"{name}: store CPU", process_cpu(self.server_pid) - store)
        return result

    def note(self, name: str, value: float) -> None:
        self.extra.setdefault(name, []).append(value)

    def ref(self, name: str) -> str:
        """Where remote-cache keeps the entry ``name`` of this run: a repository, or a bucket prefix."""
        if self.bucket:
            return f"s3://{self.bucket}/bench/{name}:node-modules"
        return f"{self.host}/bench/{name}:node-modules"

    def check(self, method: str, root: Path) -> None:
        got = tree_stats(root)
        if got != self.expected:
            raise SystemExit(f"{method}: restored tree differs: (bytes, entries) {got} != {self.expected}")


def raw(ctx: Context, rnd: int) -> None:
    blob = ctx.work / "raw.blob"
    repo = f"bench/raw-{rnd}"
    base = f"http://{ctx.host}/v2/{repo}/blobs"

    def save() -> str:
        sh(f"tar -C '{ctx.corpus}' -cf - . | zstd -q -T0 -3 -o '{blob}' -f")
        digest = "sha256:" + sh(["sha256sum", str(blob)]).stdout.split()[0].decode()
        location = sh(["curl", "-sSf", "-X", "POST", "-D", "-", "-o", "/dev/null", f"{base}/uploads/"]).stdout
        loc = next(
            line.split(b":", 1)[1].strip().decode()
            for line in location.splitlines()
            if line.lower().startswith(b"location:")
        )
        url = loc if loc.startswith("http") else f"http://{ctx.host}{loc}"
        url += ("&" if "?" in url else "?") + "digest=" + digest
        sh(
            [
                "curl",
                "-sSf",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
                str(blob),
                url,
            ]
        )
        return digest

    digest = ctx.step("raw save", save)
    blob.unlink()
    out = fresh_dir(ctx.work / "raw-out")
    ctx.step("raw restore", lambda: sh(f"curl -sSfL '{base}/{digest}' | zstd -q -d | tar -C '{out}' -xf -"))
    if rnd == 0:
        ctx.check("raw", out)
    shutil.rmtree(out)


def remote_cache(ctx: Context, rnd: int) -> None:
    ref = ctx.ref(f"rc-{rnd}")

    def run(*args: str) -> dict[str, Any]:
        proc = sh([str(ctx.cli), *args, "--json", "--quiet"], env=ctx.env)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    # A save records a tree fingerprint only for a tree unchanged for FRESH_NS (the previous
    # round's "+1 package" edit may be that recent): let it settle, as any real cache has.
    wait = ctx.settled_at - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    data = ctx.step("rc save", lambda: run("save", str(ctx.corpus), ref))
    ctx.note("rc save, inside the CLI", data["seconds"])
    ctx.note("rc compressed MB", data["bytes_total"] / 1e6)
    ctx.note("rc layers", data["layers_total"])
    out = ctx.work / "rc-out"
    shutil.rmtree(out, ignore_errors=True)
    data = ctx.step("rc restore", lambda: run("restore", ref, str(out)))
    ctx.note("rc restore, inside the CLI", data["seconds"])
    if rnd == 0:
        ctx.check("remote-cache", out)
    # A CI job's end: save what it restored, unchanged, under the same key (this machine's state
    # knows the restore, as a fresh runner's would after its own restore).
    data = ctx.step("rc save after restore, unchanged", lambda: run("save", str(out), ref))
    ctx.note("save after restore: MB uploaded", data["bytes_uploaded"] / 1e6)
    shutil.rmtree(out)

    # Issue-4 preview: re-save with nothing changed, then after adding one package.
    data = ctx.step("rc re-save, unchanged", lambda: run("save", str(ctx.corpus), ref))
    ctx.note("re-save unchanged: MB uploaded", data["bytes_uploaded"] / 1e6)
    added, added_bytes = add_package(ctx.corpus)
    ctx.note("re-save +1 package: MB added", added_bytes / 1e6)
    try:
        data = ctx.step("rc re-save, +1 package", lambda: run("save", str(ctx.corpus), ref))
    finally:
        shutil.rmtree(added)
        ctx.settled_at = time.monotonic() + FRESH_NS / 1e9
    ctx.note("re-save +1 package: MB uploaded", data["bytes_uploaded"] / 1e6)

    # The floor of any save in a fresh process: a one-file tree, saved unchanged. Set up once,
    # untimed: a save records the tree's fingerprint (the unchanged save's shortcut) only for a
    # tree left alone for FRESH_NS, so its first save waits that long.
    tiny, tiny_ref = ctx.work / "one-file", ctx.ref("rc-one-file")
    if not tiny.is_dir():
        tiny.mkdir()
        (tiny / "a").write_text("a\n")
        time.sleep(FRESH_NS / 1e9 + 1)  # + 1 s: a filesystem with whole-second times
        run("save", str(tiny), tiny_ref)
    ctx.step("rc re-save, one-file tree", lambda: run("save", str(tiny), tiny_ref))
    # ... and of any restore: the one-file entry into a fresh directory.
    tiny_out = ctx.work / "one-file-out"
    shutil.rmtree(tiny_out, ignore_errors=True)
    ctx.step("rc restore, one-file entry", lambda: run("restore", tiny_ref, str(tiny_out)))
    shutil.rmtree(tiny_out)


def add_package(corpus: Path) -> tuple[Path, int]:
    """Copy the package directory closest to 1% of the corpus under a new name; return the copy."""
    modules = corpus / "node_modules" if (corpus / "node_modules").is_dir() else corpus
    total = tree_stats(corpus)[0]
    sizes = []
    for child in modules.iterdir():
        if child.is_dir() and not child.is_symlink() and not child.name.startswith((".", "@")):
            sizes.append((abs(tree_stats(child)[0] - total / 100), child))
    _, source = min(sizes)
    target = modules / f"{source.name}{COPY_SUFFIX}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    return target, tree_stats(target)[0]


def umoci_skopeo(ctx: Context, rnd: int) -> None:
    layout = ctx.work / "umoci-layout"
    dest = f"docker://{ctx.host}/bench/umoci-{rnd}:node-modules"

    def save() -> None:
        shutil.rmtree(layout, ignore_errors=True)
        sh(["umoci", "init", "--layout", str(layout)])
        sh(["umoci", "new", "--image", f"{layout}:t"])
        sh(["umoci", "insert", "--image", f"{layout}:t", str(ctx.corpus), "/"])
        sh(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:t", dest])

    ctx.step("umoci save", save)
    shutil.rmtree(layout)
    pulled = ctx.work / "umoci-pulled"
    bundle = ctx.work / "umoci-bundle"

    def restore() -> None:
        shutil.rmtree(pulled, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
        sh(["skopeo", "copy", "--quiet", "--src-tls-verify=false", dest, f"oci:{pulled}:t"])
        sh(["umoci", "unpack", "--image", f"{pulled}:t", str(bundle)])

    ctx.step("umoci restore", restore)
    if rnd == 0:
        ctx.check("umoci", bundle / "rootfs")
    shutil.rmtree(pulled)
    shutil.rmtree(bundle)


def _archive(ctx: Context, blob: Path) -> None:
    sh(f"tar -C '{ctx.corpus}' -cf - . | zstd -q -T0 -3 -o '{blob}' -f")


def _unpack(ctx: Context, blob: Path, method: str, rnd: int) -> None:
    out = fresh_dir(ctx.work / f"{method}-out")
    sh(f"zstd -q -d -c '{blob}' | tar -C '{out}' -xf -")
    if rnd == 0:
        ctx.check(method, out)
    shutil.rmtree(out)


def raw_s3(ctx: Context, rnd: int) -> None:
    """``tar | zstd -T0 -3`` and one ``aws s3 cp`` of the archive; back with ``aws s3 cp`` to stdout."""
    blob = ctx.work / "raw.blob"
    url = f"s3://{ctx.bucket}/bench/raw-{rnd}.tar.zst"
    aws = [str(BIN / "aws"), "--endpoint-url", f"http://{ctx.host}", "s3", "cp", "--only-show-errors"]

    def save() -> None:
        _archive(ctx, blob)
        sh([*aws, str(blob), url], env=ctx.env)

    ctx.step("raw save", save)
    blob.unlink()
    out = fresh_dir(ctx.work / "raw-out")
    download = " ".join([*aws, url, "-"])
    ctx.step("raw restore", lambda: sh(f"{download} | zstd -q -d | tar -C '{out}' -xf -", env=ctx.env))
    if rnd == 0:
        ctx.check("raw", out)
    shutil.rmtree(out)


#: boto3's own transfer of one file (upload_file / download_file: parallel multipart, ranged GETs).
BOTO3 = """
import sys, boto3
op, endpoint, bucket, key, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint)
if op == "up":
    s3.upload_file(path, bucket, key)
else:
    s3.download_file(bucket, key, path)
"""


def boto3_s3(ctx: Context, rnd: int) -> None:
    """The same archive through boto3's ``upload_file`` / ``download_file``."""
    blob = ctx.work / "boto3.blob"
    key = f"bench/boto3-{rnd}.tar.zst"
    python = [sys.executable, "-c", BOTO3]

    def save() -> None:
        _archive(ctx, blob)
        sh([*python, "up", f"http://{ctx.host}", ctx.bucket, key, str(blob)], env=ctx.env)

    ctx.step("boto3 save", save)
    blob.unlink()

    def restore() -> None:
        sh([*python, "down", f"http://{ctx.host}", ctx.bucket, key, str(blob)], env=ctx.env)
        _unpack(ctx, blob, "boto3", rnd)

    ctx.step("boto3 restore", restore)
    blob.unlink()


METHODS: dict[str, dict[str, Callable[[Context, int], None]]] = {
    "registry": {"raw": raw, "rc": remote_cache, "umoci": umoci_skopeo},
    "s3": {"raw": raw_s3, "rc": remote_cache, "boto3": boto3_s3},
}
LABELS = {
    "registry": {"raw": "raw tar+zstd, 1 blob", "rc": "remote-cache CLI", "umoci": "umoci + skopeo (gzip)"},
    "s3": {"raw": "tar+zstd + aws s3 cp", "rc": "remote-cache CLI", "boto3": "tar+zstd + boto3 upload"},
}


# -------------------------------------------------------------------------------------------
# Main


def ensure_corpus(corpus: Path, script: str | None) -> None:
    if corpus.is_dir() and any(corpus.iterdir()):
        for parent in (corpus, corpus / "node_modules"):  # left over by an interrupted run
            for stale in parent.glob(f"*{COPY_SUFFIX}") if parent.is_dir() else ():
                shutil.rmtree(stale)
        return
    if script is None:
        raise SystemExit(
            f"no corpus at {corpus}: pass --make-corpus path/to/make-corpus.sh (or --corpus DIR)"
        )
    print(f"building corpus in {corpus} with {script} (takes minutes) ...", file=sys.stderr)
    subprocess.run([script, str(corpus)], check=True)


def _paired(ctx: Context, method: str, step: str) -> tuple[float, str]:
    """``method``'s time for ``step`` over raw's, round by round (the two ran in the same round,
    next to each other in the default order, so the machine's drift between rounds cancels): the
    median ratio and the lowest-highest."""
    ratios = sorted(
        ours / raw
        for ours, raw in zip(ctx.results[f"{method} {step}"], ctx.results[f"raw {step}"], strict=True)
    )
    return statistics.median(ratios), f"{ratios[0]:.2f}-{ratios[-1]:.2f}"


def report(ctx: Context, rounds: int, methods: list[str], store: str) -> str:
    med = {name: statistics.median(values) for name, values in ctx.results.items()}
    lines = [
        f"store: {store}; corpus: {ctx.expected[0] / 1e6:.1f} MB in {ctx.expected[1]} entries; "
        f"rounds: {rounds} (medians; alternating order; x raw: the median of each round's own "
        "ratio, with the lowest and highest)",
        f"remote-cache ran on Python {platform.python_version()} at {os.path.realpath(sys.executable)}",
        "",
        f"| {'method':<24} | {'save s':>8} | {'x raw':>6} | {'range':>11} | {'restore s':>9} "
        f"| {'x raw':>6} | {'range':>11} |",
        f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|{'-' * 13}|{'-' * 11}|{'-' * 8}|{'-' * 13}|",
    ]
    labels = LABELS[store]
    paired = {
        (method, step): _paired(ctx, method, step) for method in methods for step in ("save", "restore")
    }
    for method in methods:
        save, restore = med[f"{method} save"], med[f"{method} restore"]
        (rs, rs_range), (rr, rr_range) = paired[method, "save"], paired[method, "restore"]
        lines.append(
            f"| {labels[method]:<24} | {save:8.2f} | {rs:6.2f} | {rs_range:>11} | {restore:9.2f} "
            f"| {rr:6.2f} | {rr_range:>11} |"
        )
    lines += _cpu(ctx, methods, labels)
    if "rc" in methods:
        rs, rr = paired["rc", "save"][0], paired["rc", "restore"][0]
        floor, tiny_restore = med["rc re-save, one-file tree"], med["rc restore, one-file entry"]
        lines += [
            "",
            f"targets: save <= {TARGETS['save']}x raw: {'met' if rs <= TARGETS['save'] else 'MISSED'} "
            f"({rs:.2f}x); restore <= {TARGETS['restore']}x raw: "
            f"{'met' if rr <= TARGETS['restore'] else 'MISSED'} ({rr:.2f}x)",
            "",
            f"| {'remote-cache re-save':<24} | {'seconds':>8} | {'MB uploaded':>12} |",
            f"|{'-' * 26}|{'-' * 10}|{'-' * 14}|",
            f"| {'nothing changed':<24} | {med['rc re-save, unchanged']:8.2f} "
            f"| {statistics.median(ctx.extra['re-save unchanged: MB uploaded']):12.2f} |",
            f"| {'after a restore, as is':<24} | {med['rc save after restore, unchanged']:8.2f} "
            f"| {statistics.median(ctx.extra['save after restore: MB uploaded']):12.2f} |",
            f"| {'+1 package (~1%)':<24} | {med['rc re-save, +1 package']:8.2f} "
            f"| {statistics.median(ctx.extra['re-save +1 package: MB uploaded']):12.2f} |",
            "",
            "save after a restore, unchanged: "
            f"{med['rc save after restore, unchanged'] / med['rc save']:.0%} of a cold save (target <= 10%); "
            f"an unchanged save of a one-file tree (the floor of a command: start-up, imports, a request) "
            f"{floor:.3f} s, {floor / med['rc save']:.0%}; a restore of a one-file entry "
            f"{tiny_restore:.3f} s, {tiny_restore / med['raw restore']:.2f}x the raw restore",
            f"remote-cache time inside the core's save()/restore() (after start-up and imports): save "
            f"{statistics.median(ctx.extra['rc save, inside the CLI']):.2f} s, restore "
            f"{statistics.median(ctx.extra['rc restore, inside the CLI']):.2f} s",
            f"package added: {statistics.median(ctx.extra['re-save +1 package: MB added']):.2f} MB; "
            f"full entry: {statistics.median(ctx.extra['rc compressed MB']):.1f} MB compressed in "
            f"{statistics.median(ctx.extra['rc layers']):.0f} layers",
            # The row above is one draw (the package nearest 1%); the planner's spread over many:
            f"+1 directory re-upload over {len(ctx.sizing)} draws (bench/layer_sizing.py, tar bytes): "
            + (layer_sizing.summary(ctx.sizing) if ctx.sizing else "no directory holds 0.4-2% of the tree"),
            f"+1% in new files scattered over the tree, as a hash-sharded cache grows (Go's build "
            f"cache, npm's _cacache), over {len(ctx.scattered)} draws: "
            + (layer_sizing.summary(ctx.scattered) if ctx.scattered else "no files"),
        ]
    return "\n".join(lines)


def _cpu(ctx: Context, methods: list[str], labels: dict[str, str]) -> list[str]:
    """CPU seconds per step (medians): the method's own processes, and the store server's, which
    runs on the same cores, so that its work on many small requests is part of the times above."""
    med = {name: statistics.median(values) for name, values in ctx.extra.items()}
    lines = [
        "",
        f"| {'CPU s (own / store)':<24} | {'save':>11} | {'restore':>11} |",
        f"|{'-' * 26}|{'-' * 13}|{'-' * 13}|",
    ]
    for method in methods:
        save, restore = (
            f"{med[f'{method} {step}: own CPU']:.2f} / {med[f'{method} {step}: store CPU']:.2f}"
            for step in ("save", "restore")
        )
        lines.append(f"| {labels[method]:<24} | {save:>11} | {restore:>11} |")
    return [
        *lines,
        f"(own: the method's processes; store: the server's; on the {os.cpu_count()} cores the "
        "times above were measured on)",
    ]


@dataclass
class Server:
    """The store a run talks to: a loopback registry, or a loopback S3 with one bucket."""

    host: str
    stop: Callable[[], None]
    pid: int
    bucket: str = ""
    env: dict[str, str] = field(default_factory=dict)


def start_server(store: str, workdir: Path) -> Server:
    if store == "registry":
        registry = start_registry(workdir)
        return Server(registry.host, registry.stop, registry.pid)
    sys.path.insert(0, str(REPO_ROOT))
    try:
        servers: Any = importlib.import_module("tests.object_servers")
    finally:
        sys.path.remove(str(REPO_ROOT))
    workdir.mkdir(parents=True, exist_ok=True)
    moto = servers.start_moto(workdir)
    env = servers.object_env(moto)
    return Server(
        moto.endpoint.removeprefix("http://"), moto.stop, moto.process.pid, servers.new_bucket(moto), env
    )


TOOLS = {
    "registry": ("tar", "zstd", "curl", "sha256sum", "docker-registry", "umoci", "skopeo"),
    "s3": ("tar", "zstd"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_WORKDIR / "corpus", help="directory to save")
    parser.add_argument("--make-corpus", metavar="SCRIPT", help="build the corpus with SCRIPT DIR if absent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch space (use tmpfs)")
    parser.add_argument("--store", choices=sorted(METHODS), default="registry", help="where the caches go")
    parser.add_argument(
        "--methods",
        help="comma-separated subset of the store's methods (registry: raw,rc,umoci; s3: raw,rc,boto3)",
    )
    args = parser.parse_args(argv)
    known = METHODS[args.store]
    methods = [m for m in (args.methods or ",".join(known)).split(",") if m]
    if "raw" not in methods or any(m not in known for m in methods):
        parser.error(f"--methods must include raw and only name {', '.join(known)}")
    for tool in TOOLS[args.store]:
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    cli = BIN / "remote-cache"
    if not cli.exists():
        parser.error(f"{cli} not found: install the project into this interpreter's environment")

    ensure_corpus(args.corpus, args.make_corpus)
    work = args.workdir / f"run-{os.getpid()}"
    fresh_dir(work)
    server = start_server(args.store, work / "server")
    try:
        # Bytecode is cached as on any real install (some sandboxes set PYTHONDONTWRITEBYTECODE).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(server.env)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        env["REMOTE_CACHE_STATE_DIR"] = str(work / "state")  # this run's own, removed with it
        ctx = Context(
            args.corpus.resolve(),
            work,
            server.host,
            cli,
            tree_stats(args.corpus),
            env,
            server.pid,
            server.bucket,
        )
        spread = layer_sizing.reupload_spread(ctx.corpus)
        ctx.sizing, ctx.scattered = spread.directory, spread.scattered
        # Warm up: compile every module a save and a restore import (untimed), as a real
        # install's first run would have done.
        warm = work / "warm-up"
        warm.mkdir()
        (warm / "file").write_bytes(b"warm-up")
        sh([str(cli), "save", str(warm), ctx.ref("warm-up"), "--quiet"], env=env)
        sh([str(cli), "restore", ctx.ref("warm-up"), str(work / "warm-out"), "--quiet"], env=env)
        for rnd in range(args.rounds):
            order = methods if rnd % 2 == 0 else list(reversed(methods))
            for method in order:
                print(f"round {rnd + 1}/{args.rounds}: {method}", file=sys.stderr, flush=True)
                known[method](ctx, rnd)
        print(report(ctx, args.rounds, methods, args.store))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
