"""``FeatureCache``: the frozen prefix's boundary tensors, computed once and kept compactly.

Rows (one per sample, keyed by an int64: a content hash or an explicit id, and by their layout: one store holds
rows of many input shapes) live in fixed-size slots of up to three tiers: ``device``, ``host`` (pinned for a CUDA
model) and ``disk`` (a directory of checksummed records, persistent, shared by several processes: one shard per
writer). The wrapper asks with ``fetch`` (hit mask and decoded rows; a record that fails verification is a miss)
and stores its misses with ``put``. See docs/CACHE.md for the guarantees, the format and the policies.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from typing import Any

import torch

from .._errors import CacheError
from . import extend as _extend
from . import persist as _persist
from . import rows as _rows
from .binding import Layout, check_layout, check_repeats, check_rows, codec_at, content_list, ids_to_keys
from .disk import DiskTier, foreign_msg, remove_store
from .index import Index
from .options import CacheOptions
from .prefetch import Prefetch
from .stats import build_stats
from .tiers import WHERE, MemTier

__all__ = ["FeatureCache"]

_SHARE_S = 5.0  # a shard writer flushes its index, and readers look for other shards' flushes, at most this often


class FeatureCache:
    """Boundary tensors of the frozen prefix, per sample, in a compact codec across device/host/disk tiers.

    ``codec``: "fp16" (default), "bf16", "fp8" (e4m3 with a per-row scale), "fp32" (exact), or a ladder by frozen
    depth ("progressive" = "fp16,fp8@0.5"); rows a codec cannot keep within its precision are stored as fp32.
    ``where``: "auto" (device until ``budget``, then host until ``host_budget``, then disk), "cuda", "host" or
    "disk". ``budget``: bytes (int or "20GiB"). ``path``: the disk store's directory (persistent); None = a
    temporary one. ``rank``: the shard this process writes (None: torch.distributed's rank when initialised, else
    0); every shard of ``path`` is read. ``evict``: "lru" (default) or "none" (stored rows are never dropped).
    ``strict``: a sample id whose input changed raises instead of warning. ``readonly``: read the store at ``path``
    without writing it. ``epoch_rows``: the dataset size, if known, for the no-reuse warning (default 65,536).
    """

    def __init__(
        self,
        codec: str = "fp16",
        where: str = "auto",
        budget: Any = "20GiB",
        path: Any = None,
        *,
        host_budget: Any = None,
        disk_budget: Any = None,
        evict: str = "lru",
        strict: bool = False,
        readonly: bool = False,
        epoch_rows: int | None = None,
        rank: int | None = None,
    ):
        args = (codec, where, budget, path, host_budget, disk_budget, evict, strict, readonly, epoch_rows, rank)
        o = self._opts = CacheOptions(*args)
        self.codec, self.where, self.path, self.evict, self.rank = o.codec, o.where, o.path, o.evict, o.rank
        self.strict, self.readonly, self.epoch_rows = o.strict, o.readonly, o.epoch_rows
        self.fingerprint: str | None = None
        self.device: torch.device | None = None
        self._index = Index(evict)
        self._disk: DiskTier | None = None  # kept across bindings: its lock and temporary directory
        self._finalizer: Any = None  # the one close path: close(), garbage collection, interpreter exit
        self._default: Layout | None = None  # the layout bind() named: fetch/put without layout= use it
        self._active: str | None = None  # the codec the ladder gives this binding's depth
        self._bound = False  # bind() succeeded once (a later change invalidates instead of refusing)
        self._detached = False  # a read-only store left behind by an invalidation: no longer read
        self._prefetch: Prefetch | None = None
        now = time.monotonic()
        self._shared = {"flush": (now, _SHARE_S), "refresh": (now, _SHARE_S)}  # (last time, interval) of each

    # -- copies and pickles ----------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """A copy or pickle keeps the configuration, not the rows: it starts empty and is bound on first use; a
        writable disk store keeps its one writer (the copy gets a private temporary directory)."""
        return {**dataclasses.asdict(self._opts), "path": self.path if self.readonly else None}

    def __setstate__(self, cfg: dict) -> None:
        self.__init__(**cfg)

    def __deepcopy__(self, memo: dict) -> FeatureCache:
        new = FeatureCache.__new__(FeatureCache)
        new.__setstate__(self.__getstate__())
        return new

    # -- binding ---------------------------------------------------------------------------------------------------
    def bind(self, fingerprint: str, layout=None, device="cpu", *, depth: float | None = None) -> None:
        """Binds to the frozen setup ``fingerprint`` on ``device``; ``layout`` (per-sample [(shape, dtype), ...])
        becomes the default for fetch/put; ``depth`` (frozen blocks / all blocks) picks a ladder's codec."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise CacheError(f"fingerprint={fingerprint!r} is not a fingerprint; pass the str from fingerprint_of()")
        tensors = None if layout is None else check_layout(layout)
        device, codec, idx = torch.device(device), codec_at(self.codec, depth), self._index
        self._opts.check_device(device)
        if (self.fingerprint, self._active) == (fingerprint, codec) and idx.tiers:
            if device != self.device:
                self.device = device
                for t in idx.tiers:
                    getattr(t, "move", lambda d: None)(device)
            self._bound = True
            self._default = self._default if tensors is None else self.layout_for(tensors)
            return
        if self.fingerprint is not None and (self.fingerprint, self._active) != (fingerprint, codec):
            if not self._bound:  # a loaded cache or an opened store of another setup: refuse, keep its data
                where = (self._disk and self._disk.path) or "the loaded cache"
                raise CacheError(foreign_msg(self.fingerprint, fingerprint, where))
            self._invalidate()
        self.fingerprint, self.device, self._active = fingerprint, device, codec
        try:
            idx.reset(self._build_tiers())
            self._default = None if tensors is None else self.layout_for(tensors)
            if self._disk is not None and self._detached:
                self._disk.readonly = True
            elif self._disk is not None:
                stored = self._disk.bind(fingerprint, self.codec, idx.layouts, first=not self._bound)
                for lay, key, slab, slot in stored:
                    idx.add((lay, key), self._disk, slab, slot)
                idx.counters["corrupt"], self._disk.lost = idx.counters["corrupt"] + self._disk.lost, 0
        except BaseException:
            if self._disk is not None:
                self._disk.close()
            self.fingerprint = self.device = self._active = self._default = None
            idx.reset([])
            raise
        self._bound = True

    def _build_tiers(self) -> list:
        budgets = self._opts.tier_budgets(self.device)
        tiers = [MemTier(n, budgets[n], self.device) for n in WHERE[self.where] if n != "disk"]
        if "disk" in budgets:
            if self._disk is None:
                self._disk = DiskTier(budgets["disk"], self.path, rank=self.rank, readonly=self.readonly)
            if self._finalizer is None or not self._finalizer.alive:
                self._finalizer = weakref.finalize(self, self._index.close)
            tiers.append(self._disk)
        return tiers

    def _invalidate(self) -> None:
        """Drops every row of the old setup; this cache's disk shard is emptied (re-created at the next bind)."""
        self._drop_prefetch()
        self._index.counters["invalidations"] += 1
        self._index.clear()
        if self._disk is not None and not self._detached and not self._disk.discard():
            self._detached = True  # read-only: never deleted; new rows stay in memory tiers
            self._index.warn_once(
                "detached",
                f"freezert: the read-only cache store {self.path!r} holds features "
                "of the previous frozen setup; they are no longer served, and new rows are not "
                "stored there",
            )

    def layout_for(self, boundary, tag: str | None = None) -> Layout:
        """The handle of the per-sample boundary ``boundary`` ([(shape, dtype), ...]) with ``tag`` (a str telling
        apart inputs whose boundaries coincide, e.g. the input shape), to pass as ``layout=``. Rows of one key
        under two layouts are two rows. Refuses a boundary whose one sample exceeds every tier's whole budget."""
        self._need_bound("layout_for")
        if tag is not None and not isinstance(tag, str):
            raise CacheError(f"tag={tag!r} is not a str; pass a str (e.g. the input shape) or None")
        idx, tensors = self._index, check_layout(boundary)
        n = len(idx.layouts)
        lay = idx.layouts.get(tensors, tag, self._active)
        if len(idx.layouts) != n:
            try:
                idx.check_fits(lay)
            except CacheError:
                del idx.layouts.by_uid[lay.uid]
                raise
        return lay

    @property
    def layout(self) -> list | None:
        """The default layout's tensors ([(shape, dtype), ...]; None without one)."""
        return None if self._default is None else self._default.tensors

    def _resolve(self, layout) -> Layout:
        if layout is None:
            if self._default is None:
                raise CacheError("this cache was bound without a layout; pass layout= (from cache.layout_for())")
            return self._default
        if isinstance(layout, Layout) and self._index.layouts.by_uid.get(layout.uid) is layout:
            return layout
        return self.layout_for(*((layout.tensors, layout.tag) if isinstance(layout, Layout) else (layout,)))

    def extend(
        self, fingerprint: str, layout, device, convert, *, chunk_bytes: int = 64 * 2**20, depth: float | None = None
    ) -> int:
        """Re-binds to ``fingerprint`` keeping every stored row, converted by ``convert(rows)`` (one layout's rows)
        rather than dropped; returns how many rows were carried (see ``freezert.cache.extend``)."""
        self._drop_prefetch()
        carry = self._bound and bool(self._index.tiers) and fingerprint != self.fingerprint
        new = (fingerprint, layout, device, depth)
        return _extend.extend(self, self._index, new, convert, chunk_bytes, carry=carry, old_default=self._default)

    # -- the data path ---------------------------------------------------------------------------------------------
    def fetch(self, keys, device, *, layout=None, content=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(hit, rows) for ``keys``: ``hit`` a bool CPU tensor (N,); ``rows`` one tensor per boundary tensor holding
        the rows of ``keys[hit]`` in order, decoded on ``device`` in the layout's dtypes.

        Every row served is verified (disk records: key, checksum bound to this store; with ``content``: the
        input's content hash). A row that fails is dropped and reported as a miss, never raised, except a changed
        input under ``strict=True`` (CacheError). ``content`` (int64 (N,)) marks ``keys`` as sample ids.
        """
        t0, idx = time.perf_counter(), self._index
        ks = ids_to_keys(keys, "keys").tolist()
        cs = content_list(content, len(ks))
        check_repeats(ks, cs)
        idx.counters["lookups"] += len(ks)
        if not idx.tiers:
            return torch.zeros(len(ks), dtype=torch.bool), []
        lay = self._resolve(layout)
        self._share("refresh")
        pre = self._prefetch if self._prefetch is not None and self._prefetch.layout is lay else None
        if pre is not None:
            pre.wait()
            self._prefetch = None
        hit, rows, _ = _rows.read(idx, lay, ks, cs, torch.device(device), strict=self.strict, pre=pre)
        served = list(dict.fromkeys((lay, k) for k, h in zip(ks, hit) if h))
        idx.protected = set(served)
        idx.touch(served)  # in the batch's order: the LRU order does not depend on hashing
        idx.counters.found += len(idx.protected)
        idx.counters["hits"] += sum(hit)
        idx.counters["prefetched"] += pre.taken if pre is not None else 0
        idx.counters.get_s += time.perf_counter() - t0
        return torch.tensor(hit, dtype=torch.bool), rows

    def stored(self, keys, *, layout=None, content=None) -> torch.Tensor:
        """Which of ``keys`` hold a row of ``layout`` (with ``content``, of that input where the index knows it), as
        a bool CPU tensor (N,): nothing read, decoded or counted. What ``put`` would add after a call that computed
        every row anyway (a hook inside the cached part), without a fetch that would count those rows as hits."""
        idx = self._index
        ks = ids_to_keys(keys, "keys").tolist()
        if not idx.tiers:
            return torch.zeros(len(ks), dtype=torch.bool)
        lay, cs = self._resolve(layout), content_list(content, len(ks))
        held = []
        for i, k in enumerate(ks):
            e = idx.get((lay, k))
            held.append(e is not None and (cs is None or e.content is None or e.content == cs[i]))
        return torch.tensor(held, dtype=torch.bool)

    def prefetch(self, keys, device, *, layout=None) -> None:
        """Starts reading, verifying and decoding the disk-tier rows of ``keys`` on a background thread; the next
        ``fetch`` of this layout serves them from there when their rows did not change in between."""
        if not self._index.tiers:
            return
        lay, disk = self._resolve(layout), self._disk
        self._drop_prefetch()
        got = {k: e for k in ids_to_keys(keys, "keys").tolist() if (e := self._index.get((lay, k))) is not None}
        entries = {k: e for k, e in got.items() if e.tier is disk}
        if entries:
            self._prefetch = Prefetch(lay, entries, torch.device(device))

    def put(self, keys, rows, *, layout=None, content=None) -> None:
        """Stores ``rows[i][j]`` (batch-first, the layout) under ``keys[j]``, with its input's ``content``."""
        self._need_bound("put")
        ks = ids_to_keys(keys, "keys").tolist()
        cs = content_list(content, len(ks))
        check_repeats(ks, cs)
        lay, rows = self._resolve(layout), list(rows)
        check_rows(rows, lay.tensors, len(ks))
        if not ks:
            return
        self._index.counters["misses"] += len(ks)
        _rows.write(self._index, lay, ks, cs, rows)
        if cs is None:
            self._index.note_content_misses(len(ks), self.epoch_rows)
        self._share("flush")

    def _need_bound(self, what: str) -> None:
        if not self._index.tiers:
            raise CacheError(f"{what}() on a cache that is not bound; call bind(fingerprint, layout, device) first")

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.wait()
            self._prefetch = None

    # -- several processes -----------------------------------------------------------------------------------------
    def _share(self, what: str) -> None:
        """In a store other processes write too, flush this shard's index (put) and read theirs (fetch) every few
        seconds, at most 5% of the time (both cost time in proportion to the rows)."""
        last, every = self._shared[what]
        if self._disk is None or not self._disk.sharded or time.monotonic() - last < every:
            return
        t0 = time.monotonic()
        self.refresh() if what == "refresh" else self.flush()
        self._shared[what] = (time.monotonic(), max(_SHARE_S, 20 * (time.monotonic() - t0)))

    def refresh(self) -> int:
        """Reads the other shards of the disk store as their writers last flushed them (rows other ranks stored
        become hits); returns how many of their rows this cache now serves."""
        disk = self._disk
        if disk is None or disk not in self._index.tiers or self._detached:
            return 0
        gone, rows = disk.refresh()
        self._index.forget(gone)
        for lay, key, slab, slot in rows:
            self._index.add((lay, key), disk, slab, slot)
        c = self._index.counters
        c["refreshes"], c["corrupt"], disk.lost = c["refreshes"] + 1, c["corrupt"] + disk.lost, 0
        return disk.shared_rows

    def sync(self) -> int:
        """Flushes this shard, waits for every rank (a torch.distributed barrier when initialised), refreshes: call
        it on every rank at the end of an epoch so the next one serves every rank's rows. Returns ``refresh()``."""
        self.flush()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return self.refresh()

    def flush(self) -> None:
        """Writes the disk shard's index atomically (temp file + os.replace) and flushes its records."""
        if self._index.tiers:
            self._index.flush()

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def note_segment_time(self, seconds: float, rows: int) -> None:
        """The wrapper's measured frozen-segment time for ``rows`` samples (for the time-saved estimate)."""
        self._index.counters.note_segment_time(seconds, rows)

    def stats(self) -> dict:
        """Counters, rows and bytes (and bytes per row) per tier, the layouts held, and the segment time saved."""
        info = dict(
            codec=self.codec,
            where=self.where,
            fingerprint=self.fingerprint,
            budgets=self._opts.budgets(),
            path=self._disk.path if self._disk is not None else None,
        )
        return build_stats(self._index, info)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        path = self._disk.path if self._disk is not None else None
        return (
            f"FeatureCache(codec={self.codec!r}, where={self.where!r}, rows={len(self)}, "
            f"fingerprint={self.fingerprint!r}, path={path!r})"
        )

    def _drop(self, key: int, *, corrupt: bool = False) -> None:  # for tests that simulate a bad record
        for k in [k for k in self._index.rows if k[1] == key]:
            self._index.drop(k, corrupt=corrupt)

    def clear(self) -> None:
        """Drops every stored row (memory freed, this cache's disk shard truncated); counters and binding kept.

        On an unbound cache with ``path=``, wipes that store's files, every shard (the fix for a refused store).
        """
        disk = self._disk
        if self.readonly or (disk is not None and disk.readonly and disk in self._index.tiers):
            raise CacheError(
                f"clear() on the read-only store {self.path!r}; open it writable "
                "(readonly=False, with write permission) to clear it"
            )
        self._drop_prefetch()
        if self._index.tiers:
            self._index.clear()
            self._index.flush()
        elif self.path is not None and os.path.isdir(self.path):
            remove_store(self.path)  # each shard under its writer lock: never wipes a store another cache writes

    def close(self) -> None:
        """Flushes and closes the disk tier (a temporary one is deleted). The cache is unusable afterwards."""
        self._drop_prefetch()
        if self._finalizer is not None:
            self._finalizer()
        self._index.reset([])
        self._disk = None

    # -- save / load -----------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Writes every row (all tiers, exact encoded bytes) with the fingerprint and config to directory ``path``."""
        self._need_bound("save")
        own = self._disk.path if self._disk is not None else None
        config = dataclasses.asdict(self._opts)
        _persist.save(self._index, os.fspath(path), self.fingerprint, self.codec, config, own=own)

    @classmethod
    def load(cls, path) -> FeatureCache:
        """A cache holding what ``save(path)`` wrote (fingerprint and config included); rows on CPU until bound."""
        fingerprint, depth, cfg = _persist.saved(os.fspath(path))
        cache = cls(**cfg)
        cache.bind(fingerprint, None, "cuda" if cfg["where"] == "cuda" else "cpu", depth=depth)
        cache._bound = False  # the first caller's bind must carry this fingerprint (else it is refused)
        layouts = list(cache._index.layouts)
        cache._default = layouts[0] if len(layouts) == 1 else None  # one layout saved: fetch/put need no layout=
        if cfg["where"] != "disk":
            _persist.import_rows(cache._index, os.fspath(path), fingerprint, cache.codec)
        return cache
