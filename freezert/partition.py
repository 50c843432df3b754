"""Dataflow at the cut: the boundary the trainable part reads, what the segment frees early, what must run
eagerly and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import BlockTable
from .record import Record

Unit = tuple[int, int, int]  # (block or stem unit, member, flat output index): one tensor a frozen unit produced


@dataclass(frozen=True)
class Partition:
    """Where the cut falls: the prefix ``0..k-1`` is frozen; of it, ``segment`` runs as inference."""

    k: int  # prefix length
    frozen: tuple[int, ...]  # every frozen block (prefix and beyond)
    boundary: tuple[int, ...]  # driven mode: prefix outputs the trainable part reads
    free_after: dict[int, tuple[int, ...]]  # driven mode: after running block i, these prefix outputs are dead
    eager: dict[int, str] = field(default_factory=dict)  # frozen blocks run with autograd, and why
    cached: int = 0  # swap mode: blocks 0..cached-1 run before the first eager block
    cached_units: tuple[int, ...] = ()  # swap mode: the record units a cache hit skips (stem and blocks)
    replay: tuple[Unit, ...] = ()  # swap mode: the outputs a cache stores and replays
    stem_units: tuple[int, ...] = ()  # swap mode: record units of the stem (run before block 0)
    unbatched: tuple[
        int, ...
    ] = ()  # swap mode: units left out of the cache: an output read outside lacks the batch dim

    @property
    def tail_frozen(self) -> tuple[int, ...]:
        """Frozen blocks that run eagerly after the segment (a non-prefix freeze)."""
        return tuple(i for i in self.frozen if i >= self.k)

    @property
    def segment(self) -> tuple[int, ...]:
        """Prefix blocks run as inference (no autograd, folded, pre-cast)."""
        return tuple(i for i in range(self.k) if i not in self.eager)


def partition(table: BlockTable, frozen: list[int], k: int) -> Partition:
    """Boundary and liveness for a prefix of length ``k`` (YOLO-style graphs use ``.f``; others are a chain)."""
    if k == 0:
        return Partition(0, tuple(frozen), (), {})
    n = len(table)
    if table.sources is None:
        return Partition(k, tuple(frozen), (k - 1,), {i: (i - 1,) for i in range(1, k)})
    src = table.sources
    boundary = sorted({j for i in range(k, n) for j in src[i] if j < k} | ({n - 1} if k == n else set()))
    last_use: dict[int, int] = {}
    for i in range(k):
        for j in src[i]:
            last_use[j] = max(last_use.get(j, -1), i)
    free_after: dict[int, list[int]] = {}
    for j, i in last_use.items():
        if j not in boundary:
            free_after.setdefault(i, []).append(j)
    # Outputs nobody reads (besides the chain) are dropped right after they are produced.
    for j in range(k):
        if j not in last_use and j not in boundary:
            free_after.setdefault(j, []).append(j)
    return Partition(k, tuple(frozen), tuple(boundary), {i: tuple(v) for i, v in free_after.items()})


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def eager_reasons(table: BlockTable, rec: Record, frozen: list[int]) -> dict[int, str]:
    """Frozen blocks that need autograd through them, each with the cause in words (indices: ``rec``'s)."""
    out: dict[int, str] = {}
    for i in frozen:
        if rec.block_calls.get(i, 0) > 1:
            out[i] = (
                f"it runs {rec.block_calls[i]} times in one forward (a shared block), and a later call needs autograd"
            )
        elif rec.grad_in.get(i):
            out[i] = f"its input depends on parameters that still train ({_shown(rec.grad_in[i])})"
        elif rec.grad_inside.get(i):
            out[i] = f"it reads parameters that still train from outside the block ({_shown(rec.grad_inside[i])})"
    return out


def plan(table: BlockTable, rec: Record, frozen: list[int], k: int, stem_units: list[int]) -> Partition:
    """The swap-mode plan from a record (``table`` already in forward order, ``rec`` mapped to it)."""
    eager = eager_reasons(table, rec, frozen)
    cached = 0
    while cached < k and cached not in eager:
        cached += 1
    units = set(range(cached)) | (set(stem_units) if cached else set())
    # A stem unit whose input or output depends on parameters that still train (a root parameter it reads, Hugging
    # Face glue before it) runs on every call, with autograd: a replayed row would cut that gradient.
    units -= {u for u in stem_units if rec.grad_in.get(u) or rec.grad_inside.get(u)}
    dropped: list[int] = []
    while True:
        # A unit whose output the rest reads without the batch dimension first (GPT-2's position embedding,
        # [1, T, D]) cannot be stored per sample: it runs on every call instead, and what it reads from the
        # cached part becomes boundary in turn.
        replay = rec.boundary(units)
        shared = {u for u, j, n in replay if not rec.out_is_batch.get((u, j, n), False)}
        if not shared:
            break
        units -= shared
        dropped += sorted(shared)
    if not any(u < len(table) for u in units):
        units, replay = set(), []
    return Partition(
        k, tuple(frozen), (), {}, eager, cached, tuple(sorted(units)), tuple(replay), tuple(stem_units), tuple(dropped)
    )
