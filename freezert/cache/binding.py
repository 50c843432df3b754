"""What a cache is bound to: the fingerprint of the frozen setup, its codec (or a ladder of codecs by depth), the
per-sample boundary layouts it holds rows of, the seed that ties every disk record to all of them, and the
conversion of user keys/ids into int64 keys."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from .. import _native
from .._codecs import CODECS
from .._errors import CacheError

__all__ = [
    "Layout",
    "Layouts",
    "check_layout",
    "check_repeats",
    "check_rows",
    "content_list",
    "codec_at",
    "fingerprint_of",
    "ids_to_keys",
    "layout_from_json",
    "layout_json",
    "parse_codec",
    "store_seed",
]

Tensors = list[tuple[tuple[int, ...], torch.dtype]]  # a boundary: (per-sample shape, dtype) per tensor
_I64 = (-(2**63), 2**63 - 1)
PROGRESSIVE = "fp16,fp8@0.5"  # codec="progressive": fp16 while at most half the blocks are frozen, then fp8


def parse_codec(spec: Any) -> list[tuple[float, str]]:
    """``codec=`` as a ladder [(from depth, codec)]: ``"fp16"``, or ``"fp16,fp8@0.5"`` (fp8 for boundaries at frozen
    depth >= 0.5 of the blocks), or ``"progressive"``; a CacheError naming the bad part otherwise."""
    text = PROGRESSIVE if spec == "progressive" else spec
    if not isinstance(text, str) or not text:
        raise CacheError(f"codec={spec!r} is not supported; use one of 'fp16', 'bf16', 'fp8', 'fp32' or 'progressive'")
    ladder: list[tuple[float, str]] = []
    for i, part in enumerate(text.split(",")):
        name, _, at = part.strip().partition("@")
        try:
            depth = float(at) if at else 0.0
        except ValueError:
            depth = -1.0
        ok = name in CODECS and 0 <= depth <= 1 and (i == 0) == (depth == 0) and (not ladder or depth > ladder[-1][0])
        if not ok:
            raise CacheError(
                f"codec={spec!r} is not supported; use one of 'fp16', 'bf16', 'fp8', 'fp32', 'progressive', or a "
                "ladder like 'fp16,fp8@0.5' (a codec, then codec@depth with depths rising in (0, 1])"
            )
        ladder.append((depth, name))
    return ladder


def codec_at(spec: str, depth: float | None) -> str:
    """The codec a ladder gives boundaries at frozen ``depth`` (a fraction of the blocks; None: the first)."""
    d = 0.0 if depth is None else float(depth)
    return [name for at, name in parse_codec(spec) if at <= d or at == 0][-1]


def _codec_facts(name: str) -> list:
    c = CODECS[name]
    return [c.name, str(c.store), c.itemsize, c.scaled, c.max_amax, c.min_amax, c.rel]


def fingerprint_of(tensors: list[torch.Tensor], **facts: Any) -> str:
    """16-hex-digit fingerprint of the frozen weights (content, shape, dtype) and ``facts``.

    A ``codec`` fact naming a codec stands for its whole entry in the codec table (encoding and escape range), so
    rows stored under another definition of the same name never match.
    """
    spec = facts.get("codec")
    if isinstance(spec, str) and spec in CODECS:
        facts = {**facts, "codec": _codec_facts(spec)}
    elif isinstance(spec, str):
        try:
            facts = {**facts, "codec": [[at, *_codec_facts(n)] for at, n in parse_codec(spec)]}
        except CacheError:
            pass  # not a codec of this table: hashed as the string it is
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


def check_layout(layout: Any) -> Tensors:
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


def layout_json(layout: Tensors) -> list:
    return [[list(s), str(d).replace("torch.", "")] for s, d in layout]


def layout_from_json(obj: Any) -> Tensors | None:
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


class Layout:
    """One per-sample boundary a cache holds rows of: its tensors' (shape, dtype), the caller's ``tag`` (what tells
    apart inputs whose boundaries coincide, e.g. the input shape) and the codec of its rows.

    Made by ``FeatureCache.layout_for``; compared by identity (one object per layout in a cache). ``uid``: 16 hex
    digits of a SHA-256 of all three, the same in every process (it names the layout's files on disk).
    """

    __slots__ = ("codec", "dims", "tag", "tensors", "uid")

    def __init__(self, tensors: Tensors, tag: str | None, codec: str):
        self.tensors, self.tag, self.codec = list(tensors), tag, codec
        self.dims = [math.prod(s) for s, _ in self.tensors]
        text = json.dumps(["freezert-layout", layout_json(self.tensors), tag, codec])
        self.uid = hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def uid64(self) -> int:
        """``uid`` as a signed int64 (how the disk index names the layout of each row)."""
        v = int(self.uid, 16)
        return v - (1 << 64) if v >> 63 else v

    def __repr__(self) -> str:
        return f"Layout({layout_json(self.tensors)}, tag={self.tag!r}, codec={self.codec!r})"


class Layouts:
    """The layouts of one binding, one object each (found again by their uid: from a disk header, or a new call)."""

    def __init__(self):
        self.by_uid: dict[str, Layout] = {}

    def get(self, tensors: Tensors, tag: str | None, codec: str) -> Layout:
        new = Layout(tensors, tag, codec)
        return self.by_uid.setdefault(new.uid, new)

    def __iter__(self):
        return iter(list(self.by_uid.values()))

    def __len__(self) -> int:
        return len(self.by_uid)


def store_seed(fingerprint: str, codec: str, layout: Layout, slab_codec: str) -> int:
    """The checksum seed of a store's records: binds each record to its store's fingerprint, codec spec, the row's
    layout and the slab's codec (a record copied from another model's store, even of the same architecture, or
    from another layout's slab, fails its checksum)."""
    c = CODECS[slab_codec]  # how the record's payload is encoded, from the one codec table
    text = json.dumps(
        [
            "freezert-record",
            fingerprint,
            codec,
            layout.uid,
            layout_json(layout.tensors),
            slab_codec,
            str(c.store),
            c.itemsize,
            c.scaled,
        ]
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
    if t.numel() == 0 and not isinstance(ids, torch.Tensor):  # [] or range(0): no keys (torch reads [] as float)
        return torch.zeros(0, dtype=torch.int64)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise CacheError(f"{what} have dtype {t.dtype}; pass int64 keys (content hashes or sample ids)")
    if t.dtype == torch.uint64:
        if t.numel() and int(t.max()) > _I64[1]:
            raise CacheError(f"{what} holds {int(t.max())}, outside int64; pass ids that fit in int64")
    return t.reshape(-1).to(torch.int64).cpu()


def content_list(content: Any, n: int) -> list[int] | None:
    """``content=`` as one int64 content hash per key (None stays None)."""
    if content is None:
        return None
    cs = ids_to_keys(content, "content").tolist()
    if len(cs) != n:
        raise CacheError(f"content has {len(cs)} value(s) for {n} key(s); pass one content hash per key")
    return cs


def check_repeats(ks: list[int], cs: list[int] | None) -> None:
    """A key twice in one call: fine for content keys (the same input twice), and for ids with equal content (a
    sampler drawing one sample twice); two different inputs under one id is refused."""
    if cs is None or len(set(ks)) == len(ks):
        return
    first: dict[int, int] = {}
    for j, k in enumerate(ks):
        i = first.setdefault(k, j)
        if i != j and cs[i] != cs[j]:
            raise CacheError(
                f"sample id {k} appears at positions {i} and {j} of one batch with different inputs; two samples "
                "cannot share an id (the next epoch would serve one's features for both): pass unique ids, e.g. "
                "the dataset indices"
            )


def check_rows(rows: list, tensors: Tensors, n: int) -> None:
    """``put()``'s rows: one batch-first tensor of ``n`` rows per boundary tensor of the layout."""
    if len(rows) != len(tensors):
        raise CacheError(
            f"put() got {len(rows)} boundary tensor(s) but the layout has {len(tensors)}; "
            "pass one batch-first tensor per boundary tensor"
        )
    for i, (t, (shape, _)) in enumerate(zip(rows, tensors)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, *shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CacheError(
                f"put(): boundary tensor {i} has shape {got}, but {n} key(s) of the stored layout need "
                f"{(n, *shape)}; the ids or inputs do not match what this cache holds "
                "(use new ids for new inputs, or clear() the cache)"
            )
