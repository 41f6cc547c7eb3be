"""Which files the v0.21.8 engine uploads for a local module, computed the way the engine does.

``core/schema/modulesource.go`` (``loadModuleSourceContext``) selects from the context directory
(the git root) ``<root>/dagger.json``, the source directory (``*`` when it is ``.``) and the
``include`` patterns of ``dagger.json`` rebased onto the context (``rebasePatterns``), with
``gitignore`` applied; ``core/schema/host.go`` cleans the patterns, and the filesync walker
matches them with ``util/patternmatcher`` (moby's, vendored) and ``MatchesUsingParentResults``.
The Python runtime (``sdk/python/runtime/discovery.go``) then drops ``<source>/.venv`` and
``<source>/sdk``. :class:`Pattern` is a line-by-line port of that matcher.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "DIR_EXCLUDES",
    "ModuleUpload",
    "Pattern",
    "PatternMatcher",
    "copy_upload",
    "module_upload",
    "rebase_patterns",
]

#: discovery.go ``DirExcludes``: removed from the source dir by the Python runtime.
DIR_EXCLUDES = (".venv", "sdk")
_ESCAPE = set(".+()|{}$")


class _Kind(Enum):
    EXACT = 1
    PREFIX = 2
    SUFFIX = 3
    REGEXP = 4


class Pattern:
    """One buildkit/moby pattern (``util/patternmatcher``): ``*``, ``?``, ``**``, ``[...]``, ``!``."""

    def __init__(self, raw: str) -> None:
        p = raw.strip()
        if not p:
            raise ValueError("empty pattern")
        p = _clean(p)
        self.exclusion = p.startswith("!")
        if self.exclusion:
            if len(p) == 1:
                raise ValueError('illegal exclusion pattern: "!"')
            p = p[1:]
        self.cleaned = p
        self._kind, self._regexp = _compile(p)

    def __repr__(self) -> str:
        return f"Pattern({'!' if self.exclusion else ''}{self.cleaned!r})"

    def match(self, path: str) -> bool:
        """Whether ``path`` (slash-separated, relative) matches, ignoring ``!``."""
        if self._kind is _Kind.EXACT:
            return path == self.cleaned
        if self._kind is _Kind.PREFIX:
            return path.startswith(self.cleaned[:-2])
        if self._kind is _Kind.SUFFIX:
            suffix = self.cleaned[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]
        assert self._regexp is not None
        return self._regexp.search(path) is not None


def _compile(pattern: str) -> tuple[_Kind, re.Pattern[str] | None]:
    # Port of Pattern.compile: note the quirks kept on purpose (a leading ``**`` makes a
    # suffix match unless a later wildcard turns it back into a regexp).
    out = "^"
    kind = _Kind.EXACT
    i, n, step = 0, len(pattern), 0
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                if i >= n:
                    if kind is _Kind.EXACT:
                        kind = _Kind.PREFIX
                    else:
                        out += ".*"
                        kind = _Kind.REGEXP
                else:
                    out += "(.*/)?"
                    kind = _Kind.REGEXP
                if step == 0:
                    kind = _Kind.SUFFIX
            else:
                out += "[^/]*"
                kind = _Kind.REGEXP
        elif ch == "?":
            out += "[^/]"
            kind = _Kind.REGEXP
        elif ch in _ESCAPE:
            out += "\\" + ch
        elif ch == "\\":
            if i < n:
                out += "\\" + pattern[i]
                i += 1
                kind = _Kind.REGEXP
            else:
                out += "\\\\"
        elif ch in "[]":
            out += ch
            kind = _Kind.REGEXP
        else:
            out += ch
        step += 1
    if kind is not _Kind.REGEXP:
        return kind, None
    return kind, re.compile(out + "$")


def _clean(path: str) -> str:
    cleaned = posixpath.normpath(path)
    # Go's filepath.Clean keeps no leading "//"; posixpath does.
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


class PatternMatcher:
    """An ordered pattern list with ``!`` exceptions, matched like ``MatchesUsingParentResults``."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [Pattern(p) for p in patterns if p.strip()]

    def matches(self, path: str, parent: list[bool] | None = None) -> tuple[bool, list[bool]]:
        """Match ``path`` given the per-pattern results of its parent directory."""
        matched = False
        info = [False] * len(self.patterns)
        for i, pattern in enumerate(self.patterns):
            hit = parent[i] if parent else False
            if not hit:
                if pattern.exclusion != matched:
                    continue
                hit = pattern.match(path)
                if not hit and not parent:
                    parts = path.split("/")[:-1]
                    for j in range(len(parts)):
                        if pattern.match("/".join(parts[: j + 1])):
                            hit = True
                            break
            info[i] = hit
            if hit:
                matched = not pattern.exclusion
        return matched, info

    def select(self, files: Iterable[str]) -> list[str]:
        """The files (slash paths) that match, walking their directories top-down."""
        memo: dict[str, tuple[bool, list[bool]]] = {}

        def result(path: str) -> tuple[bool, list[bool]]:
            if path not in memo:
                parent = posixpath.dirname(path)
                memo[path] = self.matches(path, result(parent)[1] if parent else None)
            return memo[path]

        return sorted(f for f in files if result(f)[0])


def rebase_patterns(patterns: Sequence[str], base: str) -> list[str]:
    """modulesource.go ``rebasePatterns``: make ``dagger.json`` patterns context-relative."""
    out = []
    for pattern in patterns:
        negation = pattern.startswith("!")
        rel = _clean(posixpath.join(base, pattern.removeprefix("!")))
        if rel == ".." or rel.startswith("../") or rel.startswith("/"):
            raise ValueError(f"include/exclude path {rel!r} escapes context")
        out.append("!" + rel if negation else rel)
    return out


@dataclass(frozen=True)
class ModuleUpload:
    """What the engine sees of one local module."""

    context_dir: Path  #: the git root, the context directory
    root_subpath: str  #: dagger.json's directory, relative to the context
    source_subpath: str  #: the SDK source directory, relative to the context
    config: dict[str, object]  #: dagger.json
    include_patterns: list[str]  #: as passed to host.directory(include=...)
    files: list[str]  #: the upload set, slash paths relative to the context


def _git_files(context_dir: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=context_dir,
        capture_output=True,
        check=True,
    ).stdout.decode()
    tracked = {f for f in out.split("\0") if f}
    # Tracked-but-ignored files are uploaded by git, not by the engine's gitignore filter.
    ignored = subprocess.run(
        ["git", "check-ignore", "-z", "--no-index", "--stdin"],
        cwd=context_dir,
        input="\0".join(sorted(tracked)).encode(),
        capture_output=True,
        check=False,
    ).stdout.decode()
    drop = {f for f in ignored.split("\0") if f}
    return sorted(f for f in tracked - drop if (context_dir / f).is_file())


def module_upload(module_dir: Path) -> ModuleUpload:
    """Compute the upload set of the module whose ``dagger.json`` is in ``module_dir``."""
    module_dir = module_dir.resolve()
    context_dir = Path(
        subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=module_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ).resolve()
    root = _clean(module_dir.relative_to(context_dir).as_posix() or ".")
    config = json.loads((module_dir / "dagger.json").read_text())
    sdk = config.get("sdk") or {}
    sdk_source = sdk.get("source", "") if isinstance(sdk, dict) else str(sdk)
    source = str(config.get("source", "") or "")
    if source and not sdk_source:
        raise ValueError(f"source path {source!r} specified without sdk")
    subpath = ""
    if sdk_source:
        subpath = _clean(posixpath.join(root, source)) if source else root

    full = [root + "/dagger.json"]
    if subpath == ".":
        full.append("*")  # "." ends up matching nothing, so the engine converts it to "*"
    else:
        full.append(subpath or root)
    full.extend(rebase_patterns(list(config.get("include", []) or []), root))

    # host.go: strip "!", Join with "." (a Clean), "." becomes "*", non-local patterns dropped.
    patterns = []
    for inc in full:
        negative = inc.startswith("!")
        inc = _clean(inc.removeprefix("!"))
        if inc == ".." or inc.startswith(("../", "/")):
            continue
        if inc == ".":
            inc = "*"
        patterns.append("!" + inc if negative else inc)

    files = PatternMatcher(patterns).select(_git_files(context_dir))
    src_prefix = "" if subpath in ("", ".") else subpath + "/"
    dropped = tuple(src_prefix + d + "/" for d in DIR_EXCLUDES)
    files = [f for f in files if not f.startswith(dropped)]
    return ModuleUpload(context_dir, root, subpath or root, config, patterns, files)


def copy_upload(upload: ModuleUpload, dest: Path) -> Path:
    """Copy only the upload set under ``dest`` (context layout kept); return the module dir there."""
    for rel in upload.files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(upload.context_dir / rel, target)
    return dest / upload.source_subpath
