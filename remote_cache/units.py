"""Sizes, durations and times as people write them, one parser and one formatter of each (no I/O).

* sizes: :func:`parse_size` reads ``500M``/``2G``/``1.5GiB`` (binary, as docker and ``du -h``) and
  ``2GB``/``10kB`` (decimal); :func:`format_bytes` writes decimal units (``123.4 MB``), as rich's
  transfer columns do, and :func:`format_rate` a throughput;
* durations: :func:`parse_duration` reads ``30m``, ``12h``, ``7d``, ``2w``, ``1d12h``;
* times: :func:`format_time` writes RFC 3339 UTC to the second (what our annotations hold) and
  :func:`parse_time` reads what we, Go tools and Docker write.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = [
    "counted",
    "format_bytes",
    "format_rate",
    "format_time",
    "parse_duration",
    "parse_size",
    "parse_time",
    "size_above",
]

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """Bytes in a human size: ``500M``, ``2G``, ``1.5GiB`` (binary) or ``2GB``, ``10kB`` (decimal).

    A bare letter (``K M G T P``) or ``KiB``-style suffix means powers of 1024, as in docker and
    ``du -h``; ``KB``/``MB``/``GB`` mean powers of 1000; a plain number is bytes.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write e.g. 500M, 2G, 1.5GiB or 2GB")
    number, prefix, suffix = match.group(1), match.group(2).lower(), match.group(3).lower()
    if not prefix and suffix not in ("", "b"):
        raise ValueError(f"{text!r} is not a size: write e.g. 500M, 2G, 1.5GiB or 2GB")
    base = 1000 if suffix == "b" and prefix else 1024
    return int(float(number) * base ** _POWERS[prefix])


def size_above(size: int) -> str:
    """A size that :func:`parse_size` reads as comfortably above ``size`` (twice it), e.g. ``3G``."""
    for unit, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if size * 2 < factor * 1024 or unit == "G":
            return f"{-(-size * 2 // factor)}{unit}"
    raise AssertionError("unreachable")


def format_bytes(count: float) -> str:
    """``123.4 MB`` style (decimal units, like rich's transfer columns)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_rate(count: float, seconds: float) -> str:
    """Throughput as ``58.8 MB/s`` (``-`` when the time is too short to mean anything)."""
    if seconds <= 0.0005:
        return "- MB/s"
    return f"{format_bytes(count / seconds)}/s"


def parse_duration(text: str) -> timedelta:
    """A duration such as ``0s``, ``30m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30m, 12h, 7d or 2w (s/m/h/d/w)")
    return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with second precision, e.g. ``2026-01-31T12:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp (as written by us, Go tools or Docker); None when absent or bad."""
    if not text:
        return None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    # Go writes nanoseconds; datetime takes at most microseconds.
    if "." in value:
        head, _, rest = value.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits) :]
        value = f"{head}.{digits[:6]}{tz}" if digits else head + tz
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 file``, ``2 files``, ``1 entry``, ``3 entries``: a count with its noun agreeing."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
