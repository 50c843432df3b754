"""``FeatureCache.extend``: freezing deeper keeps the stored rows, converted to the new cut's boundary by running
only the blocks between the two cuts on them (docs/CACHE.md, "Freezing deeper")."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import CacheError
from . import rows as _rows
from .binding import Layout, check_layout
from .index import Index
from .tiers import available_ram

__all__ = ["extend"]


def extend(
    cache: Any, index: Index, new: tuple, convert, chunk_bytes: int, *, carry: bool, old_default: Layout | None
) -> int:
    """Re-binds ``cache`` to ``new`` = (fingerprint, layout, device, depth) keeping every stored row of ``index``,
    converted rather than dropped.

    ``convert(rows)`` maps a batch of one layout's stored rows (decoded on ``device``) to the new boundary's rows.
    ``layout``: the new default layout (rows of ``old_default`` must convert to it); every other layout becomes
    what ``convert`` returns for it, under the same tag. Rows are staged in host memory (at most half the available
    RAM, most recently used first) and stored under the new binding in their old LRU order; records that fail
    verification are dropped. ``carry`` False (nothing bound yet, or the same fingerprint): a plain bind. Returns
    how many rows were carried (``stats()["extended"]`` adds them up).
    """
    fingerprint, layout, device, depth = new
    if not carry or not len(index):
        cache.bind(fingerprint, layout, device, depth=depth)
        return 0
    new_default = None if layout is None else check_layout(layout)
    row_bytes = max(sum(math.prod(s) * max(dt.itemsize, 4) for s, dt in lay.tensors) for lay, _ in index.rows)
    step = max(1, chunk_bytes // max(row_bytes, 1))
    staged = _convert_rows(index, convert, step, torch.device(device), old_default, new_default)
    invalidations = index.counters["invalidations"]
    cache.bind(fingerprint, layout, device, depth=depth)  # a new fingerprint: the old rows are dropped here
    carried = 0
    for tensors, tag, ks, cs, host in reversed(staged):  # oldest first, so the LRU order survives
        _rows.write(index, cache.layout_for(tensors, tag), ks, cs, [t.to(cache.device) for t in host])
        carried += len(ks)
    # the invalidation is not the forward's doing, nor is the carrying traffic (reads here count no lookups)
    index.counters["invalidations"] = invalidations
    index.counters["extended"] += carried
    index.counters.seg_s, index.counters.seg_rows = 0.0, 0  # the segment's per-row time changed with its depth
    return carried


def _convert_rows(index: Index, convert, step: int, device, old_default, new_default) -> list:
    """``extend``'s first half: (new tensors, tag, keys, contents, converted rows on the host) per chunk and layout,
    most recent first. Nothing is changed if ``convert`` fails or returns the wrong shapes."""
    room = available_ram() / 2
    order = index.lru()
    staged = []
    for hi in range(len(order), 0, -step):  # most recently used first: those are kept if RAM runs short
        by_layout: dict[Layout, list[int]] = {}
        for lay, k in order[max(0, hi - step) : hi]:
            by_layout.setdefault(lay, []).append(k)
        for lay, chunk in by_layout.items():
            hit, rows, stored = _rows.read(index, lay, chunk, None, device, strict=False)  # verifies disk records
            ks = [k for k, h in zip(chunk, hit) if h]
            if not ks:
                continue
            new = [t.detach() for t in convert(rows)]
            want = new_default if lay is old_default and new_default is not None else None
            tensors = want or [(tuple(t.shape[1:]), t.dtype) for t in new]
            if len(new) != len(tensors) or any(tuple(t.shape) != (len(ks), *s) for t, (s, _) in zip(new, tensors)):
                raise CacheError(
                    f"extend(): convert() returned shapes {[tuple(t.shape) for t in new]} for {len(ks)} row(s), but "
                    f"the new layout needs {[(len(ks), *s) for s, _ in tensors]}; return one batch-first tensor "
                    "per boundary tensor"
                )
            host = [t.to("cpu") for t in new]
            room -= sum(t.numel() * t.element_size() for t in host)
            if room < 0:
                return staged
            staged.append((tensors, lay.tag, ks, [stored.get(k) for k in ks], host))
    return staged
