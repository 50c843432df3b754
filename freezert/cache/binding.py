"""What a cache is bound to: the fingerprint of the frozen setup, the per-sample boundary layout, the seed that
ties every disk record to both, and the conversion of user keys/ids into int64 keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .. import _native
from .._errors import CacheError
from .codecs import CODECS

__all__ = ["check_layout", "fingerprint_of", "ids_to_keys", "layout_from_json", "layout_json", "store_seed"]

Layout = list[tuple[tuple[int, ...], torch.dtype]]
_I64 = (-(2**63), 2**63 - 1)


def fingerprint_of(tensors: list[torch.Tensor], **facts: Any) -> str:
    """16-hex-digit fingerprint of the frozen weights (content, shape, dtype) and ``facts``.

    A ``codec`` fact naming a codec stands for its whole entry in the codec table (encoding and escape range), so
    rows stored under another definition of the same name never match.
    """
    if isinstance(facts.get("codec"), str) and facts["codec"] in CODECS:
        c = CODECS[facts["codec"]]
        facts = {**facts, "codec": [c.name, str(c.store), c.itemsize, c.scaled, c.max_amax, c.min_amax, c.rel]}
    h = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    chunk = 1 << 16
    for t in tensors:
        t = t.detach()
        h.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        body = n - n % chunk
        parts = []
        if body:  # many rows: the native hash runs them in parallel
            parts.append(_native.hash_rows(flat[:body].reshape(-1, chunk)))
        parts.append(_native.hash_rows(flat[body:].reshape(1, -1)))
        h.update(b"".join(int(v).to_bytes(8, "little", signed=True) for p in parts for v in p.cpu().tolist()))
    return h.hexdigest()[:16]


def check_layout(layout: Any) -> Layout:
    """``layout`` as a list of (shape tuple, floating dtype) pairs, or a CacheError saying what is wrong."""
    try:
        out = [(tuple(int(d) for d in shape), dt) for shape, dt in layout]
    except (TypeError, ValueError):
        raise CacheError(
            f"layout={layout!r} is not a list of (shape, dtype) pairs; pass one per boundary tensor"
        ) from None
    if not out:
        raise CacheError("layout=[] has no boundary tensor; pass one (shape, dtype) pair per boundary tensor")
    for shape, dt in out:
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize < 2:
            raise CacheError(
                f"a boundary tensor of dtype {dt} cannot be cached: the codecs store floating rows; "
                "cache a floating boundary (float32/float16/bfloat16/float64) or drop cache="
            )
        if any(d < 0 for d in shape):
            raise CacheError(f"boundary shape {shape} has a negative size; pass the per-sample shape")
    return out


def layout_json(layout: Layout) -> list:
    return [[list(s), str(d).replace("torch.", "")] for s, d in layout]


def layout_from_json(obj: Any) -> Layout | None:
    """The layout a header.json holds, or None when it is malformed (never raises)."""
    try:
        out = []
        for s, d in obj:
            dt = getattr(torch, d) if isinstance(d, str) else None
            if not isinstance(dt, torch.dtype) or not isinstance(s, list):
                return None
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40 for v in s):
                return None
            out.append((tuple(s), dt))
        return check_layout(out)
    except (TypeError, ValueError, AttributeError):
        return None


def store_seed(fingerprint: str, codec: str, layout: Layout, slab_codec: str) -> int:
    """The checksum seed of a store's records: binds each record to its store's fingerprint, codec and layout
    (a record copied from another model's store, even of the same architecture, fails its checksum)."""
    c = CODECS[slab_codec]  # how the record's payload is encoded, from the one codec table
    text = json.dumps(
        ["freezert-record", fingerprint, codec, layout_json(layout), slab_codec, str(c.store), c.itemsize, c.scaled]
    )
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def ids_to_keys(ids: Any, what: str = "keys") -> torch.Tensor:
    """int64 CPU keys (N,) from an int tensor, list or range of ids; a CacheError for floats, bools, huge ids."""
    if isinstance(ids, torch.Tensor):
        t = ids.detach()
    else:
        try:
            t = torch.as_tensor(ids)
        except (OverflowError, RuntimeError, TypeError, ValueError):
            vals = ids.tolist() if hasattr(ids, "tolist") else ids
            try:
                flat = [int(v) for v in (vals if isinstance(vals, (list, tuple, range)) else [vals])]
            except (TypeError, ValueError):
                flat = []
            bad = next((v for v in flat if not _I64[0] <= v <= _I64[1]), None)
            if bad is not None:
                raise CacheError(
                    f"{what} holds {bad}, outside int64 [-2**63, 2**63 - 1]; pass ids that fit in int64 "
                    "(dataset indices, or a 63-bit hash of your own ids)"
                ) from None
            raise CacheError(f"{what}={ids!r} is not a sequence of integers; pass one integer id per sample") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise CacheError(f"{what} have dtype {t.dtype}; pass int64 keys (content hashes or sample ids)")
    if t.dtype == torch.uint64:
        if t.numel() and int(t.max()) > _I64[1]:
            raise CacheError(f"{what} holds {int(t.max())}, outside int64; pass ids that fit in int64")
    return t.reshape(-1).to(torch.int64).cpu()
