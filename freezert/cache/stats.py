"""The cache's counters and the ``stats()`` dictionary built from them and the index."""

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
    "prefetched",
    "write_errors",
    "refreshes",
)


class Counters(dict):
    """Event counts (see docs/CACHE.md, "Statistics"), plus the timing behind ``time_saved_s`` and the two facts
    behind the no-reuse warning."""

    def __init__(self):
        super().__init__(dict.fromkeys(COUNTERS, 0))
        self.seg_s = 0.0  # measured frozen-segment seconds ...
        self.seg_rows = 0  # ... for this many rows
        self.get_s = 0.0  # seconds spent in fetch (verifying and decoding hits)
        self.found = 0  # rows a fetch found stored and verified (served, even if the caller then recomputed them)
        self.content_misses = 0  # rows put under content keys while no stored row was ever found

    def note_segment_time(self, seconds: float, rows: int) -> None:
        if rows > 0 and seconds >= 0:
            self.seg_s += float(seconds)
            self.seg_rows += int(rows)

    def snapshot(self) -> tuple:
        return dict(self), self.seg_s, self.seg_rows, self.get_s

    def restore(self, snap: tuple, keys: tuple[str, ...]) -> None:
        """Puts back ``keys`` and the fetch time from ``snap`` (what ``extend`` does not count as traffic)."""
        for k in keys:
            self[k] = snap[0][k]
        self.get_s = snap[3]


def build_stats(index: Any, info: dict) -> dict:
    """``stats()``: counters, rows/bytes per tier (and per row), the layouts held, and the segment time the hits
    saved (estimate). ``info``: codec, where, fingerprint, path and the configured budgets."""
    c: Counters = index.counters
    per_row = c.seg_s / c.seg_rows if c.seg_rows else 0.0
    out: dict[str, Any] = dict(c)
    out.update(
        codec=info["codec"],
        where=info["where"],
        fingerprint=info["fingerprint"],
        rows=len(index),
        path=info["path"],
        segment_s_per_row=per_row,
        get_s=c.get_s,
        time_saved_s=max(0.0, c["hits"] * per_row - c.get_s),
    )
    tiers = {}
    for name in TIERS:
        t = index.tier(name)
        rows, used = (t.rows, t.used) if t is not None else (0, 0)
        tiers[name] = {
            "rows": rows,
            "bytes": used,
            "bytes_per_row": used / rows if rows else 0.0,
            "allocated_bytes": t.allocated() if t is not None else 0,
            "budget": t.budget if t is not None else info["budgets"].get(name),
        }
        if name == "disk" and t is not None:
            tiers[name]["readonly"] = t.readonly
            tiers[name]["shared_rows"] = t.shared_rows
        out[f"rows_{name}"] = rows
        out[f"bytes_{name}"] = used
    out["tiers"] = tiers
    out["bytes"] = sum(v["bytes"] for v in tiers.values())
    out["layouts"] = [
        {"shapes": [list(s) for s, _ in lay.tensors], "tag": lay.tag, "codec": lay.codec, "rows": lay_rows}
        for lay, lay_rows in index.per_layout.items()
    ]
    return out
