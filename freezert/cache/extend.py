"""``FeatureCache.extend``: freezing deeper keeps the stored rows, converted to the new cut's boundary by running
only the blocks between the two cuts on them (docs/CACHE.md, "Freezing deeper")."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import CacheError
from .binding import check_layout
from .tiers import available_ram

__all__ = ["extend"]


def extend(cache: Any, fingerprint: str, layout, device, convert, *, chunk_bytes: int = 64 * 2**20) -> int:
    """Re-binds to ``fingerprint``/``layout`` keeping every stored row, converted rather than dropped.

    ``convert(rows)`` maps a batch of stored boundary rows (the bound layout, decoded on ``device``) to the new
    boundary's rows. Rows are staged in host memory (at most half the available RAM, most recently used first)
    and stored under the new binding in their old LRU order; records that fail verification are dropped.
    Returns how many rows were carried over (``stats()["extended"]`` adds them up).
    """
    if not cache._bound or not cache._tiers or not len(cache._index) or fingerprint == cache.fingerprint:
        cache.bind(fingerprint, layout, device)
        return 0
    layout = check_layout(layout)
    saved = dict(cache._counts)
    get_s = cache._counts.get_s
    row_bytes = sum(math.prod(s) * max(dt.itemsize, 4) for s, dt in cache.layout)
    step = max(1, chunk_bytes // max(row_bytes, 1))
    order = list(cache._index)
    try:
        staged = _convert_rows(cache, layout, convert, step, torch.device(device))
    except BaseException:  # nothing was re-bound: the rows, their LRU order and the traffic stay as they were
        for key in ("lookups", "hits"):
            cache._counts[key] = saved[key]
        cache._counts.get_s = get_s
        for k in order:
            if k in cache._index:
                cache._index.move_to_end(k)
        raise
    cache.bind(fingerprint, layout, device)  # a new fingerprint: the old rows are dropped here
    carried = 0
    for ks, cs, host in reversed(staged):  # oldest first, so the LRU order survives
        cache._put(ks, cs, [t.to(cache.device) for t in host])
        carried += len(ks)
    # what users read as traffic (lookups, hits, misses) and the invalidation are not the forward's doing
    for key in ("lookups", "hits", "misses", "invalidations"):
        cache._counts[key] = saved[key]
    cache._counts["extended"] += carried
    cache._counts.get_s = get_s
    cache._counts.seg_s, cache._counts.seg_rows = 0.0, 0  # the segment's per-row time changed with its depth
    return carried


def _convert_rows(cache: Any, layout, convert, step: int, device) -> list:
    """``extend``'s first half: (keys, contents, converted rows on the host) per chunk, most recent first."""
    room = available_ram() / 2
    keys = list(cache._index)
    staged = []
    for hi in range(len(keys), 0, -step):  # most recently used first: those are kept if RAM runs short
        chunk = keys[max(0, hi - step) : hi]
        cs = [cache._index[k][3] for k in chunk]
        hit, rows = cache.fetch(torch.tensor(chunk, dtype=torch.int64), device)  # verifies disk records
        ks = [k for k, h in zip(chunk, hit.tolist()) if h]
        cs = [cache._stored_content.get(k, c) for k, c, h in zip(chunk, cs, hit.tolist()) if h]
        if not ks:
            continue
        new = [t.detach() for t in convert(rows)]
        if len(new) != len(layout) or any(tuple(t.shape) != (len(ks), *shape) for t, (shape, _) in zip(new, layout)):
            got = [tuple(t.shape) for t in new]
            raise CacheError(
                f"extend(): convert() returned shapes {got} for {len(ks)} row(s), but the new layout needs "
                f"{[(len(ks), *s) for s, _ in layout]}; return one batch-first tensor per boundary tensor"
            )
        host = [t.to("cpu") for t in new]
        room -= sum(t.numel() * t.element_size() for t in host)
        if room < 0:
            break
        staged.append((ks, cs, host))
    return staged
