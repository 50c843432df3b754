"""The index of a feature cache: every stored row by (layout, key) in LRU order, where it lives (``Entry``), the
tiers' budget accounting, placement and eviction, the counters and the warnings said once. The one object the
cache's modules share (``FeatureCache`` owns it; ``rows``, ``extend``, ``persist`` and ``stats`` are handed it).
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any, NamedTuple

from .._errors import CacheError
from .._units import fmt_bytes
from .binding import Layouts
from .stats import Counters
from .tiers import Slab, Tier

__all__ = ["Entry", "Index"]

Key = tuple[Any, int]  # (Layout, int64 key)
AUTO_EPOCH_ROWS = 1 << 16  # "an epoch's worth" of misses when epoch_rows= is not given (docs/CACHE.md)


class Entry(NamedTuple):
    """Where one row lives: its tier, the slab of its layout and codec, its slot there, and its input's content
    hash (None: none given, or a disk row, whose record's own content field is read at each fetch). A new
    ``Entry`` is made each time a row is stored, so identity tells whether a row changed (prefetch relies on it)."""

    tier: Tier
    slab: Slab
    slot: int
    content: int | None


class Index:
    """Rows by (layout, key), LRU first, across the tiers; budgets, placement, eviction, counters, warnings."""

    def __init__(self, evict: str):
        self.evict = evict
        self.tiers: list[Tier] = []
        self.rows: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        self.protected: set[Key] = set()  # hits of the last fetch: never evicted for the next put
        self.counters = Counters()
        self.layouts = Layouts()
        self.per_layout: collections.Counter = collections.Counter()  # rows held per layout
        self.warned: set[str] = set()

    # -- queries ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: Key) -> Entry | None:
        return self.rows.get(key)

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def lru(self) -> list[Key]:
        """Every row's (layout, key), least recently used first."""
        return list(self.rows)

    # -- changes ---------------------------------------------------------------------------------------------------
    def reset(self, tiers: list[Tier]) -> None:
        """A new binding: no rows, these tiers, new layouts (counters and warnings are kept)."""
        self.rows.clear()
        self.protected = set()
        self.tiers = tiers
        self.layouts = Layouts()
        self.per_layout = collections.Counter()

    def touch(self, keys: list[Key]) -> None:
        for k in keys:
            self.rows.move_to_end(k)

    def add(self, key: Key, tier: Tier, slab: Slab, slot: int) -> bool:
        """Indexes a row already stored (a disk shard's index); False when the key is held already."""
        if key in self.rows:
            return False
        self.rows[key] = Entry(tier, slab, slot, None)
        tier.account(slab, tier.row_bytes(slab.layout, slab.codec), 1)
        self.per_layout[key[0]] += 1
        return True

    def claim(self, key: Key, codec: str, batch: set[Key], content: int | None) -> Entry | None:
        """A slot for ``key``'s new row in ``codec``, indexed and accounted; None (counted as skipped) when no tier
        can take it, or the disk cannot make the layout's file (reported once)."""
        layout = key[0]
        tier = self._place(layout, codec, batch)
        if tier is None:
            self.counters["skipped"] += 1
            return None
        try:
            slab = tier.slab(layout, codec)
        except OSError as e:
            self.write_failed(getattr(tier, "path", None) or "?", 1, tier.row_bytes(layout, codec), e)
            return None
        entry = self.rows[key] = Entry(tier, slab, slab.alloc(), content)
        tier.account(slab, tier.row_bytes(layout, codec), 1)
        self.per_layout[layout] += 1
        return entry

    def _place(self, layout: Any, codec: str, batch: set[Key]) -> Tier | None:
        """The tier for a new row (evicting LRU rows if allowed), or None: not stored."""
        for t in self.tiers:
            if t.fits(t.row_bytes(layout, codec)):
                return t
        if self.evict == "none":
            return None
        sizes = {t: t.row_bytes(layout, codec) for t in self.tiers}
        # evict least-recently-used rows (never of the current batch or the last fetch's hits, nor read-only ones);
        # the LRU end holds evictable rows (hits and new rows move to the other end), so the search is short
        while True:
            victim, skipped = None, []
            for k, e in self.rows.items():
                if e.slab.readonly:
                    skipped.append(k)
                elif k not in batch and k not in self.protected and sizes.get(e.tier, 0) <= e.tier.budget:
                    victim = k
                    break
            for k in skipped:  # never evicted: out of the way of the next search
                self.rows.move_to_end(k)
            if victim is None:
                return None
            tier = self.rows[victim].tier
            self.drop(victim, evicted=True)
            if tier.fits(sizes[tier]):
                return tier

    def drop(self, key: Key, *, evicted: bool = False, corrupt: bool = False) -> None:
        e = self.rows.pop(key)
        nb = e.tier.row_bytes(e.slab.layout, e.slab.codec)
        e.tier.account(e.slab, nb, -1)
        self.per_layout[key[0]] -= 1
        if not e.slab.readonly:  # a read-only store's slots are never reused
            e.slab.release(e.slot)
        if evicted:
            self.counters["evictions"] += 1
            self.counters["evicted_bytes"] += nb
        if corrupt:
            self.counters["corrupt"] += 1

    def forget(self, slabs: set[Slab]) -> None:
        """Rows held by ``slabs`` (another shard re-read) leave the index, uncounted."""
        for k in [k for k, e in self.rows.items() if e.slab in slabs]:
            e = self.rows.pop(k)
            e.tier.account(e.slab, e.tier.row_bytes(e.slab.layout, e.slab.codec), -1)
            self.per_layout[k[0]] -= 1

    def clear(self) -> None:
        """Drops every row (memory freed, this cache's disk shard truncated)."""
        self.rows.clear()
        self.protected = set()
        self.per_layout = collections.Counter()
        for t in self.tiers:
            t.clear()

    def check_fits(self, layout: Any) -> None:
        """Refuses a layout whose one sample exceeds every tier's whole budget (saying what it takes in each)."""
        if any(t.row_bytes(layout, layout.codec) <= t.budget for t in self.tiers):
            return
        raise CacheError(
            f"the cache cannot hold a sample: one sample's boundary {[list(s) for s, _ in layout.tensors]} in codec "
            f"{layout.codec!r} takes more than every tier's whole budget ("
            + ", ".join(
                f"{t.name}: {fmt_bytes(t.row_bytes(layout, layout.codec))} per sample, budget {fmt_bytes(t.budget)}"
                for t in self.tiers
            )
            + "); raise budget=/host_budget=/disk_budget=, use a smaller codec, or drop cache="
        )

    # -- reports ---------------------------------------------------------------------------------------------------
    def note_content_misses(self, n: int, epoch_rows: int | None) -> None:
        """Content keys never hit under augmentation: say so once, after an epoch's worth of misses with no hit."""
        c = self.counters
        if c.found or "no_reuse" in self.warned:
            return
        c.content_misses += n
        limit = epoch_rows or AUTO_EPOCH_ROWS
        if c.content_misses > limit:  # a whole epoch stored, and the next one's inputs are new again
            self.warn_once(
                "no_reuse",
                f"freezert: the feature cache stored {c.content_misses} rows, more than "
                f"an epoch's worth ({limit}{', epoch_rows=' if epoch_rows else ', the default'}), "
                "without finding any again: no input has arrived twice. With random augmentation every "
                "epoch's inputs differ, so their content keys never repeat and the cache only costs time "
                "and memory; cache un-augmented inputs (or pass cache_ids= to have changed inputs "
                "detected), or drop cache=. FeatureCache(epoch_rows=len(dataset)) times this check to "
                "your dataset",
                stacklevel=5,
            )

    def warn_once(self, what: str, msg: str, stacklevel: int = 4) -> None:
        if what not in self.warned:
            self.warned.add(what)
            warnings.warn(msg, UserWarning, stacklevel=stacklevel)

    def write_failed(self, path: str, rows: int, nbytes: int, err: OSError) -> None:
        """A disk write of ``rows`` rows failed (disk full, I/O error): they are not stored; said once, counted."""
        self.counters["write_errors"] += rows
        self.counters["skipped"] += rows
        self.warn_once(
            "write_failed",
            f"freezert: writing {fmt_bytes(nbytes)} of cached features to {path!r} failed "
            f"({err.strerror or err}); those rows are not stored and are recomputed when they miss, and the rows "
            "already stored are kept (stats()['write_errors'] counts the rows). Free space there, lower "
            "disk_budget=, or use another path",
            stacklevel=6,
        )

    # -- the disk tier's index file --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Writes the disk tier's index (this cache's shard) atomically; a failure is reported once, not raised."""
        disk = self.tier("disk")
        if disk is None or disk.own is None or disk.own.readonly:
            return
        own = disk.own
        rows = [
            (k, lay.uid64, 0 if e.slab.codec == lay.codec else 1, e.slot)
            for (lay, k), e in self.rows.items()
            if e.tier is disk and not e.slab.shared
        ]
        try:
            disk.write_index(rows)
        except OSError as e:
            if os.path.isdir(own.path):  # a directory removed under it (a test's tmp_path) is not worth a warning
                self.warn_once(
                    "index_failed",
                    f"freezert: writing the cache index of {own.path!r} ({fmt_bytes(32 * len(rows))}) failed "
                    f"({e.strerror or e}); the previous index stays, so a later process finds only the rows it "
                    "names. Free space there, or use another path",
                    stacklevel=5,
                )

    def close(self) -> None:
        """The one close path (``close()``, garbage collection, interpreter exit): the disk tier's index is written,
        its files closed, its lock released, a temporary directory removed."""
        disk = self.tier("disk")
        if disk is None:
            return
        self.flush()
        disk.close()
        self.tiers = [t for t in self.tiers if t is not disk]
        for k in [k for k, e in self.rows.items() if e.tier is disk]:
            del self.rows[k]
            self.per_layout[k[0]] -= 1
