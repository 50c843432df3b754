"""``FeatureCache.save`` / ``FeatureCache.load``: every row of every tier, as its exact encoded bytes, in the disk
store format (a saved ``where="disk"`` cache is its own directory, flushed)."""

from __future__ import annotations

import math
import os

import torch

from .._errors import CacheError
from .binding import codec_at, parse_codec
from .disk import DiskTier, Shard, StoreLock, check_dir_path, read_header, write_header, write_index
from .index import Index
from .records import NO_CONTENT, DiskSlab
from .tiers import WHERE

__all__ = ["import_rows", "save", "saved"]

_CONFIG = ("where", "evict", "budget", "host_budget", "disk_budget")


def save(index: Index, path: str, fingerprint: str, codec: str, config: dict, *, own: str | None) -> None:
    """Writes every row of ``index`` (exact encoded bytes, LRU order) with ``fingerprint``, ``codec`` and the
    ``config`` a ``load`` rebuilds the cache from to directory ``path`` (new or empty; ``own``: the cache's own
    disk shard, where saving is a flush)."""
    check_dir_path(path)
    cfg = {k: config[k] for k in _CONFIG}
    cfg = {k: v if v is None or isinstance(v, (int, float, str)) else str(v) for k, v in cfg.items()}
    disk = index.tier("disk")
    if own is not None and os.path.realpath(path) == os.path.realpath(own):
        if any(e.tier is not disk or e.slab.shared for e in index.rows.values()):
            raise CacheError(f"save({path!r}) names this cache's own disk tier; save to another directory")
        index.flush()
        write_header(path, fingerprint, codec, disk.own.layouts, {**cfg, "where": "disk"})
        return
    if os.path.isdir(path) and os.listdir(path):
        raise CacheError(f"save({path!r}): the directory is not empty; save into a new or empty directory")
    os.makedirs(path, exist_ok=True)
    lock = StoreLock(path)
    layouts = list(dict.fromkeys(lay for lay, _ in index.rows))
    write_header(path, fingerprint, codec, layouts, cfg)  # first: files are never orphaned
    shard = Shard(path, readonly=False, shared=False)
    shard.fingerprint, shard.codec, shard.layouts = fingerprint, codec, layouts
    groups: dict = {}
    for lk, e in index.rows.items():
        groups.setdefault(e.slab, []).append(lk)
    entries = []
    try:
        for src, lks in groups.items():
            dst = shard.slab(src.layout, src.codec)
            keys, slots = [k for _, k in lks], [index.rows[lk].slot for lk in lks]
            if isinstance(src, DiskSlab):  # verified records, copied (the seed is the same setup's)
                rec, ok = src.read(keys, slots)
                for lk in [lk for lk, good in zip(lks, ok) if not good]:
                    index.drop(lk, corrupt=True)
                keep = [j for j, good in enumerate(ok) if good]
                lks, rec = [lks[j] for j in keep], rec[keep]
            else:  # the exact encoded bytes: no decode/encode round trip
                contents = [index.rows[lk].content or NO_CONTENT for lk in lks]
                rec = dst.build(keys, contents, *src.read_raw(slots))
            if lks:
                new = [dst.alloc() for _ in lks]
                dst.write_records(new, rec)
                entries += [(lk, 0 if src.codec == lk[0].codec else 1, s) for lk, s in zip(lks, new)]
    finally:
        shard.close()
        order = {lk: i for i, lk in enumerate(index.rows)}
        entries.sort(key=lambda e: order.get(e[0], 0))
        write_index(path, [(k, lay.uid64, code, slot) for (lay, k), code, slot in entries])
        lock.release()


def saved(path: str) -> tuple[str, float | None, dict]:
    """(fingerprint, depth, ``FeatureCache(**config)``) of what ``save(path)`` wrote (or of a disk store): the
    depth is one at which the codec ladder gives the codec its rows use."""
    check_dir_path(path)
    head = read_header(path) if os.path.isdir(path) else None
    if head is None:
        raise CacheError(
            f"{path!r} holds no saved FeatureCache (no header.json); pass a directory "
            "written by FeatureCache.save() or by a disk tier"
        )
    cfg = dict(head.get("config") or {"where": "disk"})
    where = cfg.get("where") if cfg.get("where") in WHERE else "disk"
    if where == "cuda" and not torch.cuda.is_available():
        raise CacheError(f"{path!r} holds a where='cuda' cache, but CUDA is not available here")
    evict = cfg.get("evict") if cfg.get("evict") in ("lru", "none") else "lru"
    out = dict(codec=head["codec"], where=where, budget=cfg.get("budget", "20GiB"), evict=evict)
    out.update(host_budget=cfg.get("host_budget"), disk_budget=cfg.get("disk_budget"))
    out["path"] = path if where == "disk" else None
    used = [c for _, _, _, c in head["layouts"]]
    ladder = parse_codec(head["codec"])
    depth = next((at for at, name in ladder if used and name == used[0]), None)
    if depth is not None and codec_at(head["codec"], depth) != used[0]:
        depth = None
    return head["fingerprint"], depth, out


def import_rows(index: Index, path: str, fingerprint: str, codec: str) -> None:
    """Reads every verified row of the store at ``path`` into ``index``'s tiers, in fill order."""
    src = DiskTier(math.inf, path, rank=0, readonly=True)
    try:
        rows = src.bind(fingerprint, codec, index.layouts, first=True)
        index.counters["corrupt"] += src.lost
        groups: dict[DiskSlab, list] = {}
        for lay, key, slab, slot in rows:
            groups.setdefault(slab, []).append((lay, key, slot))
        for slab, items in groups.items():
            for lo in range(0, len(items), 1024):
                chunk = items[lo : lo + 1024]
                rec, ok = slab.read([k for _, k, _ in chunk], [s for _, _, s in chunk])
                index.counters["corrupt"] += ok.count(False)
                keep = [j for j, good in enumerate(ok) if good]
                _copy_in(index, slab, [chunk[j] for j in keep], rec[keep])
    finally:
        src.close()


def _copy_in(index: Index, slab: DiskSlab, items: list, rec: torch.Tensor) -> None:
    payload, scales = slab.unpack(rec)
    contents = DiskSlab.contents_of(rec)
    for j, (lay, k, _) in enumerate(items):
        entry = index.claim((lay, k), slab.codec, set(), None if contents[j] == NO_CONTENT else contents[j])
        if entry is None:
            continue
        p = [x[j : j + 1] for x in payload]
        s = [x[j : j + 1] if x is not None else None for x in scales]
        if isinstance(entry.slab, DiskSlab):
            entry.slab.write_records([entry.slot], entry.slab.build([k], [contents[j]], p, s))
        else:
            entry.slab.write_raw([entry.slot], p, s)
