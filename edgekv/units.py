"""Parsing and printing byte sizes (``16MB``, ``16MiB``, ``1048576``)."""

from __future__ import annotations

import re

from edgekv.errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: plain bytes, SI (``16MB`` = 16e6) or binary (``16MiB`` = 16*2**20)."""
    if isinstance(text, int):
        if text < 0:
            raise InputError(f"size must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(
            f"cannot parse size {text!r}: use bytes (1048576), SI units (16MB) or binary units (16MiB)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    return int(value)


def format_size(num_bytes: int) -> str:
    """Readable binary size: ``1.50 MiB``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
