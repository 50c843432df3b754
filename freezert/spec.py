"""Turning ``freeze=`` into a set of frozen block indices, with all validation of it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ._errors import FreezeError
from .blocks import BlockTable, strip_wrapper_prefix


def _listing(table: BlockTable, limit: int = 6) -> str:
    names = table.names
    shown = ", ".join(names[:limit]) + (f", …, {names[-1]}" if len(names) > limit else "")
    return f"{len(names)} blocks ({shown})"


def _check_not_all(idx: list[int], table: BlockTable, what: str) -> list[int]:
    """Every block frozen is a linear probe when parameters outside the blocks train (a head, a classifier);
    without any, it leaves nothing to train, which is refused unless asked for by name (``freeze="all"``)."""
    if len(idx) >= len(table) and not table.outside:
        raise FreezeError(
            f"{what} freezes every one of the {len(table)} blocks and the model has no parameters outside them, "
            f"leaving nothing to train; freeze at most {len(table) - 1} blocks, or pass freeze='all' for a frozen "
            "feature extractor"
        )
    return idx


def _match_prefix(prefix: str, table: BlockTable) -> list[int]:
    p = strip_wrapper_prefix(prefix).strip(".")
    parts = p.split(".") if p else []
    hits = [i for i, n in enumerate(table.names) if n.split(".")[: len(parts)] == parts]
    if hits:
        return hits
    inside = [n for n in table.names if parts[: len(n.split("."))] == n.split(".")]
    inside += [
        table.names[i]
        for i, ms in enumerate(table.members)
        if len(ms) > 1
        for mn, _ in ms
        if parts[: len(mn.split("."))] == mn.split(".")
    ]
    if inside:
        raise FreezeError(
            f"freeze name {prefix!r} points inside block {inside[0]!r}; freezing works on whole blocks: "
            f"name {inside[0]!r} instead"
        )
    outside = [n for n, _ in list(table.stem) + list(table.candidates) if parts[: len(n.split("."))] == n.split(".")]
    if outside:
        raise FreezeError(
            f"freeze name {prefix!r} is {outside[0]!r}, a module outside the blocks: what runs before block 0 is the "
            f"stem and is frozen with block {table.names[0]!r} (freeze=1), the rest is the trainable head; name blocks"
        )
    raise FreezeError(f"freeze name {prefix!r} matches no block; the model has {_listing(table)}")


def resolve(freeze, table: BlockTable) -> list[int]:
    """Sorted frozen block indices for ``freeze`` (int, list of ints, str(s), fraction or predicate)."""
    n = len(table)
    if freeze is None or freeze is False:
        return []
    if freeze is True:
        raise FreezeError("freeze=True is ambiguous; pass a block count (freeze=10), a list of indices or a fraction")
    if isinstance(freeze, int):
        if freeze < 0:
            raise FreezeError(f"freeze={freeze} is negative; pass a block count between 0 and {n - 1}")
        if freeze > n:
            raise FreezeError(f"freeze={freeze} is past the end: the model has {_listing(table)}; pass at most {n - 1}")
        return _check_not_all(list(range(freeze)), table, f"freeze={freeze}")
    if isinstance(freeze, float):
        if not (0.0 < freeze <= 1.0) or math.isnan(freeze):
            raise FreezeError(f"freeze={freeze} is not a fraction in (0, 1]; pass e.g. freeze=0.5 for half the blocks")
        return _check_not_all(list(range(int(freeze * n))), table, f"freeze={freeze}")
    if freeze == "all":  # the whole model as inference: a frozen feature extractor (a Lightning backbone)
        return list(range(n))
    if isinstance(freeze, str):
        return _check_not_all(_match_prefix(freeze, table), table, f"freeze={freeze!r}")
    if callable(freeze):
        idx = [i for i, (name, m) in enumerate(zip(table.names, table.modules)) if freeze(name, m)]
        if not idx:  # as a name that matches nothing: a silent no-op would train what the user meant to freeze
            raise FreezeError(
                f"the freeze predicate matches no block; the model has {_listing(table)}: it is called with each "
                "block's (name, module), or pass freeze=0 to freeze nothing"
            )
        return _check_not_all(idx, table, "the freeze predicate")
    if isinstance(freeze, Sequence):
        items = list(freeze)
        if all(isinstance(x, str) for x in items):
            idx = sorted({i for x in items for i in _match_prefix(x, table)})
            return _check_not_all(idx, table, f"freeze={items!r}")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            bad = [x for x in items if not 0 <= x < n]
            if bad:
                raise FreezeError(
                    f"freeze list has block index {bad[0]}, outside 0..{n - 1}; the model has {_listing(table)}"
                )
            return _check_not_all(sorted(set(items)), table, f"freeze={items!r}")
        raise FreezeError(f"freeze={items!r} mixes types; pass a list of block indices or a list of name prefixes")
    raise FreezeError(
        f"freeze={freeze!r} ({type(freeze).__name__}) is not understood; pass an int, a list of ints, "
        "name prefix(es), a fraction in (0, 1], a predicate (name, module) -> bool, or None"
    )


def resolve_params(also_freeze, model: torch.nn.Module, table: BlockTable) -> list[torch.nn.Parameter]:
    """The parameters ``also_freeze=`` names (prefixes of parameter names, on whole dotted components)."""
    if also_freeze is None:
        return []
    items = [also_freeze] if isinstance(also_freeze, str) else also_freeze
    if not isinstance(items, Sequence) or not all(isinstance(x, str) for x in items):
        raise FreezeError(f"also_freeze={also_freeze!r} must be a parameter name or a list of them, e.g. ['cls_token']")
    named = list(model.named_parameters())
    out: dict[int, torch.nn.Parameter] = {}
    for item in items:
        parts = strip_wrapper_prefix(item).strip(".").split(".")
        hits = [p for n, p in named if n.split(".")[: len(parts)] == parts]
        if not hits:
            direct = ", ".join(n for n, _ in table.direct_parameters(model)) or "none"
            raise FreezeError(
                f"also_freeze name {item!r} matches no parameter; parameters outside every block and stem: {direct}"
            )
        out.update((id(p), p) for p in hits)
    return list(out.values())


def prefix_length(frozen: list[int]) -> int:
    """Length of the run of frozen blocks that starts at block 0 (the inference segment)."""
    k = 0
    s = set(frozen)
    while k in s:
        k += 1
    return k


Predicate = Callable[[str, torch.nn.Module], bool]
