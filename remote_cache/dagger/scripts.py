"""Shell snippets the Dagger module runs in a small helper container, and that image.

A cache volume cannot be read as a Directory, and the user's image may have no tools at all,
so every copy into or out of a volume runs in a pinned Alpine image (BusyBox ``sh``/``cp``).
Each snippet is POSIX ``sh`` run as ``sh -c SNIPPET sh ARG...`` (arguments are positional, never
interpolated into the script), so odd paths need no quoting on the Python side.

Copies use ``cp -a DIR/. DEST/``: BusyBox ``cp -a`` keeps dotfiles, symlinks (dangling ones too),
hardlinks, empty directories, modes, numeric ownership and mtimes (whole seconds), including
directory mtimes, which BusyBox ``tar -x`` does not restore.

"Unchanged" is decided before copying: a listing hash (name, size, mtime, ctime, inode, mode,
owner, link count of every entry) is recorded in a per-engine state file when a volume is mounted,
and the export compares it with the volume's current listing; equal means nothing to upload.
ctime changes on any write, so an edit that restores size and mtime is still seen.
The listing is recorded only when the remote copy under the volume's own key matches it: after a
fallback (a restore key) the exact key has no entry yet, so the next export must upload.
"""

from __future__ import annotations

import hashlib
import json

from msgspec import Struct

from ..archive.owners import STAT_FORMAT

__all__ = [
    "BOOKKEEPING_ROOT",
    "COPY_OUT",
    "FORGET",
    "FUNCTIONS",
    "HELPER_IMAGE",
    "HELPER_PATH",
    "NONCE_ENV",
    "OUT_DIR",
    "OWNERS",
    "PUT_OWNERS",
    "RECORD",
    "SEED",
    "SRC_DIR",
    "STATE_DIR",
    "STATE_VOLUME",
    "STATUS_PREFIX",
    "VOLUME_FILE",
    "CopyStatus",
    "bookkeeping_dir",
    "parse_status",
    "parse_volume_record",
    "state_file",
    "volume_record",
]

#: The helper image: Alpine with BusyBox, pinned by digest. Tag and digest are the ones Dagger
#: v0.21.8 itself pins (``sdk/typescript/runtime/tsdistconsts/consts.go``, DefaultAlpineImageRef),
#: so an engine of that version likely has it already.
HELPER_IMAGE = "alpine:3.22.2@sha256:4b7ce07002c69e8f3d704a9c5d6fd3053be500b7f1c69fc0d80990c2ad8dd412"

#: Prefix of the status line COPY_OUT prints: ``<prefix> STATE LISTING-HASH KIB`` (see
#: :func:`parse_status`).
STATUS_PREFIX = "remote-cache-status:"

#: Shell functions every snippet starts with: ``is_empty DIR``, ``listing DIR`` (print its listing
#: hash), ``record VALUE FILE`` (write atomically).
FUNCTIONS = r"""
is_empty() {
  [ -z "$(ls -A "$1")" ]
}
listing() {
  ( cd "$1" && find . -exec stat -c '%n|%s|%y|%z|%i|%f|%u|%g|%h' {} + \
      | LC_ALL=C sort | sha256sum | cut -d' ' -f1 )
}
record() {
  mkdir -p "$(dirname "$2")"
  printf '%s\n' "$1" > "$2.tmp.$$"
  mv -f "$2.tmp.$$" "$2"
}
"""

#: ``SEED SRC CACHE STATE [record|forget]``: copy SRC into CACHE only when CACHE is empty (a
#: warm engine's volume is at least as fresh as the remote copy) and then record CACHE's listing
#: hash in STATE (``record``, the default: SRC is the entry under the volume's own key). A kept
#: volume leaves STATE alone. ``forget`` drops STATE first: SRC came from a restore key, so the
#: exact key has no entry yet and the next export must upload.
SEED = (
    "set -eu"
    + FUNCTIONS
    + r"""
src=$1 cache=$2 state=$3 mode=${4:-record}
if [ "$mode" = forget ]; then
  rm -f "$state"
fi
if is_empty "$cache"; then
  cp -a "$src/." "$cache/"
  echo "remote-cache: restored into empty volume"
  if [ "$mode" != forget ]; then
    record "$(listing "$cache")" "$state"
  fi
else
  # Keep STATE as it is: it holds the listing last restored or uploaded, so changes made since
  # (an export that failed, a read-only run) are still seen as changes by the next export.
  echo "remote-cache: volume already has content, kept it"
fi
"""
)

#: ``FORGET STATE``: drop the recorded listing (after a miss, the next export must upload).
FORGET = 'set -eu\nrm -f "$1"\n'

#: ``COPY_OUT CACHE OUT STATE [MAX_KIB]``: when CACHE's listing differs from the one recorded in
#: STATE, copy CACHE into OUT (created) -- unless MAX_KIB (> 0) is set and ``du -sk`` says CACHE
#: is bigger, in which case nothing is copied (``too-big``). Always prints one status line (see
#: :func:`parse_status`); the size is measured only when there is a limit (else ``-``).
COPY_OUT = (
    "set -eu"
    + FUNCTIONS
    + r"""
cache=$1 out=$2 state=$3 max=${4:-0}
now=$(listing "$cache")
if [ -f "$state" ] && [ "$(cat "$state")" = "$now" ]; then
  echo "remote-cache-status: unchanged $now -"
  exit 0
fi
kib=-
if [ "$max" -gt 0 ]; then
  kib=$(du -sk "$cache" | cut -f1)
  if [ "$kib" -gt "$max" ]; then
    echo "remote-cache-status: too-big $now $kib"
    exit 0
  fi
fi
mkdir -p "$out"
cp -a "$cache/." "$out/"
echo "remote-cache-status: changed $now $kib"
"""
)

#: ``RECORD HASH STATE``: record HASH as the listing the remote copy now matches.
RECORD = "set -eu" + FUNCTIONS + 'record "$1" "$2"\n'

#: ``OWNERS DIR``: list DIR's entries not owned by 0:0, one ``UID GID ./PATH`` line each (see
#: :mod:`remote_cache.archive.owners`, which reads it and puts the owners back on a copy).
OWNERS = (
    'set -eu\ncd "$1"\n'
    f"find . -mindepth 1 \\( ! -user 0 -o ! -group 0 \\) -exec stat -c '{STAT_FORMAT}' {{}} +\n"
)

#: ``PUT_OWNERS TREE LISTS``: give TREE's entries the owners (and set-ID modes) in LISTS, as
#: written by :func:`remote_cache.archive.owners.write_owner_lists` (paths are ``./``-relative
#: and NUL-terminated; ``chown -h`` never follows a symlink).
PUT_OWNERS = (
    'set -eu\ncd "$1"\n'
    'for list in "$2"/owner.*; do\n'
    '  [ -f "$list" ] || continue\n'
    "  ids=${list##*/owner.}\n"
    '  xargs -0 -r chown -h "${ids%.*}:${ids#*.}" < "$list"\n'
    "done\n"
    'for list in "$2"/mode.*; do\n'
    '  [ -f "$list" ] || continue\n'
    '  xargs -0 -r chmod "${list##*/mode.}" < "$list"\n'
    "done\n"
)


class CopyStatus(Struct, frozen=True):
    """What COPY_OUT decided: ``state`` is ``changed`` (copied), ``unchanged`` or ``too-big`` (not copied)."""

    state: str
    listing: str
    #: The volume's ``du -sk`` size, measured only under a size limit.
    kib: int | None = None

    @property
    def changed(self) -> bool:
        """True when the volume was copied out and should be uploaded."""
        return self.state == "changed"


_STATES = ("changed", "unchanged", "too-big")


def parse_status(stdout: str) -> CopyStatus:
    """COPY_OUT's decision from its output; ValueError when there is no status line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(STATUS_PREFIX):
            parts = line[len(STATUS_PREFIX) :].split()
            if len(parts) == 3 and parts[0] in _STATES and (parts[2] == "-" or parts[2].isdigit()):
                return CopyStatus(parts[0], parts[1], None if parts[2] == "-" else int(parts[2]))
    raise ValueError(f"no {STATUS_PREFIX!r} line in the copy step's output")


# -- Where things live. Shared by the module (which builds the containers) and its tests. --

#: Mount point, in the user's container, of one small bookkeeping directory per remote-cached
#: volume. A mount, unlike a label or an env var, never ends up in an image the user publishes.
BOOKKEEPING_ROOT = "/.remote-cache"
#: The file inside a bookkeeping directory: ``{"key": ..., "path": ...}``.
VOLUME_FILE = "volume.json"
#: Where the helper steps see the module's own state volume (recorded listing hashes).
STATE_DIR = "/.remote-cache-state"
#: Name of that state volume (in the remote-cache module's cache namespace).
STATE_VOLUME = "remote-cache-state"
#: Where the helper steps see the imported entry, and where COPY_OUT writes its copy (a mounted
#: empty directory, whose content is what a backend is handed).
SRC_DIR = "/.remote-cache-src"
OUT_DIR = "/.remote-cache-out"
#: PATH for the helper steps: Alpine's, whatever the user's image set.
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Env var holding a per-call random value, so a helper step is never served from the exec
#: cache (exec caching ignores cache-volume contents, which are what the step works on).
NONCE_ENV = "REMOTE_CACHE_NONCE"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def bookkeeping_dir(path: str) -> str:
    """Mount point of the bookkeeping directory for a volume mounted at ``path``."""
    return f"{BOOKKEEPING_ROOT}/{_digest(path)[:16]}"


def state_file(key: str, path: str) -> str:
    """The state file recording the listing hash of the volume for ``key`` at ``path``."""
    return f"{STATE_DIR}/{_digest(key, path)[:32]}"


def volume_record(key: str, path: str) -> str:
    """The ``volume.json`` text for a volume. Deterministic: it must not bust the user's exec cache."""
    return json.dumps({"key": key, "path": path}, sort_keys=True)


def parse_volume_record(text: str) -> tuple[str, str]:
    """``(key, path)`` from a ``volume.json``; ValueError when it is not one of ours."""
    try:
        data = json.loads(text)
        key, path = data["key"], data["path"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a remote-cache volume record: {exc}") from exc
    if not isinstance(key, str) or not isinstance(path, str):
        raise ValueError("not a remote-cache volume record: key and path must be strings")
    return key, path
