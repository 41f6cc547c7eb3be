"""The tar format, both ways: members and their headers as we write them, and header decoding.

Writing: POSIX ustar headers built directly, with a PAX extended header only when a field does
not fit (long or non-ASCII names, big sizes or ids, odd mtimes); numeric uid/gid, empty
uname/gname, whole-second mtimes and no atime/ctime, so the same tree always gives the same bytes.

Reading (:class:`HeaderDecoder`): ustar, GNU long names (``L``/``K``) and PAX (``x``, and global
``g``), whatever wrote them; checksums verified. A stream that is not tar at all raises
:class:`~remote_cache.errors.ImageFormatError`; a corrupt one
:class:`~remote_cache.errors.IntegrityError`.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Protocol

from ..errors import ImageFormatError, IntegrityError

__all__ = [
    "BLOCK",
    "DIR",
    "FILE",
    "HARDLINK",
    "MAX_DEPTH",
    "REGULAR_TYPES",
    "SYMLINK",
    "WHITEOUT_PREFIX",
    "ZERO_BLOCK",
    "Header",
    "HeaderDecoder",
    "Member",
    "byte_sum",
    "display",
    "tar_header",
]

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

#: Member kinds (what a path is): a regular file, a directory, a symlink, a hard link.
FILE, DIR, SYMLINK, HARDLINK = 0, 1, 2, 3
_TYPEFLAG = {FILE: b"0", DIR: b"5", SYMLINK: b"2", HARDLINK: b"1"}
#: Type flags of regular files (``\0`` is pre-POSIX, ``7`` contiguous).
REGULAR_TYPES = (b"0", b"\0", b"7")
#: The deepest member path (in components) a save walks or a restore extracts. Walks, removals
#: and the extractor's directory lookups recurse once per level (the walk two frames a level),
#: under Python's limit of 1000 frames; real caches nest a few dozen levels at most.
MAX_DEPTH = 256
#: A name starting so is an OCI whiteout (image-spec layer.md), ``.wh..wh..opq`` an opaque one.
WHITEOUT_PREFIX = ".wh."
#: Type flags of headers that describe the next member: PAX (local, global), GNU long name/link.
_META_TYPES = (b"x", b"g", b"L", b"K")
_MAX_META = 64 << 20

#: Owner ids a header may carry (uid_t and gid_t are 32 bits; all ones means "no change").
_MAX_ID = (1 << 32) - 2
#: Modification times a header may carry: what a 64-bit time_t holds, in nanoseconds.
_MIN_TIME_NS, _MAX_TIME_NS = -(1 << 63) * 1_000_000_000, (1 << 63) * 1_000_000_000 - 1
_OCTAL_12 = 0o77777777777
_OCTAL_8 = 0o7777777
# ustar header: name mode uid gid size mtime chksum typeflag linkname magic [version uname
# gname devmajor devminor] prefix [pad].
_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s82x155s12x")
_NUL100 = bytes(100)
_MID = b"ustar\x0000" + bytes(64) + b"0000000\x000000000\x00" + bytes(167)
# Checksum of the constant parts: the 8 spaces of the checksum field and _MID.
_CONST_SUM = 8 * 32 + sum(_MID)


class Member:
    """One tree member as it will be archived: relative path, kind and the stat fields tar keeps."""

    __slots__ = (
        "ctime_ns",
        "gid",
        "ino",
        "kind",
        "linkname",
        "mode",
        "mtime",
        "mtime_ns",
        "path",
        "size",
        "uid",
    )

    def __init__(
        self,
        path: str,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime: int,
        linkname: str = "",
        ino: int = 0,
        ctime_ns: int = 0,
        mtime_ns: int = 0,
    ) -> None:
        self.path = path  # relative, "/"-separated, str with surrogateescape for odd bytes
        self.kind = kind
        self.mode = mode  # permission bits incl. setuid/setgid/sticky
        self.uid = uid
        self.gid = gid
        self.size = size  # data bytes (0 unless FILE)
        self.mtime = mtime  # whole seconds
        self.linkname = linkname  # symlink target, or first path of a hard-linked inode
        # Not archived: local evidence that a file is unchanged (see remote_cache.cache.evidence),
        # and what packing checks the file it reads against (see remote_cache.archive.pack).
        self.ino = ino
        self.ctime_ns = ctime_ns
        self.mtime_ns = mtime_ns

    @property
    def tar_size(self) -> int:
        """Bytes this member takes in a tar stream: its header plus its data padded to a block."""
        return BLOCK + ((self.size + BLOCK - 1) & ~(BLOCK - 1))

    def __repr__(self) -> str:
        return f"Member({self.path!r}, kind={self.kind}, size={self.size})"


def byte_sum(data: bytes | memoryview) -> int:
    """The exact byte sum of up to 256 bytes, fast.

    adler32's low half is (1 + sum) mod 65521, and 256 bytes sum to at most 65280: much faster
    than ``sum()`` on the header fields.
    """
    return (zlib.adler32(data) & 0xFFFF) - 1


def _header_sum(hdr: bytes) -> int:
    mv = memoryview(hdr)
    return byte_sum(mv[:256]) + byte_sum(mv[256:])


def display(path: bytes) -> str:
    """A member path for messages."""
    return os.fsdecode(path)


# ---------------------------------------------------------------------------------------------
# Writing


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _ustar(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typ: bytes, link: bytes
) -> bytes:
    nums = b"%07o\x00%07o\x00%07o\x00%011o\x00%011o\x00" % (mode, uid, gid, size, mtime)
    chk = _CONST_SUM + byte_sum(name) + byte_sum(nums) + typ[0] + (byte_sum(link) if link else 0)
    return b"".join(
        (name, _NUL100[len(name) :], nums, b"%06o\x00 " % chk, typ, link, _NUL100[len(link) :], _MID)
    )


def tar_header(e: Member, name_suffix: str = "") -> bytes:
    """The tar header block(s) for ``e``: ustar, preceded by a PAX header when a field needs it."""
    name = (e.path + name_suffix).encode("utf-8", "surrogateescape")
    link = e.linkname.encode("utf-8", "surrogateescape") if e.linkname else b""
    size, mtime, uid, gid = e.size, e.mtime, e.uid, e.gid
    pax: list[bytes] = []
    if len(name) > 100 or not name.isascii():
        pax.append(_pax_record("path", name))
        name = name[:100]
    if len(link) > 100 or not link.isascii():
        pax.append(_pax_record("linkpath", link))
        link = link[:100]
    if size > _OCTAL_12:
        pax.append(_pax_record("size", b"%d" % size))
        size = 0
    if not 0 <= mtime <= _OCTAL_12:
        pax.append(_pax_record("mtime", b"%d" % mtime))
        mtime = 0 if mtime < 0 else _OCTAL_12
    if uid > _OCTAL_8:
        pax.append(_pax_record("uid", b"%d" % uid))
        uid = 0
    if gid > _OCTAL_8:
        pax.append(_pax_record("gid", b"%d" % gid))
        gid = 0
    main = _ustar(name, e.mode & 0o7777, uid, gid, size, mtime, _TYPEFLAG[e.kind], link)
    if not pax:
        return main
    try:
        b"".join(pax).decode("utf-8")
    except UnicodeDecodeError:
        pax.insert(0, _pax_record("hdrcharset", b"BINARY"))
    body = b"".join(pax)
    xhdr = _ustar(b"././@PaxHeader", 0o644, 0, 0, len(body), 0, b"x", b"")
    return xhdr + body + bytes(-len(body) % BLOCK) + main


# ---------------------------------------------------------------------------------------------
# Reading


def _num(field: bytes, member: str) -> int:
    """A numeric header field: octal, or GNU base-256 (a leading 0x80 or 0xFF byte)."""
    if field and field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            n -= 1 << (8 * (len(field) - 1))
        return n
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise IntegrityError(f"tar header of {member!r} has a bad number field {field!r}") from exc


def _oct(field: bytes, name: bytes) -> int:
    """``_num`` with a fast path for the usual NUL/space-terminated octal."""
    try:
        return int(field.rstrip(b"\0 "), 8)
    except ValueError:
        return _num(field, display(name))


def _owner(n: int, name: bytes) -> int:
    """Owner id ``n`` of member ``name`` (base-256 and PAX may hold any number), if in range."""
    if not 0 <= n <= _MAX_ID:
        raise IntegrityError(f"tar member {display(name)!r} has an owner id out of range ({n})")
    return n


def _time_ns(ns: int, name: bytes) -> int:
    """Modification time ``ns`` of member ``name``, if a time_t holds it."""
    if not _MIN_TIME_NS <= ns <= _MAX_TIME_NS:
        raise IntegrityError(f"tar member {display(name)!r} has a modification time out of range")
    return ns


def _id(field: bytes, name: bytes) -> int:
    """An owner id field, checked (:func:`_owner`)."""
    return _owner(_oct(field, name), name)


def _seconds(field: bytes, name: bytes) -> int:
    """An mtime field in seconds, checked (:func:`_time_ns`)."""
    n = _oct(field, name)
    _time_ns(n * 1_000_000_000, name)
    return n


def _parse_pax(data: bytes, member: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError as exc:
            raise IntegrityError(f"malformed PAX header near {member!r}") from exc
        rec = data[sp + 1 : pos + length]
        if length <= 0 or sp < 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise IntegrityError(f"malformed PAX header near {member!r}")
        key, _, value = rec[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value
        pos += length
    return out


def _pax_time_ns(value: bytes, member: str) -> int:
    try:
        text = value.decode("ascii")
        sign = -1 if text.startswith("-") else 1
        whole, _, frac = text.lstrip("-").partition(".")
        return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9]))
    except ValueError as exc:
        raise IntegrityError(f"bad PAX mtime {value!r} for {member!r}") from exc


def _pax_int(pax: dict[str, bytes], key: str, member: str) -> int:
    try:
        return int(pax[key])
    except ValueError as exc:
        raise IntegrityError(f"tar member {member!r} has a malformed PAX {key} record") from exc


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


class ByteSource(Protocol):
    """What :class:`HeaderDecoder` reads from (a layer's uncompressed stream)."""

    @property
    def offset(self) -> int: ...

    def read_exact(self, n: int, what: str) -> bytes: ...

    def at_eof(self) -> bool: ...

    def drain(self) -> None: ...


#: A decoded member header: type flag, path, link target, size, mode, uid, gid, mtime (ns).
Header = tuple[bytes, bytes, bytes, int, int, int, int, int]


class _Meta:
    """What the PAX and GNU headers before a member say about it."""

    __slots__ = ("longlink", "longname", "pax")

    def __init__(self) -> None:
        self.pax: dict[str, bytes] = {}
        self.longname: bytes | None = None
        self.longlink: bytes | None = None


class HeaderDecoder:
    """Decodes one layer's member headers in order; the caller consumes each member's data.

    ``numbers`` caches parsed number fields across layers: mode, ids and mtime repeat across
    members, and the value is a pure function of the field's bytes.
    """

    def __init__(self, numbers: dict[bytes, int] | None = None) -> None:
        self._gpax: dict[str, bytes] = {}
        self._nums = numbers if numbers is not None else {}
        self._first = True

    def next(self, r: ByteSource) -> Header | None:
        """The next member's header; None at the end of the archive."""
        meta: _Meta | None = None
        while True:
            if self._first:
                if r.at_eof():
                    raise ImageFormatError("layer is empty, not a tar archive")
            elif r.at_eof():
                # The stream ended right after a member, without the two zero blocks. umoci 0.4
                # writes layers like this and GNU tar and containerd accept them. A blob cut short
                # is still caught: compressed streams must end on a complete frame, and restore
                # checks every blob's digest before the swap.
                return None
            hdr = r.read_exact(BLOCK, "a header")
            total = _header_sum(hdr)
            if total == 0:
                r.drain()  # end of archive (one or two zero blocks); the rest must be padding
                return None
            name_f, mode_f, uid_f, gid_f, size_f, mtime_f, chk_f, typ, link_f, magic, prefix_f = _HDR.unpack(
                hdr
            )
            self._check(chk_f, total, r)
            name_b = name_f.partition(b"\0")[0]
            if magic == b"ustar\0" and prefix_f[0] != 0:
                name_b = prefix_f.partition(b"\0")[0] + b"/" + name_b
            size = _oct(size_f, name_b)
            if typ in _META_TYPES:
                meta = self._meta(r, typ, name_b, size, meta or _Meta())
                continue
            link_b = link_f.partition(b"\0")[0]
            if meta is not None or self._gpax:
                return self._with_meta(
                    meta or _Meta(), typ, name_b, link_b, size, mode_f, uid_f, gid_f, mtime_f
                )
            nums = self._nums
            if len(nums) > 4096:
                nums.clear()
            mode = nums.get(mode_f, -1)
            if mode < 0:
                mode = nums[mode_f] = _oct(mode_f, name_b)
            # The cache is keyed by raw bytes, shared with the mode field: a value it holds may
            # not have been range-checked as an owner id.
            uid = nums.get(uid_f, -1)
            if not 0 <= uid <= _MAX_ID:
                uid = nums[uid_f] = _id(uid_f, name_b)
            gid = nums.get(gid_f, -1)
            if not 0 <= gid <= _MAX_ID:
                gid = nums[gid_f] = _id(gid_f, name_b)
            mtime = nums.get(mtime_f, -1)
            if mtime < 0:
                mtime = nums[mtime_f] = _seconds(mtime_f, name_b)
            if size < 0:
                raise IntegrityError(f"tar member {display(name_b)!r} has a negative size")
            return typ, name_b, link_b, size, mode & 0o7777, uid, gid, mtime * 1_000_000_000

    def _check(self, chk_f: bytes, total: int, r: ByteSource) -> None:
        try:
            stored = int(chk_f.rstrip(b"\0 "), 8)
        except ValueError:
            try:
                stored = _num(chk_f, "?")
            except IntegrityError:
                stored = -1
        if stored != total - sum(chk_f) + 256:
            if self._first:
                raise ImageFormatError("layer is not a tar archive (bad header checksum)")
            raise IntegrityError(f"corrupt tar header at offset {r.offset - BLOCK} (bad checksum)")
        self._first = False

    def _meta(self, r: ByteSource, typ: bytes, name_b: bytes, size: int, meta: _Meta) -> _Meta:
        """Read a PAX or GNU long-name header's data into ``meta`` (global PAX into the decoder)."""
        if size > _MAX_META:
            raise ImageFormatError(f"oversized tar metadata entry ({size} bytes) near {display(name_b)!r}")
        data = r.read_exact(size, "a PAX header")
        r.read_exact(-size % BLOCK, "padding")
        if typ == b"x":
            meta.pax = _parse_pax(data, display(name_b))
        elif typ == b"g":
            self._gpax.update(_parse_pax(data, display(name_b)))
        elif typ == b"L":
            meta.longname = _cstr(data)
        else:
            meta.longlink = _cstr(data)
        return meta

    def _with_meta(
        self,
        meta: _Meta,
        typ: bytes,
        name_b: bytes,
        link_b: bytes,
        size: int,
        mode_f: bytes,
        uid_f: bytes,
        gid_f: bytes,
        mtime_f: bytes,
    ) -> Header:
        """A header whose fields PAX records or GNU long names override."""
        pax = {**self._gpax, **meta.pax} if self._gpax else meta.pax
        if meta.longname is not None:
            name_b = meta.longname
        if meta.longlink is not None:
            link_b = meta.longlink
        name_b = pax.get("path", name_b)
        link_b = pax.get("linkpath", link_b)
        member = display(name_b)
        if b"\0" in name_b or b"\0" in link_b:  # a PAX value may hold one; no path can
            raise IntegrityError(f"tar member {member!r} has a NUL byte in its path or link target")
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise ImageFormatError(
                f"tar member {member!r} is a GNU sparse file (PAX format), which remote-cache does not "
                "restore (its own layers never hold one)"
            )
        if "size" in pax:
            size = _pax_int(pax, "size", member)
        mode = _num(mode_f, member) & 0o7777
        uid = _owner(_pax_int(pax, "uid", member) if "uid" in pax else _num(uid_f, member), name_b)
        gid = _owner(_pax_int(pax, "gid", member) if "gid" in pax else _num(gid_f, member), name_b)
        mtime_ns = _time_ns(
            _pax_time_ns(pax["mtime"], member) if "mtime" in pax else _num(mtime_f, member) * 1_000_000_000,
            name_b,
        )
        if size < 0:
            raise IntegrityError(f"tar member {member!r} has a negative size")
        return typ, name_b, link_b, size, mode, uid, gid, mtime_ns
