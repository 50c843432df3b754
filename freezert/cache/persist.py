"""``FeatureCache.save`` / ``FeatureCache.load``: every row of every tier, as its exact encoded bytes, in the disk
store format (a saved ``where="disk"`` cache is its own directory, flushed)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .._errors import CacheError
from . import disk as _disk
from .binding import store_seed
from .codecs import ESCAPE
from .disk import NO_CONTENT, DiskSlab
from .tiers import WHERE

__all__ = ["load", "save"]


def save(cache: Any, path) -> None:
    """Writes every row (all tiers, exact encoded bytes) with the fingerprint and config to directory ``path``."""
    cache._need_bound("save")
    path = os.fspath(path)
    _disk.check_dir_path(path)
    config = {
        "where": cache.where,
        "evict": cache.evict,
        "budget": cache._budget_arg[0],
        "host_budget": cache._budget_arg[1],
        "disk_budget": cache._budget_arg[2],
    }
    config = {k: (v if v is None or isinstance(v, (int, float, str)) else str(v)) for k, v in config.items()}
    if cache._disk_dir is not None and os.path.realpath(path) == os.path.realpath(cache._disk_dir):
        if any(cache._tiers[t].name != "disk" for t, _, _, _ in cache._index.values()):
            raise CacheError(f"save({path!r}) names this cache's own disk tier; save to another directory")
        cache.flush()
        _disk.write_header(path, cache.fingerprint, cache.codec, cache.layout, {**config, "where": "disk"})
        return
    if os.path.isdir(path) and os.listdir(path):
        raise CacheError(f"save({path!r}): the directory is not empty; save into a new or empty directory")
    os.makedirs(path, exist_ok=True)
    lock = _disk.StoreLock(path)
    _disk.write_header(path, cache.fingerprint, cache.codec, cache.layout, config)  # first: files never orphaned
    slabs: dict[str, DiskSlab] = {}
    entries: list[tuple[int, int, int]] = []
    groups: dict[tuple[int, str], list[int]] = {}
    for k, (ti, codec, _, _) in cache._index.items():
        groups.setdefault((ti, codec), []).append(k)
    try:
        for (ti, codec), gk in groups.items():
            if codec not in slabs:
                slabs[codec] = DiskSlab(
                    codec,
                    cache._dims(),
                    os.path.join(path, f"slab_{codec}.bin"),
                    store_seed(cache.fingerprint, cache.codec, cache.layout, codec),
                )
            dst, src = slabs[codec], cache._tiers[ti].slabs[codec]
            slots = [cache._index[k][2] for k in gk]
            if isinstance(src, DiskSlab):  # verified records, re-sealed (the seed is the same fingerprint's)
                rec, ok = src.read(gk, slots)
                for k in [k for k, good in zip(gk, ok) if not good]:
                    cache._drop(k, corrupt=True)
                keep = [j for j, good in enumerate(ok) if good]
                gk, rec = [gk[j] for j in keep], rec[keep]
            else:  # the exact encoded bytes: no decode/encode round trip
                contents = [cache._index[k][3] or NO_CONTENT for k in gk]
                rec = dst.build(gk, contents, *src.read_raw(slots))
            if gk:
                new = [dst.alloc() for _ in gk]
                dst.write_records(new, rec)
                entries += [(k, 0 if codec == cache.codec else 1, slot) for k, slot in zip(gk, new)]
    finally:
        for s in slabs.values():
            s.close()
        order = {k: i for i, k in enumerate(cache._index)}
        entries.sort(key=lambda e: order.get(e[0], 0))
        _disk.write_index(path, entries)
        lock.release()


def load(cls: type, path) -> Any:
    """A cache holding what ``save(path)`` wrote (fingerprint and config included); rows on CPU until bound.

    A saved where='disk' cache opens ``path`` in place; other caches read every row (verified) into memory.
    """
    path = os.fspath(path)
    _disk.check_dir_path(path)
    found = _disk.read_header(path) if os.path.isdir(path) else None
    if found is None:
        raise CacheError(
            f"{path!r} holds no saved FeatureCache (no {_disk.HEADER}); pass a directory "
            "written by FeatureCache.save() or by a disk tier"
        )
    head, layout = found
    cfg = dict(head.get("config") or {"where": "disk"})
    where = cfg.pop("where", "disk")
    if where not in WHERE:
        where = "disk"
    budgets = {
        "budget": cfg.get("budget", "20GiB"),
        "host_budget": cfg.get("host_budget"),
        "disk_budget": cfg.get("disk_budget"),
    }
    evict = cfg.get("evict", "lru") if cfg.get("evict") in ("lru", "none") else "lru"
    if where == "disk":
        cache = cls(head["codec"], "disk", budgets["budget"], path, disk_budget=budgets["disk_budget"], evict=evict)
        cache.bind(head["fingerprint"], layout, "cpu")
        cache._bound = False  # the first caller's bind must match this fingerprint (else it is refused)
        return cache
    cache = cls(
        head["codec"],
        where,
        budgets["budget"],
        None,
        host_budget=budgets["host_budget"],
        disk_budget=budgets["disk_budget"],
        evict=evict,
    )
    src = cls(head["codec"], "disk", "1TiB", path, disk_budget=None, readonly=True)
    try:
        src.bind(head["fingerprint"], layout, "cpu")
        dev = "cpu" if where != "cuda" else ("cuda" if torch.cuda.is_available() else "cpu")
        if where == "cuda" and dev == "cpu":
            raise CacheError(f"{path!r} holds a where='cuda' cache, but CUDA is not available here")
        cache.fingerprint, cache.layout, cache.device = head["fingerprint"], layout, torch.device(dev)
        cache._build_tiers()
        _import_from(cache, src)
    finally:
        src.close()
    return cache


def _import_from(cache: Any, src: Any) -> None:
    ti_src = src._disk_ti()
    keys = list(src._index)
    for lo in range(0, len(keys), 1024):
        chunk = keys[lo : lo + 1024]
        for codec in (src.codec, ESCAPE):
            gk = [k for k in chunk if src._index[k][1] == codec]
            if not gk:
                continue
            slab = src._tiers[ti_src].slabs[codec]
            rec, ok = slab.read(gk, [src._index[k][2] for k in gk])
            cache._counts["corrupt"] += ok.count(False)
            keep = [j for j, good in enumerate(ok) if good]
            rec = rec[keep]
            payload, scales = slab.unpack(rec)
            contents = DiskSlab.contents_of(rec)
            for j, k in enumerate([gk[j] for j in keep]):
                c = None if contents[j] == NO_CONTENT else contents[j]
                claimed = cache._claim(k, codec, set(), c)
                if claimed is None:
                    continue
                _, dst, slot = claimed
                p = [x[j : j + 1] for x in payload]
                s = [x[j : j + 1] if x is not None else None for x in scales]
                if isinstance(dst, DiskSlab):
                    dst.write_records([slot], dst.build([k], [contents[j]], p, s))
                else:
                    dst.write_raw([slot], p, s)
