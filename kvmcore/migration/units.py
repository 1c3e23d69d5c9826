"""Sizes, rates and durations as people type them ("4G", "64MiB/s", "300ms").

Binary units throughout (K = 1024), as QEMU's ``-m`` and ``max-bandwidth`` are.
Every parser raises ``ValueError`` with the text it could not read, so the command
line can turn it into one line on stderr.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e(?P<exp>[+-]?[0-9]+))?"
_SIZE = re.compile(_NUMBER + r"\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_RATE = re.compile(_NUMBER + r"\s*(?P<unit>[kmgt]?)(?P<bytes>i?b)?(?:/s|ps)?", re.IGNORECASE)
_DURATION = re.compile(_NUMBER + r"\s*(?P<unit>ms|s|us)?", re.IGNORECASE)


def _number(match: re.Match) -> float:
    value = float(match["num"])
    if match["exp"]:
        value *= 10.0 ** int(match["exp"])
    return value


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: "4G", "512MiB", "2M", "4096" (bytes)."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 4096, 64M, 4G)")
    value = _number(match) * _SIZE_UNITS[match["unit"].lower()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str | float, page_size: int) -> float:
    """Pages per second in ``text``: a plain number is pages/s ("20000"); a number with
    a unit is bytes/s ("64M", "64MiB/s", "1GB/s"), converted at ``page_size``."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _RATE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"cannot read {text!r} as a rate (pages/s like 20000, or bytes/s like 64M or 64MiB/s)")
    value = _number(match)
    if match["unit"] or match["bytes"]:
        value = value * _SIZE_UNITS[match["unit"].lower()] / page_size
    return value


def parse_bandwidth(text: str | float) -> float:
    """Bytes per second in ``text`` ("128M", "128MiB/s", "1G", or plain bytes/s)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _RATE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"cannot read {text!r} as a bandwidth in bytes/s (e.g. 128M, 1GiB/s)")
    return _number(match) * _SIZE_UNITS[match["unit"].lower()]


def parse_duration_ms(text: str | float) -> float:
    """Milliseconds in ``text``: a plain number is ms (QEMU's unit), or "300ms", "0.3s"."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"cannot read {text!r} as a duration (ms like 300, or 300ms, 0.3s)")
    scale = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 0.001}[(match["unit"] or "").lower()]
    return _number(match) * scale


def format_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at or above 1."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes:.0f} B"
