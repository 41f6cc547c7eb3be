"""The ``remote-cache`` console script, run for real in subprocesses against real registries and layouts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from remote_cache.archive.pack import DEFAULT_SPOOL_BYTES
from remote_cache.cache.entries import Entry, format_table
from remote_cache.cache.save import save
from remote_cache.cache.state import STATE_DIR_ENV
from remote_cache.cli import application
from remote_cache.cli.exit_codes import ExitCode, exit_code_for
from remote_cache.cli.progress import TransferProgress
from remote_cache.errors import (
    CacheMiss,
    CacheTooLarge,
    IntegrityError,
    InvalidKey,
    InvalidReference,
    RegistryAuthError,
    RegistryUnreachable,
    UnsupportedOperation,
)
from remote_cache.keys import tag_for_key
from remote_cache.oci.reference import parse_reference
from remote_cache.oci.store import open_store
from remote_cache.units import format_bytes, parse_duration, parse_size
from remote_cache.version import VERSION
from tests.cli.output import CLI, Run, clean_env, json_line, no_traceback, warnings
from tests.forward_proxy import ForwardProxy, proxy_env
from tests.mounts import tmpfs
from tests.registry_server import FaultProxy, RegistryServer, free_port
from tests.stores import backdate, layout_blob, layout_document, layout_top, list_in_index
from tests.trees import assert_same_tree, one_file_tree, small_tree, snapshot

app = application()  # the object the console script runs


@pytest.fixture(autouse=True)
def _sigint_handler_kept() -> Iterator[None]:
    """A command ignores SIGINT once its outcome is settled (the CLI runs one command per
    process): put pytest's own handler back after each in-process run, or every later test's
    subprocesses would start with SIGINT ignored."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


async def _save(ref_text: str, key: str, tmp_path: Path, *, days_ago: int = 0) -> None:
    """Set-up through the core: save a one-file entry, re-tagged as created ``days_ago`` when asked."""
    src = one_file_tree(tmp_path / f"src-{key}", key)
    store = open_store(parse_reference(ref_text))
    try:
        await save(store, key, src)
        if days_ago:
            await backdate(store, key, days_ago)  # what an entry saved back then looks like
    finally:
        await store.aclose()


# -------------------------------------------------------------------------------------------
# save / restore


def test_round_trip_through_registry(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = small_tree(tmp_path / "src")
    ref = f"{registry.host}/{repo_name}:npm-linux"

    saved = cli("save", str(src), ref, "--json")
    assert saved.returncode == 0, saved.stderr
    data = json_line(saved)
    assert data["command"] == "save" and data["outcome"] == "saved" and data["exit_code"] == 0
    assert data["key"] == "npm-linux" and data["digest"].startswith("sha256:")
    assert data["bytes_uploaded"] > 0 and data["files"] > 0 and data["seconds"] >= 0
    assert "save saved npm-linux:" in saved.stderr

    out = tmp_path / "out"
    restored = cli("restore", ref, str(out), "--json")
    assert restored.returncode == 0, restored.stderr
    data = json_line(restored)
    assert data["outcome"] == "hit" and data["hit"] is True and data["key"] == "npm-linux"
    assert data["bytes"] > 0 and data["files"] > 0
    summary = restored.stderr.strip().splitlines()[-1]
    assert summary.startswith("restore hit npm-linux: ") and "/s)" in summary
    assert_same_tree(src, out)

    again = cli("save", str(src), ref, "--json")
    assert again.returncode == 0, again.stderr
    assert json_line(again)["outcome"] == "unchanged" and json_line(again)["bytes_uploaded"] == 0


def test_round_trip_through_layout_with_key_option(cli: Run, tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src")
    layout = f"oci:{tmp_path / 'layout'}"
    key = "node_modules/linux:lock=3f9a"  # '/' and ':' cannot go in REF, so --key

    saved = cli("save", str(src), layout, "--key", key, "--compression", "gzip", "--platform", "linux/arm64")
    assert saved.returncode == 0, saved.stderr
    assert f"save saved {key}:" in saved.stderr
    out = tmp_path / "out"
    restored = cli("restore", layout, str(out), "--key", key, "--quiet")
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr == "" and restored.stdout == ""
    assert_same_tree(src, out)

    listing = json_line(cli("--json", "ls", layout))  # common options also work before the command
    assert [e["key"] for e in listing["entries"]] == [key]
    assert listing["entries"][0]["tag"] == tag_for_key(key)
    info = json_line(cli("inspect", layout, "--key", key, "--json"))
    assert {layer["mediaType"] for layer in info["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    index = json.loads((tmp_path / "layout" / "blobs" / "sha256" / info["digest"][7:]).read_bytes())
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["arm64"]


def _imported(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a run imported, from its ``PYTHONPROFILEIMPORTTIME`` lines on stderr."""
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


# Imports a restore pays for but never uses: the save's walk, planner and packer; httpx and
# httpcore (the registry client is http.client); click, rich and pygments (no command needs
# them at start-up); ctypes (only to exchange a target that exists), urllib.request (only to
# read proxies, when a *_proxy variable is set) and urllib3 (only for an https:// proxy). A
# restore runs on every CI job, before any work.
_NOT_FOR_A_RESTORE = {
    "remote_cache.cache.save", "remote_cache.archive.pack", "remote_cache.archive.walk",
    "remote_cache.archive.plan", "httpx", "httpcore", "click", "rich", "pygments", "ctypes",
    "urllib.request", "urllib3",
}  # fmt: skip


def test_a_restore_imports_only_what_it_uses(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = small_tree(tmp_path / "src")
    layout, remote = f"oci:{tmp_path / 'layout'}:k", f"{registry.host}/{repo_name}:k"
    for ref in (layout, remote):
        assert cli("save", str(src), ref).returncode == 0
    profile = {"PYTHONPROFILEIMPORTTIME": "1"}

    from_layout = cli("restore", layout, str(tmp_path / "a"), env=profile)
    assert from_layout.returncode == 0, from_layout.stderr[-2000:]
    imported = _imported(from_layout)
    assert "remote_cache.cache.restore" in imported  # the lines were read
    # A layout needs no HTTP client and no object-store client at all.
    assert not imported & (_NOT_FOR_A_RESTORE | {"obstore", "http.client"})

    from_registry = cli("restore", remote, str(tmp_path / "b"), env=profile)
    assert from_registry.returncode == 0, from_registry.stderr[-2000:]
    imported = _imported(from_registry)
    assert "http.client" in imported and not imported & _NOT_FOR_A_RESTORE

    # The end of a CI job: the restored tree saved again, unchanged, packs nothing.
    again = cli("save", str(tmp_path / "b"), remote, env=profile)
    assert again.returncode == 0 and "save unchanged" in again.stderr, again.stderr[-2000:]
    assert not _imported(again) & {"httpx", "httpcore", "remote_cache.archive.pack"}
    # A save that uploads does it over http.client too (measured cheaper per byte: see the README).
    (tmp_path / "b" / "new").write_bytes(os.urandom(200_000))
    changed = cli("save", str(tmp_path / "b"), remote, env=profile)
    assert changed.returncode == 0 and "save saved" in changed.stderr, changed.stderr[-2000:]
    imported = _imported(changed)
    assert "remote_cache.archive.pack" in imported
    assert not imported & {"httpx", "httpcore"}


def test_miss_exits_3_and_leaves_the_target_alone(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    ref = f"{registry.host}/{repo_name}:absent"
    miss = cli("restore", ref, str(out))
    assert miss.returncode == 3, miss.stderr
    assert miss.stderr.startswith("restore miss absent:") and miss.stdout == ""
    assert not out.exists()

    as_json = cli("restore", ref, str(out), "--json")
    assert as_json.returncode == 3
    assert json_line(as_json) == json_line(as_json) | {
        "outcome": "miss",
        "hit": False,
        "key": "absent",
        "exit_code": 3,
    }

    # An optional cache step: a miss must not break the pipeline under --fail-open.
    failed_open = cli("restore", ref, str(out), "--fail-open", "--json")
    assert failed_open.returncode == 0
    assert json_line(failed_open)["outcome"] == "miss"
    assert json_line(failed_open)["failed_exit_code"] == 3

    inspect = cli("inspect", ref)
    assert inspect.returncode == 3 and inspect.stderr.startswith("inspect miss absent: no entry in ")


def test_a_layout_entry_whose_top_document_is_gone_is_listed_and_removable(cli: Run, tmp_path: Path) -> None:
    """In a layout the tag lives in index.json and its document in blobs/: with that document
    gone, ls lists the entry as broken (it hid it), restore and inspect say so (they said "no
    entry"), and rm removes it (it was a miss, and the entry stayed)."""
    layout = tmp_path / "layout"
    assert cli("save", str(small_tree(tmp_path / "src")), f"oci:{layout}:k").returncode == 0
    top = layout_top(layout)
    layout_blob(layout, top).unlink()
    listed = json_line(cli("ls", f"oci:{layout}", "--json"))["entries"]
    assert [e["key"] for e in listed] == ["k"] and "broken" in listed[0]["error"], listed
    for command in (["restore", f"oci:{layout}:k", str(tmp_path / "out")], ["inspect", f"oci:{layout}:k"]):
        done = cli(*command)
        assert done.returncode == 3 and "is broken" in done.stderr and top in done.stderr, done.stderr
    removed = cli("rm", f"oci:{layout}:k")
    assert removed.returncode == 0, removed.stderr
    assert json.loads((layout / "index.json").read_bytes())["manifests"] == []


def test_a_layout_entry_whose_manifest_cannot_be_read_is_listed_and_prune_says_what_to_do(
    cli: Run, tmp_path: Path
) -> None:
    """An entry's manifest that is there but cannot be read (a directory in its place): ls lists
    the other entries and that one as broken (exit 0); prune stops with one error naming the
    entry and rm (exit 1), removing nothing; rm removes it and says what its sweep left. (ls and
    prune failed with the file's path only, and so did rm.)"""
    layout = tmp_path / "layout"
    assert cli("save", str(one_file_tree(tmp_path / "a", "a")), f"oci:{layout}:k1").returncode == 0
    assert cli("save", str(one_file_tree(tmp_path / "b", "b")), f"oci:{layout}:k2").returncode == 0
    manifest = layout_document(layout, layout_top(layout))["manifests"][0]["digest"]  # k1's
    layout_blob(layout, manifest).unlink()
    layout_blob(layout, manifest).mkdir()
    listed = cli("ls", f"oci:{layout}", "--json")
    assert listed.returncode == 0, listed.stderr
    errors = {e["key"]: e.get("error") for e in json_line(listed)["entries"]}
    assert errors["k2"] is None and errors["k1"].startswith("broken: ") and manifest in errors["k1"], errors
    pruned = cli("prune", f"oci:{layout}", "--keep", "1")
    assert pruned.returncode == 1 and "remote-cache: error: " in pruned.stderr, pruned.stderr
    assert "k1" in pruned.stderr and "remote-cache rm" in pruned.stderr, pruned.stderr
    no_traceback(pruned)
    assert len(json_line(cli("ls", f"oci:{layout}", "--json"))["entries"]) == 2
    removed = cli("rm", f"oci:{layout}:k1", "--grace", "0s")
    assert removed.returncode == 0 and manifest.split(":")[1] in removed.stderr, removed.stderr
    assert [e["key"] for e in json_line(cli("ls", f"oci:{layout}", "--json"))["entries"]] == ["k2"]


def test_rm_in_a_layout_whose_sweep_cannot_read_a_document_says_what_it_removed(
    cli: Run, tmp_path: Path
) -> None:
    """Another entry's manifest is there but cannot be read (a directory where its file was): rm
    removes its entry, then its sweep stops naming that manifest (exit 1), frees nothing, and
    says the entry was removed. (The sweep freed that entry's layers and config.)"""
    layout = tmp_path / "layout"
    src = small_tree(tmp_path / "src")
    assert cli("save", str(src), f"oci:{layout}:keep").returncode == 0
    assert cli("save", str(one_file_tree(tmp_path / "other")), f"oci:{layout}:gone").returncode == 0
    manifests = [m["digest"] for m in layout_document(layout, layout_top(layout))["manifests"]]
    for digest in manifests:
        layout_blob(layout, digest).rename(tmp_path / digest)
        layout_blob(layout, digest).mkdir()
    blobs = sorted(os.listdir(layout / "blobs" / "sha256"))
    removed = cli("rm", f"oci:{layout}:gone", "--grace", "0s")
    assert removed.returncode == 1, removed.stderr
    assert "warning: gone was removed; freeing the blobs no entry uses failed" in removed.stderr
    assert "deletes nothing" in removed.stderr and any(d in removed.stderr for d in manifests)
    no_traceback(removed)
    assert sorted(os.listdir(layout / "blobs" / "sha256")) == blobs
    index = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index] == ["keep"]
    for digest in manifests:
        layout_blob(layout, digest).rmdir()
        (tmp_path / digest).rename(layout_blob(layout, digest))
    assert cli("restore", f"oci:{layout}:keep", str(tmp_path / "out")).returncode == 0
    assert_same_tree(src, tmp_path / "out")


@pytest.mark.parametrize("damage", ["missing", "truncated", "changed in place"])
def test_a_damaged_layer_is_repaired_by_the_save_the_error_names(
    cli: Run, tmp_path: Path, damage: str
) -> None:
    """A layer blob gone or cut short in a layout: the restore fails naming the fix, and that fix
    works. (It said "save the entry again", and that save found the directory unchanged; a
    truncated blob was not replaced even by --full, which found the file there.)"""
    layout = tmp_path / "layout"
    src = small_tree(tmp_path / "src")
    assert cli("save", str(src), f"oci:{layout}:k").returncode == 0
    index = layout_document(layout, layout_top(layout))
    manifest = layout_document(layout, index["manifests"][0]["digest"])
    blob = layout_blob(layout, manifest["layers"][-1]["digest"])
    if damage == "missing":
        blob.unlink()
    elif damage == "truncated":
        blob.write_bytes(blob.read_bytes()[:100])
    else:  # the same size, other bytes
        body = bytearray(blob.read_bytes())
        body[-20] ^= 0xFF
        blob.write_bytes(bytes(body))
    failed = cli("restore", f"oci:{layout}:k", str(tmp_path / "out"))
    assert failed.returncode == 1 and "save --full" in failed.stderr, failed.stderr
    repaired = cli("save", str(src), f"oci:{layout}:k", "--full", "--json")
    assert repaired.returncode == 0 and json_line(repaired)["outcome"] == "saved", repaired.stderr
    assert cli("restore", f"oci:{layout}:k", str(tmp_path / "out")).returncode == 0
    assert_same_tree(src, tmp_path / "out")


def test_a_broken_entry_is_named_as_broken_not_as_an_absent_digest(cli: Run, tmp_path: Path) -> None:
    """An entry whose manifest is gone (a sweep raced its save, a blob deleted by hand) is still a
    miss for a restore and inspect (exit 3; the next save replaces it), but every command says the
    key's entry is broken and what is gone, never "no entry for sha256:..." as if it were a key."""
    layout = tmp_path / "layout"
    ref = f"oci:{layout}:k"
    assert cli("save", str(small_tree(tmp_path / "src")), ref).returncode == 0
    index = layout_document(layout, layout_top(layout))
    manifest = index["manifests"][0]["digest"]
    layout_blob(layout, manifest).unlink()
    out = one_file_tree(tmp_path / "out", "kept")
    before = sorted(p.name for p in out.iterdir())

    restored = cli("restore", ref, str(out), "--json")
    assert restored.returncode == 3, restored.stderr
    line = restored.stderr.strip()
    assert line.startswith("restore miss k: ") and "broken" in line and manifest in line, line
    assert "rm" in line, line  # the way out
    assert json_line(restored)["outcome"] == "miss"
    assert "broken" in json_line(restored)["reason"]
    assert sorted(p.name for p in out.iterdir()) == before

    inspected = cli("inspect", ref)
    assert inspected.returncode == 3, inspected.stderr
    assert inspected.stderr.startswith("inspect miss k: ") and "broken" in inspected.stderr, inspected.stderr
    assert "miss sha256:" not in inspected.stderr

    listed = json_line(cli("ls", f"oci:{layout}", "--json"))["entries"]
    assert [e["key"] for e in listed] == ["k"]
    assert listed[0]["error"].startswith("broken: ") and manifest in listed[0]["error"], listed
    assert "cache miss" not in listed[0]["error"]
    no_traceback(restored)


def test_max_size_is_refused_with_exit_5(cli: Run, tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src")
    (src / "big.bin").write_bytes(b"x" * 5000)
    layout = tmp_path / "layout"
    refused = cli("save", str(src), f"oci:{layout}:k", "--max-size", "4K")
    assert refused.returncode == 5, refused.stderr
    assert refused.stderr.startswith("remote-cache: error: ") and "nothing was uploaded" in refused.stderr
    no_traceback(refused)
    assert cli("save", str(src), f"oci:{layout}:k", "--max-size", "1G").returncode == 0


# -------------------------------------------------------------------------------------------
# ls / inspect / rm / prune


async def test_ls_inspect_rm(cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path) -> None:
    repo = f"{registry.host}/{repo_name}"
    for key in ("npm-linux", "pip-3.12"):
        await _save(repo, key, tmp_path)

    table = cli("ls", repo)
    assert table.returncode == 0, table.stderr
    assert table.stderr == f"ls listed 2 entries in {repo}\n"  # the summary line every command has
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["KEY", "CREATED", "SIZE", "FILES", "TAG"]  # the one entries table
    assert sorted(row.split()[0] for row in rows) == ["npm-linux", "pip-3.12"]

    entries = {e["key"]: e for e in json_line(cli("ls", repo, "--json"))["entries"]}
    assert set(entries) == {"npm-linux", "pip-3.12"}
    assert entries["pip-3.12"]["size"] == len("pip-3.12") and entries["pip-3.12"]["files"] == 1
    assert entries["pip-3.12"]["created"].endswith("Z")

    info = json_line(cli("inspect", f"{repo}:pip-3.12", "--json"))
    assert info["digest"] == entries["pip-3.12"]["digest"]
    assert info["manifest"].startswith("sha256:") and info["manifest"] != info["digest"]
    assert len(info["layers"]) >= 1 and info["layers"][0]["mediaType"].endswith("tar+zstd")
    assert info["annotations"]["dev.remote-cache.key"] == "pip-3.12"
    human = cli("inspect", f"{repo}:pip-3.12")
    assert info["manifest"] in human.stdout and "dev.remote-cache.key=pip-3.12" in human.stdout
    assert human.stderr.startswith("inspect found pip-3.12: 1 layer, ")  # one layer, not "1 layers"

    removed = cli("rm", f"{repo}:pip-3.12")
    assert removed.returncode == 0, removed.stderr
    assert [e["key"] for e in json_line(cli("ls", repo, "--json"))["entries"]] == ["npm-linux"]
    assert cli("rm", f"{repo}:pip-3.12").returncode == 3
    assert cli("restore", f"{repo}:pip-3.12", str(tmp_path / "gone")).returncode == 3


def test_rm_with_copies_says_which_tags_went_with_the_entry(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """An entry skopeo copied to another tag: rm refuses (exit 5); --with-copies removes both and
    says which tags went with it, in the summary line and in --json (they were only logged)."""
    repo = f"{registry.host}/{repo_name}"
    assert cli("save", str(small_tree(tmp_path / "src")), f"{repo}:main-1").returncode == 0
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{repo}:main-1",
            f"docker://{repo}:release-1",
        ],
        check=True,
        capture_output=True,
    )
    assert cli("rm", f"{repo}:release-1").returncode == 5
    removed = cli("rm", f"{repo}:release-1", "--with-copies", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json_line(removed)["copies"] == ["main-1"]
    assert "rm removed release-1 with its copies main-1 from" in removed.stderr
    assert json_line(cli("ls", repo, "--json"))["entries"] == []


async def test_prune_older_than_keep_and_dry_run(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    repo = f"{registry.host}/{repo_name}"
    for key, days in {"npm-old": 30, "npm-week": 8, "npm-new": 0, "pip-old": 30}.items():
        await _save(repo, key, tmp_path, days_ago=days)

    dry = cli("prune", repo, "--older-than", "7d", "--prefix", "npm-", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert sorted(e["key"] for e in json_line(dry)["removed"]) == ["npm-old", "npm-week"]
    assert len(json_line(cli("ls", repo, "--json"))["entries"]) == 4  # nothing removed

    kept = cli("prune", repo, "--older-than", "1w", "--keep", "2", "--prefix", "npm-")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split() == ["npm-old"]  # npm-week is among the 2 newest npm- entries
    assert "prune removed 1 entry" in kept.stderr

    pruned = cli("prune", repo, "--older-than", "2w", "--json")
    assert sorted(e["key"] for e in json_line(pruned)["removed"]) == ["pip-old"]
    left = sorted(e["key"] for e in json_line(cli("ls", repo, "--json"))["entries"])
    assert left == ["npm-new", "npm-week"]


# -------------------------------------------------------------------------------------------
# credentials, failures, usage


def test_auth_wrong_password_exits_4_without_echoing_it(
    cli: Run, auth_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = small_tree(tmp_path / "src")
    ref = f"{auth_registry.host}/{repo_name}:k"
    assert auth_registry.username is not None and auth_registry.password is not None
    wrong = "Wr0ng-" + auth_registry.password[::-1]

    for args in (("save", str(src), ref), ("restore", ref, str(tmp_path / "out"))):
        proc = cli(*args, "--username", auth_registry.username, "--password-stdin", stdin=wrong + "\n")
        assert proc.returncode == 4, proc.stderr
        assert proc.stderr.startswith("remote-cache: error: ")
        assert wrong not in proc.stderr and wrong not in proc.stdout
        no_traceback(proc)

    anonymous = cli("restore", ref, str(tmp_path / "out"))
    assert anonymous.returncode == 4, anonymous.stderr

    good = cli(
        "save",
        str(src),
        ref,
        "--username",
        auth_registry.username,
        "--password-stdin",
        stdin=auth_registry.password + "\n",
    )
    assert good.returncode == 0, good.stderr
    via_env = cli(
        "restore",
        ref,
        str(tmp_path / "out"),
        "--username",
        auth_registry.username,
        env={"REMOTE_CACHE_PASSWORD": auth_registry.password},
    )
    assert via_env.returncode == 0, via_env.stderr
    assert auth_registry.password not in good.stderr + via_env.stderr
    assert_same_tree(src, tmp_path / "out")


def test_token_registry_round_trip(
    cli: Run, token_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = small_tree(tmp_path / "src")
    ref = f"{token_registry.host}/{repo_name}:tok"
    assert token_registry.username is not None and token_registry.password is not None
    env = {"REMOTE_CACHE_USERNAME": token_registry.username, "REMOTE_CACHE_PASSWORD": token_registry.password}
    assert cli("save", str(src), ref, env=env).returncode == 0
    restored = cli("restore", ref, str(tmp_path / "out"), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_same_tree(src, tmp_path / "out")


def test_unreachable_registry_exits_1_or_warns_with_fail_open(cli: Run, tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src")
    ref = f"127.0.0.1:{free_port()}/team/cache:npm"

    failed = cli("save", str(src), ref, "--timeout", "2")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.startswith("remote-cache: error: ") and len(failed.stderr.splitlines()) == 1
    no_traceback(failed)

    for args in (("save", str(src), ref), ("restore", ref, str(tmp_path / "out"))):
        proc = cli(*args, "--timeout", "2", "--fail-open", "--json")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.startswith("remote-cache: warning: ") and "--fail-open" in proc.stderr
        data = json_line(proc)
        assert data["outcome"] == "error" and data["failed_open"] is True and data["failed_exit_code"] == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("restore", "Bad_Host/Repo:key", "out"), "invalid reference"),
        (("restore", "localhost:5000/team/cache", "out"), "has no key"),
        (("restore", "localhost:5000/team/cache:k", "out", "--key", "k2"), "the key is given twice"),
        (("ls", "localhost:5000/team/cache:k"), "without ':KEY'"),
        (("restore", "oci:layout:bad\x01key", "out"), "control characters"),
        (("save", "a-file", "oci:layout:k"), "is a file"),
        (("save", ".", "127.0.0.1:99999/team/cache:k"), "out of range"),
        (("restore", "127.0.0.1:5001", "out"), "names a registry but no repository"),
        (("restore", "localhost:5000", "out"), "names a registry but no repository"),
        (("ls", "registry.example.com"), "names a registry but no repository"),
        (("save", ".", "localhost:5000/team/cache:../x"), "--key"),
        (("restore", "oci:layout:k", "a-file"), "not a directory"),
        (("save", ".", "oci:layout:k", "--deadline", "soon"), "not a duration"),
        (("save", ".", "oci:layout:k", "--deadline", "0s"), "--deadline"),
        (("ls", "oci:layout", "--deadline", "99999999999999d"), "--deadline"),
        (("save", ".", "oci:layout:k", "--timeout", "nan"), "--timeout"),
        (("save", ".", "oci:layout:k", "--timeout", "inf"), "--timeout"),
        (("restore", "oci:layout:k", "out", "--timeout", "1e308"), "--timeout"),
    ],
)
def test_usage_errors_exit_2_even_with_fail_open(
    cli: Run, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    proc = cli(*args, "--fail-open")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert "unexpected" not in proc.stderr
    no_traceback(proc)
    assert not (tmp_path / "layout").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("restore", "oci:layout:k", "out", "--password-stdin"), "--password-stdin needs --username"),
        (("restore", "oci:layout:k", "out", "--username", "u"), "REMOTE_CACHE_PASSWORD"),
        (("prune", "oci:layout", "--older-than", "7 days"), "not a duration"),
        (("prune", "oci:layout"), "--older-than"),
        (("save", ".", "oci:layout:k", "--max-size", "lots"), "not a size"),
        (("save", ".", "oci:layout:k", "--compression", "xz"), "zstd or gzip"),
        (("save", ".", "oci:layout:k", "--platform", "amd64"), "OS/ARCH"),
        (("save", ".", "oci:layout:k", "--compression", "gzip", "--level", "15"), "1 to 9"),
        (("save", ".", "oci:layout:k", "--level", "99"), "1 to 22"),
    ],
)
def test_option_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], message: str
) -> None:
    # In-process (the same app object the console script runs): these fail before any I/O.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REMOTE_CACHE_PASSWORD", raising=False)
    result = CliRunner().invoke(app, [*args, "--fail-open"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in " ".join(result.stderr.split())
    assert result.stdout == ""
    assert not (tmp_path / "layout").exists()


def test_a_command_line_builds_only_the_command_it_names(tmp_path: Path) -> None:
    """typer makes a command's click parameters from its signature (~1 ms a command on a 2-vCPU
    VM): a run builds the command it names, not all six."""
    code = f"""
import typer.core
built = []
init = typer.core.TyperCommand.__init__
def counting(self, *args, **kwargs):
    built.append(kwargs.get("name"))
    init(self, *args, **kwargs)
typer.core.TyperCommand.__init__ = counting
from remote_cache.cli import application
try:
    application()(["inspect", "oci:{tmp_path / "layout"}:absent", "--quiet"], prog_name="remote-cache")
except SystemExit as done:
    print(done.code, built)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split(maxsplit=1) == ["3", "['inspect']\n"], proc.stderr


@pytest.mark.parametrize(("typo", "meant"), [("sav", "save"), ("inspec", "inspect"), ("lss", "ls")])
def test_a_mistyped_command_gets_a_suggestion(typo: str, meant: str) -> None:
    result = CliRunner().invoke(app, [typo, "x"])
    assert result.exit_code == 2
    assert f"No such command '{typo}'. Did you mean '{meant}'?" in result.stderr, result.stderr


def test_every_command_takes_the_common_options_before_or_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    params = [(p.name, tuple(p.opts), getattr(p, "help", None)) for p in group.params]
    assert params[-1][:2] == ("version", ("--version",))  # the application's alone
    common = params[:-1]
    assert [name for name, _, _ in common] == [
        "username",
        "password_stdin",
        "authfile",
        "plain_http",
        "tls_verify",
        "cert_dir",
        "timeout",
        "deadline",
        "endpoint",
        "region",
        "json_",
        "quiet",
        "fail_open",
    ]
    assert list(group.commands) == ["save", "restore", "ls", "inspect", "rm", "prune"]  # the help's order
    for name, command in group.commands.items():
        assert command.name == name
        own = [(p.name, tuple(p.opts), getattr(p, "help", None)) for p in command.params]
        assert own[-len(common) :] == common, name
        assert command.help and command.epilog and "3 cache miss" in command.epilog, name

    # Given before the command, after it, or split across both: each option takes effect.
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    split = runner.invoke(app, ["--fail-open", "rm", "oci:layout:absent", "--json"])
    assert split.exit_code == 0, split.stderr
    assert json.loads(split.stdout) == {
        "command": "rm",
        "outcome": "miss",
        "key": "absent",
        "reason": "no entry in oci:layout",
        "failed_open": True,
        "failed_exit_code": 3,
        "exit_code": 0,
    }
    assert split.stderr == "rm miss absent: no entry in oci:layout\n"
    before = runner.invoke(app, ["--json", "--quiet", "inspect", "oci:layout:absent"])
    assert before.exit_code == 3 and before.stderr == ""
    assert json.loads(before.stdout)["outcome"] == "miss"
    after = runner.invoke(app, ["inspect", "oci:layout", "--key", "a/b", "-q", "--fail-open"])
    assert (after.exit_code, after.stdout, after.stderr) == (0, "", "")


def test_version_prints_the_release_and_exits_0(cli: Run) -> None:
    for args in (["--version"], ["--version", "save"], ["--json", "--version"]):
        proc = cli(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"remote-cache {VERSION}\n", ""), args


def test_help_documents_exit_codes_and_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "remote_cache", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for fragment in ("3 cache miss", "4 authentication error", "5 refused", "--fail-open"):
        assert fragment in text
    for command in ("save", "restore", "ls", "inspect", "rm", "prune"):
        assert command in text


# -------------------------------------------------------------------------------------------
# human units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("4K", 4096),
        ("2G", 2 * 1024**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("2GB", 2 * 10**9),
        ("10kB", 10_000),
        ("3m", 3 * 1024**2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1d12h", 129600)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7 days", "-1d", "1y", "d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "lots", "1X", "G", "-1K", "1.2.3M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(123_400_000) == "123.4 MB"
    assert format_bytes(999) == "999 B"


def test_exit_code_mapping() -> None:
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 4, 5]
    assert exit_code_for(CacheMiss("k")) is ExitCode.MISS
    assert exit_code_for(InvalidKey("k")) is exit_code_for(InvalidReference("r")) is ExitCode.USAGE
    assert exit_code_for(RegistryAuthError("denied")) is ExitCode.AUTH
    assert exit_code_for(CacheTooLarge(Path("p"), 2, 1)) is ExitCode.REFUSED
    assert exit_code_for(UnsupportedOperation("no deletes")) is ExitCode.REFUSED
    for error in (RegistryUnreachable("down"), IntegrityError("bad digest"), OSError("disk full")):
        assert exit_code_for(error) is ExitCode.ERROR


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_only_after_a_moment() -> None:
    quick = _Terminal()
    with TransferProgress("save k", stream=quick, show_after=60) as bar:
        bar.start(1000)
        bar.advance(10)
        bar.advance(20)
    assert bar.done == 30 and quick.getvalue() == ""

    slow = _Terminal()
    with TransferProgress("save k", stream=slow, show_after=0) as bar:
        bar.start(10_000_000)
        bar.advance(2_500_000)
    assert "save k" in slow.getvalue() and "2.5" in slow.getvalue() and "10.0 MB" in slow.getvalue()


def test_progress_lines_off_a_terminal() -> None:
    """A CI log gets a first line with the total, then one line per interval (bytes, total,
    percent, rate); --quiet (mode off) gets nothing."""
    piped = io.StringIO()
    with TransferProgress("restore npm", stream=piped, interval=0.05) as bar:
        bar.start(4_000_000)
        bar.advance(1_000_000)  # not due yet
        time.sleep(0.06)
        bar.advance(1_000_000)
    lines = piped.getvalue().splitlines()
    assert lines[0] == "restore npm: started, 4.0 MB to go"
    assert len(lines) == 2 and lines[1].startswith("restore npm: 2.0 MB of 4.0 MB (50%), ")
    assert lines[1].endswith("/s")
    off = io.StringIO()
    with TransferProgress("restore npm", stream=off, mode="off", interval=0.0) as bar:
        bar.start(10)
        bar.advance(10)
    assert off.getvalue() == ""


def test_a_ci_log_shows_a_restore_as_it_goes(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """Through the real console script with stderr piped: the first line, the periodic lines,
    then the summary."""
    src = small_tree(tmp_path / "src")
    ref = f"{registry.host}/{repo_name}:k"
    assert cli("save", str(src), ref, "-q").returncode == 0
    proc = cli("restore", ref, str(tmp_path / "out"), env={"REMOTE_CACHE_PROGRESS_INTERVAL": "0.000001"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[0].startswith("restore k: started, ") and lines[0].endswith(" to go")
    assert any(" of " in line and "%)" in line for line in lines[1:-1])
    assert lines[-1].startswith("restore hit k: ")
    quiet = cli(
        "restore", ref, str(tmp_path / "out2"), "-q", env={"REMOTE_CACHE_PROGRESS_INTERVAL": "0.000001"}
    )
    assert quiet.stderr == ""


def test_corrupt_blob_on_restore_exits_1_or_warns_with_fail_open(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "unique.txt").write_text(f"content only this test stores: {uuid.uuid4()}\n" * 100)
    ref = f"{registry.host}/{repo_name}:corrupt"
    assert cli("save", str(src), ref, "--quiet").returncode == 0
    layers = json_line(cli("inspect", ref, "--json"))["layers"]
    assert len(layers) == 1
    blob = registry.blob_data_path(layers[0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    blob.write_bytes(bytes(data))

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("kept")
    failed = cli("restore", ref, str(out))
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.startswith("remote-cache: error: ")
    assert "corrupt" in failed.stderr or "does not match" in failed.stderr
    no_traceback(failed)
    assert [p.name for p in out.iterdir()] == ["previous"]  # the target is left as it was

    failed_open = cli("restore", ref, str(out), "--fail-open")
    assert failed_open.returncode == 0
    assert failed_open.stderr.startswith("remote-cache: warning: ")
    assert [p.name for p in out.iterdir()] == ["previous"]


def test_a_stalled_registry_fails_the_step_within_the_stall_budget(
    cli: Run,
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    fault_proxy_factory: Callable[[RegistryServer], FaultProxy],
) -> None:
    """A registry that accepts connections and never answers: a save and a restore each give up
    after about two stall periods (retries and later phases share the budget), --fail-open
    just as fast; --deadline stops a step that is slow but not stalled."""
    src = small_tree(tmp_path / "src")
    assert cli("save", str(src), f"{registry.host}/{repo_name}:k", "-q").returncode == 0
    proxy = fault_proxy_factory(registry).stall(times=10_000)  # every request hangs, forever
    ref = f"{proxy.host}/{repo_name}:k"
    for args in (("save", str(src), ref), ("restore", ref, str(tmp_path / "out"))):
        started = time.monotonic()
        proc = cli(*args, "--timeout", "2")
        elapsed = time.monotonic() - started
        assert proc.returncode == 1, proc.stderr
        assert "sent nothing for" in proc.stderr, proc.stderr
        assert "retries included: giving up (--timeout sets the stall timeout)" in proc.stderr, proc.stderr
        assert elapsed < 2 * 2 + 4, f"{args[0]}: --timeout 2 took {elapsed:.1f}s to give up"
    started = time.monotonic()
    opened = cli("restore", ref, str(tmp_path / "out"), "--timeout", "2", "--fail-open")
    assert opened.returncode == 0 and "warning" in opened.stderr
    assert time.monotonic() - started < 8

    proxy.clear()
    proxy.slow_upload(100_000, method="PUT", times=1000)  # moving, but slowly: not a stall
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "blob").write_bytes(os.urandom(2 << 20))
    started = time.monotonic()
    late = cli("save", str(fresh), f"{proxy.host}/{repo_name}:k2", "--deadline", "3s")
    assert late.returncode == 1, late.stderr
    assert "--deadline 3s" in late.stderr and time.monotonic() - started < 15


async def test_restore_keys_base_key_immutable_and_read_only(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    repo = f"{registry.host}/{repo_name}"
    await _save(repo, "npm-aaa", tmp_path, days_ago=3)
    await _save(repo, "npm-bbb", tmp_path, days_ago=1)

    out = tmp_path / "out"
    fallback = cli(
        "restore", f"{repo}:npm-zzz", str(out), "--restore-key", "pip-", "--restore-key", "npm-", "--json"
    )
    assert fallback.returncode == 0, fallback.stderr
    data = json_line(fallback)
    assert data["outcome"] == "fallback" and data["hit"] is False and data["matched_key"] == "npm-bbb"
    assert fallback.stderr.startswith("restore fallback npm-zzz from npm-bbb: ")
    assert (out / "f").read_text() == "npm-bbb"
    assert cli("restore", f"{repo}:npm-zzz", str(out), "--restore-key", "pip-").returncode == 3

    src = small_tree(tmp_path / "src")
    assert cli("save", str(src), f"{repo}:tree-1", "--quiet").returncode == 0
    based = json_line(cli("save", str(src), f"{repo}:tree-2", "--base-key", "tree-1", "--json"))
    assert based["outcome"] == "saved" and based["base_key"] == "tree-1"
    assert based["layers_reused"] == based["layers_total"] >= 1 and based["bytes_uploaded"] == 0

    (src / "new-file").write_text("changed")
    immutable = cli("save", str(src), f"{repo}:tree-1", "--immutable", "--json")
    assert immutable.returncode == 0 and json_line(immutable)["outcome"] == "skipped"
    assert immutable.stderr.startswith("save skipped tree-1: ")
    read_only = cli("save", str(src), f"{repo}:tree-3", "--read-only", "--json")
    assert read_only.returncode == 0 and json_line(read_only)["outcome"] == "skipped"
    assert cli("inspect", f"{repo}:tree-3").returncode == 3


# -------------------------------------------------------------------------------------------
# cache behaviours: restore keys, incremental saves, trust


def _aged(root: Path) -> Path:
    """Backdate every mtime an hour: files written in the second of a save are never reused."""
    past = int(time.time()) - 3600
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (past, past), follow_symlinks=False)
    os.utime(root, (past, past))
    return root


def test_restore_key_fallback_then_save_with_base(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    repo = f"{registry.host}/{repo_name}"
    src = _aged(small_tree(tmp_path / "src"))
    assert cli("save", str(src), f"{repo}:npm-aaa").returncode == 0

    out = tmp_path / "out"
    fell = cli(
        "restore", f"{repo}:npm-bbb", str(out), "--restore-key", "go-", "--restore-key", "npm-", "--json"
    )
    assert fell.returncode == 0, fell.stderr
    data = json_line(fell)
    assert data["outcome"] == "fallback" and data["matched_key"] == "npm-aaa" and data["hit"] is False
    assert "fallback" in fell.stderr.strip().splitlines()[-1] and "npm-aaa" in fell.stderr
    assert_same_tree(src, out)

    saved = cli("save", str(out), f"{repo}:npm-bbb", "--base", data["matched_key"], "--json")
    assert saved.returncode == 0, saved.stderr
    info = json_line(saved)
    assert info["outcome"] == "saved" and info["layers_reused"] == info["layers_total"] > 0
    assert info["bytes_uploaded"] == 0 and info["base_key"] == "npm-aaa"

    exact = json_line(
        cli("restore", f"{repo}:npm-bbb", str(tmp_path / "o2"), "--restore-key", "npm-", "--json")
    )
    assert exact["outcome"] == "hit" and exact["matched_key"] == "npm-bbb"
    missed = cli("restore", f"{repo}:npm-ccc", str(tmp_path / "o3"), "--restore-key", "pip-")
    assert missed.returncode == 3


def test_save_full_rereads_and_keeps_the_digest(cli: Run, tmp_path: Path) -> None:
    src = _aged(small_tree(tmp_path / "src"))
    ref = f"oci:{tmp_path / 'layout'}:k"
    first = json_line(cli("save", str(src), ref, "--json"))
    again = json_line(cli("save", str(src), ref, "--json"))
    assert again["outcome"] == "unchanged" and again["layers_reused"] == again["layers_total"]
    full = json_line(cli("save", str(src), ref, "--full", "--json"))
    assert full["outcome"] == "unchanged" and full["layers_reused"] == 0
    assert full["digest"] == again["digest"] == first["digest"]


def test_save_immutable_never_overwrites(cli: Run, tmp_path: Path) -> None:
    ref = f"oci:{tmp_path / 'layout'}:release"
    a = one_file_tree(tmp_path / "a", "one")
    b = one_file_tree(tmp_path / "b", "two")
    first = json_line(cli("save", str(a), ref, "--immutable", "--json"))
    second = cli("save", str(b), ref, "--immutable", "--json")
    assert second.returncode == 0, second.stderr
    assert json_line(second)["outcome"] == "skipped" and json_line(second)["digest"] == first["digest"]
    assert "immutable key exists" in second.stderr
    out = tmp_path / "out"
    assert cli("restore", ref, str(out)).returncode == 0
    assert (out / "f").read_text() == "one"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_save_read_only_is_a_no_op(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path, how: str
) -> None:
    src = one_file_tree(tmp_path / "src", "x")
    ref = f"{registry.host}/{repo_name}:k"
    if how == "flag":
        proc = cli("save", str(src), ref, "--read-only", "--json")
    else:
        proc = cli("save", str(src), ref, "--json", env={"REMOTE_CACHE_READ_ONLY": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json_line(proc)["outcome"] == "skipped" and json_line(proc)["bytes_uploaded"] == 0
    assert "read-only" in proc.stderr
    assert cli("restore", ref, str(tmp_path / "out")).returncode == 3


async def test_ls_prefix(cli: Run, tmp_path: Path) -> None:
    repo = f"oci:{tmp_path / 'layout'}"
    for key in ("npm-a", "npm-b", "pip-a"):
        await _save(repo, key, tmp_path)
    listed = json_line(cli("ls", repo, "--prefix", "npm-", "--json"))
    assert sorted(e["key"] for e in listed["entries"]) == ["npm-a", "npm-b"]


def test_a_restore_goes_through_the_proxy_the_environment_names(
    cli: Run,
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    forward_proxy_factory: Callable[..., ForwardProxy],
) -> None:
    """HTTP_PROXY is honoured by every request, blob bodies included; NO_PROXY exempts a host."""
    src = small_tree(tmp_path / "src")
    ref = f"{registry.host}/{repo_name}:k"
    assert cli("save", str(src), ref, "-q").returncode == 0
    proxy = forward_proxy_factory()
    proxied = proxy_env("HTTP_PROXY", proxy.url)
    done = cli("restore", ref, str(tmp_path / "out"), env=proxied)
    assert done.returncode == 0, done.stderr
    assert_same_tree(src, tmp_path / "out")
    urls = [url for _method, url in proxy.seen]
    assert any("/manifests/" in u for u in urls) and any("/blobs/sha256:" in u for u in urls)
    assert all(u.startswith(f"http://{registry.host}/") for u in urls)
    proxy.seen.clear()
    host = registry.host.split(":")[0]
    for n, exempted in enumerate((host, registry.host)):  # the host, or the host with its port
        exempt = {**proxied, **proxy_env("NO_PROXY", exempted)}
        assert cli("restore", ref, str(tmp_path / f"exempt-{n}"), env=exempt).returncode == 0
        assert proxy.seen == []
    layers = [layer["digest"] for layer in json_line(cli("inspect", ref, "--json"))["layers"]]
    # The environment is read as httpx read it: ALL_PROXY alone is a proxy; an IP network in
    # NO_PROXY exempts nothing.
    cases = [
        (proxy_env("ALL_PROXY", proxy.url), proxy),
        ({**proxied, **proxy_env("NO_PROXY", "127.0.0.0/8")}, proxy),
    ]
    with contextlib.suppress(OSError):  # port 80 needs root and a free port
        # A proxy URL without a port means 80 (as httpx, curl and urllib read it).
        on_80 = forward_proxy_factory(port=80)
        plain = "http://127.0.0.1"
        cases.append((proxy_env("HTTP_PROXY", plain), on_80))
    for n, (env, through) in enumerate(cases):
        through.seen.clear()
        assert cli("restore", ref, str(tmp_path / f"out-{n}"), env=env).returncode == 0
        urls = [url for _method, url in through.seen]
        assert any("/manifests/" in u for u in urls)
        assert all(any(layer in u for u in urls) for layer in layers)  # the bodies too


def test_a_full_temporary_directory_fails_a_save_with_the_place_and_the_fix(cli: Run, tmp_path: Path) -> None:
    """A layer over the spool threshold waits for its upload in TMPDIR: a full one is exit 5 naming
    it and TMPDIR as the fix (it was a bare "[Errno 28] No space left on device", exit 1); nothing
    is left there and the entry is not written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(DEFAULT_SPOOL_BYTES + (2 << 20)))  # incompressible: spooled
    layout = f"oci:{tmp_path / 'layout'}:k"
    with tmpfs(tmp_path / "tmp", "size=1m") as tmp:
        proc = cli("save", str(src), layout, env={"TMPDIR": str(tmp)})
        assert proc.returncode == 5, proc.stderr
        assert f"not enough space in {tmp}, the temporary directory" in proc.stderr, proc.stderr
        assert "set TMPDIR to a directory with more room" in proc.stderr, proc.stderr
        no_traceback(proc)
        assert list(tmp.iterdir()) == []
    assert cli("restore", layout, str(tmp_path / "out")).returncode == 3


def test_a_layout_on_a_full_disk_fails_a_save_with_exit_5_and_keeps_its_entries(
    cli: Run, tmp_path: Path
) -> None:
    """An OCI layout whose filesystem fills up during a save: exit 5 naming the layout and what to
    do (it was exit 1 with a bare errno); the entry saved before is still there, whole."""
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    (small / "f").write_text("small")
    big.mkdir()
    (big / "f").write_bytes(os.urandom(3 << 20))
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        layout = f"oci:{disk / 'layout'}"
        assert cli("save", str(small), f"{layout}:small", "-q").returncode == 0
        proc = cli("save", str(big), f"{layout}:big")
        assert proc.returncode == 5, proc.stderr
        assert f"not enough space for the OCI layout {layout}" in proc.stderr, proc.stderr
        no_traceback(proc)
        assert cli("restore", f"{layout}:small", str(tmp_path / "out")).returncode == 0
        assert_same_tree(small, tmp_path / "out")
        assert cli("restore", f"{layout}:big", str(tmp_path / "out2")).returncode == 3


def test_a_proxy_that_cannot_be_reached_is_named_not_the_registry(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """A proxy that is down or misspelt: the error names the proxy (without its credentials) and
    the variables to check, not the registry, which is fine (it said "cannot connect to registry
    H ... check the address and that it is running")."""
    src = small_tree(tmp_path / "src")
    ref = f"{registry.host}/{repo_name}:k"
    assert cli("save", str(src), ref, "-q").returncode == 0
    for proxy_url, shown in (
        (f"http://user:hunter2@127.0.0.1:{free_port()}", "http://127.0.0.1:"),
        ("http://no-such-proxy.invalid:3128", "http://no-such-proxy.invalid:3128"),
    ):
        env = proxy_env("HTTP_PROXY", proxy_url)
        proc = cli("restore", ref, str(tmp_path / "out"), env=env)
        assert proc.returncode == 1, proc.stderr
        assert f"through the proxy {shown}" in proc.stderr, proc.stderr
        assert "HTTP(S)_PROXY" in proc.stderr and "NO_PROXY" in proc.stderr, proc.stderr
        assert "hunter2" not in proc.stderr and "user:" not in proc.stderr
        no_traceback(proc)


@pytest.mark.parametrize("damage", ["symlink-loop", "link-through-a-file"])
def test_a_layout_entry_whose_manifest_is_a_bad_link_is_listed_and_removable(
    cli: Run, tmp_path: Path, damage: str
) -> None:
    """An entry's manifest whose place holds a link that leads to no file (a loop: ELOOP; through
    a file: ENOTDIR), like a directory or FIFO there, is not a file in its place: ls lists the other
    entries and that one as broken (exit 0) and rm removes it. Since 07f2239 only PermissionError
    and IsADirectoryError become BlobUnreadable: ls, prune and rm all fail with 'cannot use the OCI
    layout' for the whole layout, and the entry cannot be removed. (fails: defect)"""
    layout = tmp_path / "layout"
    assert cli("save", str(one_file_tree(tmp_path / "a", "a")), f"oci:{layout}:k1").returncode == 0
    assert cli("save", str(one_file_tree(tmp_path / "b", "b")), f"oci:{layout}:k2").returncode == 0
    manifest = layout_document(layout, layout_top(layout))["manifests"][0]["digest"]  # k1's
    path = layout_blob(layout, manifest)
    path.unlink()
    if damage == "symlink-loop":
        path.symlink_to(path.name)
    else:
        (tmp_path / "plain").write_bytes(b"x")
        path.symlink_to(tmp_path / "plain" / "blob")
    listed = cli("ls", f"oci:{layout}", "--json")
    assert listed.returncode == 0, listed.stderr
    errors = {e["key"]: e.get("error") for e in json_line(listed)["entries"]}
    assert errors["k2"] is None and errors["k1"].startswith("broken: ") and manifest in errors["k1"], errors
    removed = cli("rm", f"oci:{layout}:k1", "--grace", "0s")
    no_traceback(removed)
    assert [e["key"] for e in json_line(cli("ls", f"oci:{layout}", "--json"))["entries"]] == ["k2"]


def test_a_user_with_no_home_directory_restores_from_a_registry(
    cli: Run, registry: RegistryServer, repo_name: str, tmp_path: Path, pycache: Path
) -> None:
    """A container run as a uid the image has no passwd entry for, without HOME (``docker run -u
    12345``): every registry command failed with "unexpected RuntimeError: Could not determine
    home directory." before asking anything. There are no per-user files to read then, and the
    state cannot be recorded (one warning)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become a uid with no passwd entry")
    ref = f"{registry.host}/{repo_name}:k"
    assert cli("save", str(small_tree(tmp_path / "src")), ref, "-q").returncode == 0
    base = Path(tempfile.mkdtemp(prefix="rc-nohome-"))
    try:
        base.chmod(0o777)
        env = {k: v for k, v in clean_env(tmp_path, pycache).items() if k not in ("HOME", STATE_DIR_ENV)}
        as_12345 = ["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups"]
        proc = subprocess.run(
            [*as_12345, str(CLI), "restore", "-q", ref, "out"],
            capture_output=True, text=True, env=env, cwd=base, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert warnings(proc.stderr) and "no home directory" in proc.stderr
        assert_same_tree(tmp_path / "src", base / "out")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    "as_root_without_chown",
    [["unshare", "-Ur"], ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]],
    ids=["user-namespace", "no-capabilities"],
)
def test_root_that_may_not_give_owners_restores_as_any_user_does(
    cli: Run, tmp_path: Path, pycache: Path, as_root_without_chown: list[str]
) -> None:
    """Root in a user namespace mapping only itself (rootless containers: EINVAL for another
    id), or root with its capabilities dropped (``--cap-drop=ALL``: EPERM): the restore failed on
    the first file of another owner, and over a directory of another owner failed after the swap
    with its mode lost. Now the files are root's own (one warning), without set-ID bits, their
    modes and the replaced directory's mode as they should be."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    src = small_tree(tmp_path / "src")
    (src / "suid").write_text("#!/bin/sh\n")
    (src / "suid").chmod(0o4755)
    subprocess.run(["chown", "-R", "-h", "1000:1000", str(src)], check=True)
    (src / "suid").chmod(0o4755)  # (chown clears it)
    layout = f"oci:{tmp_path / 'layout'}:k"
    assert cli("save", str(src), layout, "-q").returncode == 0
    target = tmp_path / "target"
    target.mkdir()
    os.chown(target, 1000, 1000)
    target.chmod(0o2777)
    proc = subprocess.run(
        [*as_root_without_chown, str(CLI), "restore", "-q", layout, str(target)],
        capture_output=True, text=True, env=clean_env(tmp_path, pycache), timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert any("cannot give restored files the owners" in w for w in warnings(proc.stderr))
    # Root's own now, so without its set-user-ID bit (it kept it: a setuid-root file).
    assert stat.S_IMODE((target / "suid").stat().st_mode) == 0o755
    (src / "suid").unlink()
    (target / "suid").unlink()
    assert_same_tree(src, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o2777


def test_a_save_never_spools_into_the_tree_it_saves(tmp_path: Path, pycache: Path) -> None:
    """No TMPDIR, and /tmp and /var/tmp not writable (a read-only root filesystem): Python's last
    resort for temporary files is the current directory, so a save run in the tree it saves
    spooled its layers there (killed, it left them in the cache, and the next save failed: a file
    "changed while it was saved"). Now it says to set TMPDIR; run from elsewhere, it saves."""
    if os.geteuid() != 0 or not os.path.isdir("/dev/shm"):
        pytest.skip("needs root (a mount namespace) and /dev/shm (outside /tmp)")
    base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        small_tree(base / "tree")
        env = {k: v for k, v in clean_env(tmp_path, pycache).items() if k not in ("TMPDIR", "TEMP", "TMP")}
        read_only_tmp = (  # (kept readable: a checkout, its venv, may live under /tmp)
            "for d in /tmp /var/tmp; do mount --bind $d $d && mount -o remount,bind,ro $d || exit 9; done"
            ' && exec "$@"'
        )

        def save_from(cwd: Path, tree: str) -> subprocess.CompletedProcess[str]:
            command = [str(CLI), "save", "-q", tree, f"oci:{base / 'layout'}:k"]
            return subprocess.run(
                ["unshare", "-m", "sh", "-c", read_only_tmp, "sh", *command],
                capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False,
            )  # fmt: skip

        before = snapshot(base / "tree")
        inside = save_from(base / "tree", ".")
        assert inside.returncode == 1 and "set TMPDIR" in inside.stderr, inside.stderr
        assert snapshot(base / "tree") == before
        outside = save_from(base, "tree")
        assert outside.returncode == 0, outside.stderr
        assert sorted(os.listdir(base)) == ["layout", "tree"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_save_of_the_whole_cache_directory_is_unchanged_when_nothing_changed(
    cli: Run, tmp_path: Path
) -> None:
    """Saving all of ``~/.cache`` (pip's, go-build, ...): the state lived in ``~/.cache/remote-cache``,
    so each save wrote a file into the tree it had just saved -- the next save never came out
    unchanged, and the entry carried this machine's state to the next. State is no cache: it
    lives under ``~/.local/state`` (XDG_STATE_HOME) now."""
    home = tmp_path / "user"
    small_tree(home / ".cache" / "pip")
    env = {"HOME": str(home), "REMOTE_CACHE_STATE_DIR": ""}
    ref = f"oci:{tmp_path / 'layout'}:k"
    assert cli("save", "-q", str(home / ".cache"), ref, env=env).returncode == 0
    again = json_line(cli("save", str(home / ".cache"), ref, "--json", env=env))
    assert again["outcome"] == "unchanged"
    assert os.listdir(home / ".cache") == ["pip"]
    assert os.listdir(home / ".local" / "state" / "remote-cache")


@pytest.mark.parametrize("closed", [">&-", "2>&-", "<&-", ">&- 2>&-"])
def test_a_closed_standard_stream_is_as_good_as_dev_null(tmp_path: Path, pycache: Path, closed: str) -> None:
    """``cmd >&-`` (a stream the caller closed): the command runs as with ``/dev/null`` there, as
    Python's ``print`` takes it. A done restore exited 1 with a traceback ('NoneType' object has no
    attribute 'flush'), and with stderr closed restored nothing, ``--fail-open`` or not."""
    env = clean_env(tmp_path, pycache)
    src, layout = one_file_tree(tmp_path / "src"), f"oci:{tmp_path / 'layout'}:k"
    for args, out in (
        (["save", str(src), layout], None),
        (["--json", "restore", layout, str(tmp_path / "out1")], tmp_path / "out1"),
        (["--fail-open", "restore", layout, str(tmp_path / "out2")], tmp_path / "out2"),
        (["ls", f"oci:{tmp_path / 'layout'}"], None),
    ):
        proc = subprocess.run(
            ["sh", "-c", f'exec "$@" {closed}', "sh", str(CLI), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (closed, args, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        if out is not None:
            assert_same_tree(src, out)


def _with_stdout(args: list[str], env: dict[str, str], stdout: str) -> subprocess.CompletedProcess[str]:
    """The console script with stdout on a full disk (``full``) or a pipe its reader closed."""
    if stdout == "full":
        with open("/dev/full", "w") as full:
            return subprocess.run([str(CLI), *args], env=env, stdout=full, stderr=subprocess.PIPE, text=True)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([str(CLI), *args], env=env, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("stdout", ["full", "closed pipe"])
def test_a_report_stdout_refuses_fails_the_step_in_one_line_unless_fail_open(
    tmp_path: Path, pycache: Path, stdout: str
) -> None:
    """stdout refusing the report (a full disk, a pipe closed by its reader) is a failure said in
    one line naming stdout, or a warning under --fail-open (exit 0). It was "error: unexpected
    OSError: [Errno 28] No space left on device" (read as the restore's own disk), and a closed
    pipe exited 1 in silence, --fail-open or not."""
    env = clean_env(tmp_path, pycache)
    src, repo = one_file_tree(tmp_path / "src"), f"oci:{tmp_path / 'layout'}"
    assert subprocess.run([str(CLI), "save", str(src), f"{repo}:k", "-q"], env=env).returncode == 0
    for args, code in (
        (["--json", "restore", f"{repo}:k", str(tmp_path / "out")], 1),
        (["ls", repo], 1),
        (["--json", "--fail-open", "restore", f"{repo}:nokey", str(tmp_path / "none")], 0),
        (["--fail-open", "ls", repo], 0),
    ):
        proc = _with_stdout(args, env, stdout)
        assert proc.returncode == code, (args, proc.stderr)
        kind = "warning" if code == 0 else "error"
        said = f"remote-cache: {kind}: the report could not be written to stdout ("
        assert said in proc.stderr, proc.stderr
        assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert_same_tree(src, tmp_path / "out")  # (the restore itself was done)


def test_a_directory_to_save_that_is_not_there_is_an_error_fail_open_makes_a_warning(
    cli: Run, tmp_path: Path
) -> None:
    """A save of a directory no step made (a build that failed first): exit 1 and one line, and
    under --fail-open a warning and exit 0, as actions/cache warns. It was the option parser's
    usage error (exit 2, no JSON): an optional cache step broke the pipeline, --fail-open or not."""
    proc = cli("save", "not-made", "oci:layout:k")
    assert proc.returncode == 1, proc.stderr
    said = "'not-made' does not exist: nothing was saved (check the path, or the step meant to make it)"
    assert proc.stderr == f"remote-cache: error: {said}\n", proc.stderr
    proc = cli("save", "not-made", "oci:layout:k", "--fail-open", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("remote-cache: warning: 'not-made' does not exist"), proc.stderr
    data = json_line(proc)
    assert data["error_type"] == "NothingToSave" and data["failed_exit_code"] == 1, data
    assert not (tmp_path / "layout").exists()


def test_a_broken_entry_under_an_immutable_key_is_an_error_naming_rm(cli: Run, tmp_path: Path) -> None:
    """--immutable never replaces an entry, so a broken one (its document gone) stays broken: the
    save says so and what mends it (exit 1). It was "skipped: immutable key exists", exit 0, for
    good, while every restore missed saying the next save would repair it."""
    src, layout = one_file_tree(tmp_path / "src"), tmp_path / "layout"
    assert cli("save", str(src), f"oci:{layout}:k", "-q").returncode == 0
    layout_blob(layout, layout_top(layout)).unlink()
    assert cli("restore", f"oci:{layout}:k", str(tmp_path / "out")).returncode == 3
    proc = cli("save", str(src), f"oci:{layout}:k", "--immutable")
    assert proc.returncode == 1, proc.stderr
    assert "is broken" in proc.stderr and "`remote-cache rm` the key, then save again" in proc.stderr
    assert cli("rm", f"oci:{layout}:k").returncode == 0
    assert cli("save", str(src), f"oci:{layout}:k", "--immutable").returncode == 0
    assert cli("restore", f"oci:{layout}:k", str(tmp_path / "out")).returncode == 0
    assert_same_tree(src, tmp_path / "out")


def test_an_immutable_key_holding_another_tool_s_document_is_kept_as_before(cli: Run, tmp_path: Path) -> None:
    """Under --immutable a key whose tag holds what is no cache image (an artifact manifest) is an
    entry kept, skipped as before the broken-entry check: that check read it and failed the save."""
    src, layout = one_file_tree(tmp_path / "src"), tmp_path / "layout"
    assert cli("save", str(src), f"oci:{layout}:k", "-q").returncode == 0
    body = json.dumps({"mediaType": "application/vnd.oci.artifact.manifest.v1+json", "artifactType": "x/y"})
    digest = hashlib.sha256(body.encode()).hexdigest()
    layout_blob(layout, f"sha256:{digest}").write_text(body)
    entry = {"mediaType": "application/vnd.oci.artifact.manifest.v1+json", "digest": f"sha256:{digest}"}
    list_in_index(layout, {**entry, "size": len(body)}, "foreign")
    proc = cli("save", str(src), f"oci:{layout}:foreign", "--immutable")
    assert proc.returncode == 0, proc.stderr
    assert "save skipped foreign: immutable key exists" in proc.stderr, proc.stderr


def test_control_characters_read_from_a_store_are_printed_as_escapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A key or a message read from a store (an entry an older version or another tool wrote) may
    hold control characters the key rule now refuses: ``ls``/``inspect`` lines and every stderr
    line print them as escapes. U+009B (a terminal's CSI) and ESC went out raw."""
    from rich.console import Console

    from remote_cache.cli import app

    out = io.StringIO()
    app.plain(Console(file=out, width=1000), "k\u009b31m \x1b[2J nl\nend")
    assert out.getvalue() == "k\\x9b31m \\x1b[2J nl\\nend\n"
    forged = Entry(key="a\nb\u009b", tag="t\x1b", digest="sha256:x", error="e\r")
    assert format_table([forged]).split("\n")[1].startswith("a\\nb\\x9b  -"), format_table([forged])
    assert format_table([forged]).endswith("t\\x1b  (e\\r)")
    app._stderr_line("restore fallback k from a\u009bb\u2028c")
    assert capsys.readouterr().err == "restore fallback k from a\\x9bb\\u2028c\n"
