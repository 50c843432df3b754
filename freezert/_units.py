"""Byte sizes: the one parser (``budget="4GiB"``, ``memory_budget=...``) and the one formatter of the package."""

from __future__ import annotations

import math
import re
from typing import Any

from ._errors import FreezeError

__all__ = ["MAX_BYTES", "fmt_bytes", "parse_bytes"]

MAX_BYTES = 2**62  # larger than any machine's memory or disk; a bigger number is a typo, not a budget
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+)(?:\.(\d*))?\s*([a-zA-Z]*)\s*|\s*\.(\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(name: str, value: Any, *, allow_none: bool = False, error: type[FreezeError] = FreezeError) -> int:
    """Bytes from an int or a string like ``'20GiB'``, ``'512 MiB'``, ``'1.5GB'``; ``math.inf`` for None or
    ``'unlimited'`` where ``allow_none``. Anything else raises ``error`` naming ``name`` and the value."""
    if allow_none and (value is None or (isinstance(value, str) and value.strip().lower() in ("unlimited", "inf"))):
        return math.inf  # type: ignore[return-value]
    n = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) or math.isfinite(value):
            n = int(value)  # exact for ints of any length (float() of 10**400 would overflow)
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            whole, frac, unit = (m.group(1), m.group(2), m.group(3)) if m.group(1) else ("0", m.group(4), m.group(5))
            if unit.lower() in _UNITS and len(whole) <= 30:  # no float overflow: at most 30 digits before scaling
                n = int(float(f"{whole}.{frac or 0}") * _UNITS[unit.lower()])
            elif unit.lower() in _UNITS:
                n = MAX_BYTES + 1
    extra = " or None (unlimited)" if allow_none else ""
    if n is not None and n > MAX_BYTES:
        raise error(
            f"{name}={_short(value)} is more than 2**62 bytes, larger than any machine; pass a real size like "
            f"'20GiB'{extra}"
        )
    if n is not None and n >= 0:
        return n
    raise error(
        f"{name}={_short(value)} is not a size; pass a non-negative int of bytes or a string like '20GiB', "
        f"'512MiB', '1.5GB'{extra}"
    )


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``: binary units, two decimals; ``math.inf`` -> ``'unlimited'``."""
    if n == math.inf:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 40 else f"{r[:20]}...{r[-8:]} ({len(r)} characters)"
