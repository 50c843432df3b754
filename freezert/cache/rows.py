"""The data path over an ``Index``: ``write`` encodes and stores rows of one layout (escape, non-finite rows, placement,
disk write failures), ``read`` finds, verifies and decodes them (disk records, changed inputs, prefetched rows)."""

from __future__ import annotations

import torch

from .._codecs import ESCAPE, IO_DTYPES, escape_kind
from .._errors import CacheError
from .binding import Layout
from .index import Index
from .prefetch import Prefetch
from .records import NO_CONTENT, DiskSlab
from .tiers import MemSlab

__all__ = ["read", "write"]


def write(index: Index, layout: Layout, ks: list[int], cs: list[int | None] | None, tensors: list) -> None:
    """Stores ``tensors[i][j]`` (batch-first, ``layout``) under ``ks[j]`` with content ``cs[j]``; a key held already
    is replaced. Counts stores, escapes, skips; rows a disk write fails for are not stored (reported once)."""
    n, counters = len(ks), index.counters
    flat = [t.detach().reshape(n, -1) for t in tensors]
    flat = [f if f.dtype in IO_DTYPES else f.float() for f in flat]
    # per sample and boundary tensor max |x|; amax propagates NaN and inf, so it also flags them
    amax = torch.stack(
        [f.abs().amax(1).float() if f.shape[1] else f.new_zeros(n, dtype=torch.float32) for f in flat], 1
    ).cpu()
    finite = torch.isfinite(amax).all(1).tolist()
    kind = escape_kind(layout.codec, torch.where(torch.isfinite(amax), amax, 0)).tolist()
    batch = {(layout, k) for k in ks}
    seen: set[int] = set()
    plan: dict[DiskSlab, tuple[list[int], list[int]]] = {}
    for j, k in enumerate(ks):
        if k in seen:  # the same input twice in one call (checked by the caller): stored once
            continue
        seen.add(k)
        if not finite[j]:
            counters["nonfinite"] += 1
            counters["skipped"] += 1
            index.warn_once(
                "nonfinite",
                "freezert: the frozen segment produced inf/NaN for some samples; "
                "they are not cached (stats()['nonfinite'] counts them) and are recomputed each time",
                stacklevel=5,
            )
            continue
        if (layout, k) in index.rows:
            index.drop((layout, k))
        entry = index.claim((layout, k), layout.codec if kind[j] == 0 else ESCAPE, batch, None if cs is None else cs[j])
        if entry is not None:
            rws, slots = plan.setdefault(entry.slab, ([], []))
            rws.append(j)
            slots.append(entry.slot)
    for slab, (rws, slots) in plan.items():
        idx = torch.tensor(rws, dtype=torch.int64, device=flat[0].device)
        src = [f.index_select(0, idx) if len(rws) != n else f.contiguous() for f in flat]
        if isinstance(slab, DiskSlab):
            contents = [NO_CONTENT if cs is None or cs[r] is None else cs[r] for r in rws]
            try:
                slab.encode([ks[r] for r in rws], contents, slots, src)
            except OSError as e:  # disk full, I/O error: these rows are not stored; nothing stored before is lost
                for r in rws:
                    index.drop((layout, ks[r]))
                index.write_failed(slab.file, len(rws), len(rws) * slab.rec, e)
                continue
        else:
            slab.encode(slots, src)
        counters["stores"] += len(rws)
        if slab.codec != layout.codec:
            counters["escaped"] += len(rws)
            large = sum(1 for r in rws if kind[r] == 1)
            counters["escaped_large"] += large
            counters["escaped_small"] += len(rws) - large


def read(
    index: Index, layout: Layout, ks: list[int], cs: list[int] | None, device: torch.device, *, strict: bool, pre=None
) -> tuple[list[bool], list[torch.Tensor], dict[int, int | None]]:
    """(hit per key, the hits' rows decoded on ``device`` in ``layout``'s dtypes, the stored content of each key
    found). Disk records are verified here (or were by the prefetch ``pre``, for rows unchanged since); a record
    that fails is dropped and counted (corrupt), a row whose input changed (``cs``) is dropped and counted
    (stale, one warning; a CacheError under ``strict``). Neither counts as a lookup or a hit here."""
    want = dict(zip(ks, cs)) if cs is not None else {}
    present = [k for k in dict.fromkeys(ks) if (layout, k) in index.rows]
    recs: dict[int, tuple] = {}  # key -> (source, records or None, row)
    stored: dict[int, int | None] = {}
    bad: set[int] = set()
    by_slab: dict[DiskSlab, list[int]] = {}
    for k in present:
        e = index.rows[(layout, k)]
        stored[k] = e.content
        if isinstance(e.slab, DiskSlab):
            got = pre.take(k, e) if pre is not None else None
            if got is None:
                by_slab.setdefault(e.slab, []).append(k)
            else:
                recs[k], stored[k] = (pre, None, got[0]), got[1]
    for slab, group in by_slab.items():
        rec, ok = slab.read(group, [index.rows[(layout, k)].slot for k in group])
        contents = DiskSlab.contents_of(rec)
        for j, (k, good) in enumerate(zip(group, ok)):
            if good:
                recs[k], stored[k] = (slab, rec, j), None if contents[j] == NO_CONTENT else contents[j]
            else:
                bad.add(k)
    stale = [k for k in present if k not in bad and k in want and stored[k] is not None and stored[k] != want[k]]
    if stale:
        _stale(index, stale, strict)
    for k in bad:
        index.drop((layout, k), corrupt=True)
    for k in stale:
        index.drop((layout, k))
    unverified = {k for k in present if k in want and stored[k] is None}  # stored without content: recompute
    gone = bad | set(stale) | unverified
    hit = [(layout, k) in index.rows and k not in gone for k in ks]
    served = [k for k, h in zip(ks, hit) if h]
    return hit, _decode(index, layout, served, device, recs), stored


def _stale(index: Index, stale: list[int], strict: bool) -> None:
    if strict:
        raise CacheError(
            f"sample id {stale[0]} (and {len(stale) - 1} more) arrived with a different input than when its "
            "features were stored (strict=True); the likely cause is random augmentation, which makes cached "
            "features stale: cache un-augmented inputs, or use strict=False to recompute them with a warning"
        )
    index.counters["stale"] += len(stale)
    index.warn_once(
        "stale",
        f"freezert: sample id {stale[0]} (and {len(stale) - 1} more) arrived with a "
        "different input than when its features were stored, so they were recomputed "
        "(stats()['stale'] counts them). The likely cause is random augmentation: a feature cache "
        "only saves time when the same sample gives the same input; cache un-augmented inputs or "
        "drop cache= (strict=True turns this into an error)",
        stacklevel=6,
    )


def _decode(index: Index, layout: Layout, ks: list[int], device: torch.device, recs: dict) -> list[torch.Tensor]:
    """Rows of ``ks`` (all stored; disk ones verified in ``recs``) decoded on ``device``."""
    want = [dt for _, dt in layout.tensors]
    dec = [w if w in IO_DTYPES else torch.float32 for w in want]
    whole = _whole_prefetch(ks, recs, device)
    if whole is not None:  # the whole batch, prefetched in this order: its rows as they are, no copy
        res = [o.view(len(ks), *shape) for o, (shape, _) in zip(whole.outs, layout.tensors)]
        return [r if r.dtype == w else r.to(w) for r, w in zip(res, want)]
    outs = [torch.empty(len(ks), d, dtype=dt, device=device) for d, dt in zip(layout.dims, dec)]
    groups: dict[object, list[int]] = {}
    for pos, k in enumerate(ks):
        src = recs[k][0] if k in recs else index.rows[(layout, k)].slab
        groups.setdefault(src, []).append(pos)
    for src, pos in groups.items():
        whole = len(groups) == 1
        dst = outs if whole else [torch.empty(len(pos), o.shape[1], dtype=o.dtype, device=device) for o in outs]
        if isinstance(src, DiskSlab):
            src.decode(_gather_records([recs[ks[p]] for p in pos]), dst)
        elif isinstance(src, MemSlab):
            src.decode([index.rows[(layout, ks[p])].slot for p in pos], dst)
        else:  # a prefetch: rows it decoded already
            src.copy_rows([recs[ks[p]][2] for p in pos], dst)
        if not whole:
            idx = torch.tensor(pos, dtype=torch.int64, device=device)
            for o, d in zip(outs, dst):
                o[idx] = d
    res = [o.view(len(ks), *shape) for o, (shape, _) in zip(outs, layout.tensors)]
    return [r if r.dtype == w else r.to(w) for r, w in zip(res, want)]


def _whole_prefetch(ks: list[int], recs: dict, device: torch.device) -> Prefetch | None:
    """The prefetch that decoded exactly ``ks``, in this order, on the CPU; else None."""
    src = recs.get(ks[0], (None,))[0] if ks else None
    if not isinstance(src, Prefetch) or device.type != "cpu" or not src.outs or len(ks) != src.outs[0].shape[0]:
        return None
    return src if all(recs.get(k, (None,))[0] is src and recs[k][2] == j for j, k in enumerate(ks)) else None


def _gather_records(srcs: list[tuple]) -> torch.Tensor:
    """The records (n, rec) named by (slab, records tensor, row) triples, without a copy when they are one
    tensor's rows in order (a read fetches each slab's records in one tensor)."""
    base = srcs[0][1]
    if all(t is base for _, t, _ in srcs):
        rows = [j for _, _, j in srcs]
        if rows == list(range(base.shape[0])):
            return base
        return base.index_select(0, torch.tensor(rows, dtype=torch.int64))
    return torch.cat([t[j : j + 1] for _, t, j in srcs])
