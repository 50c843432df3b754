"""Dataflow at the cut: which frozen outputs the trainable part reads, and when the segment can drop the rest."""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockTable


@dataclass(frozen=True)
class Partition:
    """Where the cut falls: the prefix ``0..k-1`` runs as one inference segment."""

    k: int  # prefix length
    frozen: tuple[int, ...]  # every frozen block (prefix and beyond)
    boundary: tuple[int, ...]  # prefix outputs the trainable part reads
    free_after: dict[int, tuple[int, ...]]  # after running block i, these prefix outputs are dead

    @property
    def tail_frozen(self) -> tuple[int, ...]:
        """Frozen blocks that run eagerly after the segment (a non-prefix freeze)."""
        return tuple(i for i in self.frozen if i >= self.k)


def partition(table: BlockTable, frozen: list[int], k: int) -> Partition:
    """Boundary and liveness for a prefix of length ``k`` (YOLO-style graphs use ``.f``; others are a chain)."""
    if k == 0:
        return Partition(0, tuple(frozen), (), {})
    n = len(table)
    if table.sources is None:
        return Partition(k, tuple(frozen), (k - 1,), {i: (i - 1,) for i in range(1, k)})
    src = table.sources
    boundary = sorted({j for i in range(k, n) for j in src[i] if j < k})
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
