"""The cache's counters and the ``stats()`` dictionary built from them."""

from __future__ import annotations

from typing import Any

from .tiers import TIERS

__all__ = ["COUNTERS", "Counters", "build_stats"]

COUNTERS = (
    "lookups",
    "hits",
    "misses",
    "stores",
    "skipped",
    "nonfinite",
    "escaped",
    "escaped_large",
    "escaped_small",
    "evictions",
    "evicted_bytes",
    "invalidations",
    "corrupt",
    "stale",
    "extended",
)


class Counters(dict):
    """Event counts (see docs/CACHE.md, "Statistics"), plus the timing behind ``time_saved_s``."""

    def __init__(self):
        super().__init__(dict.fromkeys(COUNTERS, 0))
        self.seg_s = 0.0  # measured frozen-segment seconds ...
        self.seg_rows = 0  # ... for this many rows
        self.get_s = 0.0  # seconds spent decoding hits

    def note_segment_time(self, seconds: float, rows: int) -> None:
        if rows > 0 and seconds >= 0:
            self.seg_s += float(seconds)
            self.seg_rows += int(rows)


def build_stats(cache: Any) -> dict:
    """``stats()``: counters, bytes and rows per tier, codec, and the segment time the hits saved (estimate)."""
    c: Counters = cache._counts
    per_row = c.seg_s / c.seg_rows if c.seg_rows else 0.0
    out: dict[str, Any] = dict(c)
    out.update(
        codec=cache.codec,
        where=cache.where,
        fingerprint=cache.fingerprint,
        rows=len(cache._index),
        path=cache._disk_dir,
        segment_s_per_row=per_row,
        get_s=c.get_s,
        time_saved_s=max(0.0, c["hits"] * per_row - c.get_s),
    )
    tiers = {}
    for name in TIERS:
        t = cache._tier(name)
        budget = t.budget if t is not None else cache._budgets.get(name)
        tiers[name] = {
            "rows": t.rows if t else 0,
            "bytes": t.used if t else 0,
            "allocated_bytes": sum(s.nbytes() for s in t.slabs.values()) if t else 0,
            "budget": budget,
        }
        if name == "disk" and t is not None:
            tiers[name]["readonly"] = t.readonly
        out[f"rows_{name}"] = tiers[name]["rows"]
        out[f"bytes_{name}"] = tiers[name]["bytes"]
    out["tiers"] = tiers
    out["bytes"] = sum(v["bytes"] for v in tiers.values())
    return out
