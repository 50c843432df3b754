"""The plan of a wrapped model: which blocks are frozen, in what order they run, and where the cut falls.

Driven models (YOLO-style ``.f`` graphs, a root ``nn.Sequential``) are planned from their structure alone. Every
other model is planned from a recorded forward (``record.py``): the record is taken at the first call, again when
a call's structure or the freeze changes, and the ``Partition`` it yields says what runs as inference, what runs
eagerly and why, and which outputs a cache must store.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import spec as _spec
from ._errors import FreezeWarning
from .blocks import BlockTable
from .partition import Partition, partition, plan
from .record import Record, record

__all__ = ["Plan", "Planner", "user_stacklevel"]


@dataclass
class Plan:
    """One plan: the blocks in forward order, the partition, and the record it came from (if any)."""

    table: BlockTable
    part: Partition
    rec: Record | None = None
    sig: Any = None  # the call structure the record was taken on (None: not recorded)

    @property
    def driven(self) -> bool:
        """YOLO-style graphs and root ``nn.Sequential``s: freezert runs the block graph itself (no record)."""
        return self.table.kind in ("yolo", "sequential")

    def frozen_named(self) -> list[tuple[str, nn.Module]]:
        """Modules of the frozen blocks, plus the stem when block 0 is frozen, as (dotted name, module)."""
        named = [nm for i in self.part.frozen for nm in self.table.members[i]]
        return named + (list(self.table.stem) if 0 in self.part.frozen else [])

    def eager_blocks(self) -> dict[str, str]:
        """Frozen blocks that run eagerly (autograd through them, no segment, no cache), each with why."""
        out = {self.table.names[i]: why for i, why in self.part.eager.items()}
        for i in self.part.tail_frozen:
            out.setdefault(self.table.names[i], "it runs after a trainable block, so its input needs a gradient")
        return out

    def unit_name(self, u: int) -> str:
        """A record unit's dotted name: a block, or (numbered after the blocks) a stem/head candidate."""
        n = len(self.table)
        return self.table.names[u] if u < n else self.table.candidates[u - n][0]


class Planner:
    """Turns ``freeze=`` into plans for one model: from its structure, or from a recorded forward."""

    def __init__(self, model: nn.Module, table: BlockTable, freeze: Any, bn: str, also: list[nn.Parameter]):
        self.model, self.registered, self.freeze, self.bn, self.also = model, table, freeze, bn, also
        self._warned: set[tuple[int, ...]] = set()

    def unrecorded(self, table: BlockTable | None = None) -> Plan:
        """The plan from the structure alone (driven models; others until their first call)."""
        table = table or self.registered
        frozen = _spec.resolve(self.freeze, table)
        return Plan(table, partition(table, frozen, _spec.prefix_length(frozen)))

    def recorded(self, args, kwargs, sig: Any, requires_grad: dict[int, bool]) -> Plan:
        """Records one forward on ``args``/``kwargs`` and plans from it: forward order, the stem, eager blocks, the
        boundary. ``requires_grad``: each parameter's flag before the wrap (by id)."""
        table = self.registered
        frozen = _spec.resolve(self.freeze, table)
        rec = self._record(table, frozen, args, kwargs, requires_grad)
        seen = [min((rec.first_call.get(n, 1 << 30) for n, _ in ms), default=1 << 30) for ms in table.members]
        order = sorted(range(len(table)), key=lambda i: (seen[i], i))
        if order != list(range(len(table))):  # forward order differs from registration order
            table = table.reordered(order)
            frozen = _spec.resolve(self.freeze, table)
            rec = self._record(table, frozen, args, kwargs, requires_grad)
        n = len(table)
        stem_units = sorted(
            (n + c for c, (name, _) in enumerate(table.candidates) if name in rec.before_first_block),
            key=lambda u: rec.first_call.get(table.candidates[u - n][0], 0),
        )
        table.stem = [table.candidates[u - n] for u in stem_units]
        also = {id(p) for p in self.also}
        direct = [name for name, p in table.direct_parameters(self.model) if p.requires_grad and id(p) not in also]
        # Direct parameters only feed what runs after them; which ones reach the frozen blocks is in the record.
        k = _spec.prefix_length(frozen)
        part = plan(table, rec, frozen, k, stem_units if k else [], direct)
        self._warn_eager(table, part, direct)
        return Plan(table, part, rec, sig)

    def _record(self, table: BlockTable, frozen: list[int], args, kwargs, requires_grad: dict[int, bool]) -> Record:
        """One observed forward with only the parameters that will train requiring grad."""
        frozen_modules = [m for i in frozen for _, m in table.members[i]] + [m for _, m in table.candidates]
        off = {id(p) for m in frozen_modules for p in m.parameters()} | {id(p) for p in self.also}
        keep = {i for i, rg in requires_grad.items() if rg and i not in off}
        frozen_bn = [
            m for i in frozen for _, mod in table.members[i] for m in mod.modules() if isinstance(m, _BatchNorm)
        ]
        modes = [(m, m.training) for m in frozen_bn]
        try:
            if self.bn == "frozen":
                for m in frozen_bn:
                    m.train(False)
            with torch.enable_grad():
                rec, _ = record(self.model, table, set(frozen), args, kwargs, keep)
        finally:
            for m, mode in modes:
                m.train(mode)
        return rec

    def _warn_eager(self, table: BlockTable, part: Partition, direct: list[str]) -> None:
        eager = [i for i in part.eager if i < part.k]
        if not eager or tuple(eager) in self._warned:
            return
        self._warned.add(tuple(eager))
        names = [table.names[i] for i in eager]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        reason = part.eager[eager[0]]
        fix = (
            f"freeze those too to run them as inference: wrap(model, freeze=..., also_freeze={direct!r})"
            if direct and "parameters that still train" in reason
            else "freeze what feeds them, or accept the eager run"
        )
        warnings.warn(
            f"freezert runs frozen block(s) {shown} eagerly, with autograd, because {reason}; {fix}.",
            FreezeWarning,
            stacklevel=user_stacklevel(),
        )


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (past freezert's and torch.nn's frames)."""
    import os
    import sys

    skip = (os.path.dirname(__file__), os.path.dirname(nn.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level
