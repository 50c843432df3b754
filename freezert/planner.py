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
from .record import OUTSIDE, Record, record

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
    """Turns ``freeze=`` into plans for one model: from its structure, or from recorded forwards.

    A plan must hold for every call it serves, so the record is kept per kind of call (its structure, the
    model's mode, grad mode, a batch of one or more): a call of a new kind is recorded, a kind seen before is
    planned again from its record. Readers of frozen outputs seen in any record are readers in all of them:
    what one kind of call reads (GoogLeNet's auxiliary heads in train mode) is stored for every kind.
    """

    def __init__(self, model: nn.Module, table: BlockTable, freeze: Any, bn: str, also: list[nn.Parameter]):
        self.model, self.registered, self.freeze, self.bn, self.also = model, table, freeze, bn, also
        self._warned: set = set()
        self._records: dict[Any, tuple[BlockTable, Record]] = {}
        # the block order of the first record: every later kind of call keeps it (a train-only block must not move
        # the cut, and with it the frozen set, between validation and training)
        self._ordered: BlockTable | None = None

    def unrecorded(self, table: BlockTable | None = None) -> Plan:
        """The plan from the structure alone (driven models; others until their first call). A new freeze: the
        records of the old one no longer hold (the block order they found does)."""
        self._records.clear()
        table = table or self._ordered or self.registered
        frozen = _spec.resolve(self.freeze, table)
        return Plan(table, partition(table, frozen, _spec.prefix_length(frozen)))

    def recorded(self, args, kwargs, sig: Any, requires_grad: dict[int, bool], run=None) -> Plan:
        """The plan for calls of kind ``sig``: recorded on ``args``/``kwargs`` the first time, then from the record.
        ``requires_grad``: each parameter's flag before the wrap (by id); ``run``: what runs the model's forward
        (default: calling the model)."""
        if sig not in self._records:
            self._records[sig] = self._record_in_order(args, kwargs, requires_grad, run)
        table, rec = self._records[sig]
        for other_table, other in self._records.values():
            if other is not rec and other_table.names == table.names:
                rec.merge_readers(other)
                other.merge_readers(rec)
        return self._plan(table, rec, sig)

    def with_reader(self, plan: Plan, key: tuple[int, int, int]) -> Plan:
        """``plan`` again, now that a call read output ``key`` of the cached part from outside it (a branch the
        records did not take): every record of this order counts that reader from now on."""
        for table, rec in self._records.values():
            if table.names == plan.table.names and key in rec.consumers:
                rec.consumers[key].add(OUTSIDE)
        return self._plan(plan.table, plan.rec, plan.sig)

    def _record_in_order(self, args, kwargs, requires_grad: dict[int, bool], run=None) -> tuple[BlockTable, Record]:
        """The record, taken on the blocks in forward order (a second record when the order or the parameters that
        must be live differ from the first's)."""
        table = self._ordered or self.registered
        glue: set[int] = set()
        for _ in range(3):
            frozen = _spec.resolve(self.freeze, table)
            rec = self._record(table, frozen, args, kwargs, requires_grad, glue, run)
            order = _forward_order(table, rec) if self._ordered is None else list(range(len(table)))
            # parameters read by the model's glue that will train: not the stem's (frozen with block 0)
            stem_params = {id(p) for n, m in table.candidates if n in rec.before_first_block for p in m.parameters()}
            live_glue = {i for i in rec.glue_params if requires_grad.get(i)} - {id(p) for p in self.also} - stem_params
            if order == list(range(len(table))) and live_glue <= glue:
                break
            if order != list(range(len(table))):  # forward order differs from registration order
                table = table.reordered(order)
            glue |= live_glue  # parameters read by the model's glue: live in the record, so their readers show
        if self._ordered is None:  # the first record fixes the order and the stem: what is frozen never moves
            n = len(table)
            stem_units = sorted(
                (
                    n + c
                    for c, (name, m) in enumerate(table.candidates)
                    if name in rec.before_first_block and any(True for _ in m.parameters())
                ),
                key=lambda u: rec.first_call.get(table.candidates[u - n][0], 0),
            )
            # The stem is frozen parameters: a parameter-free module that runs first (torchvision detection's
            # GeneralizedRCNNTransform, a dropout) keeps the model's mode and runs as the model runs it.
            table.stem = [table.candidates[u - n] for u in stem_units]
            self._ordered = table
            self._warn_tied(table, rec)
        return table, rec

    def _warn_tied(self, table: BlockTable, rec: Record) -> None:
        """A stem parameter that a module after the blocks reads too (T5's and BART's tied embedding and LM head)
        is frozen with the stem: say so once, with the fix."""
        stem = {id(p) for _, m in table.stem for p in m.parameters()}
        later = [
            pn
            for name, m in table.candidates
            if name not in rec.before_first_block
            for pn, p in m.named_parameters(prefix=name)
            if id(p) in stem
        ]
        if later and "tied" not in self._warned:
            self._warned.add("tied")
            shown = ", ".join(later[:3])
            warnings.warn(
                f"freezing the stem also freezes {shown}: the same parameter is read after the blocks (a tied "
                "embedding and output layer); to train it, keep the stem trainable by freezing a later block only, "
                "or accept it frozen",
                FreezeWarning,
                stacklevel=user_stacklevel(),
            )

    def _plan(self, table: BlockTable, rec: Record, sig: Any) -> Plan:
        frozen = _spec.resolve(self.freeze, table)
        k = _spec.prefix_length(frozen)
        n = len(table)
        stem = {name for name, _ in table.stem}
        stem_units = [n + c for c, (name, _) in enumerate(table.candidates) if name in stem]
        stem_units.sort(key=lambda u: rec.first_call.get(table.candidates[u - n][0], 0))
        part = plan(table, rec, frozen, k, stem_units if k else [])
        self._warn_eager(table, part, rec)
        return Plan(table, part, rec, sig)

    def _record(
        self,
        table: BlockTable,
        frozen: list[int],
        args,
        kwargs,
        requires_grad: dict[int, bool],
        glue: set[int],
        run=None,
    ) -> Record:
        """One observed forward with only the parameters that will train requiring grad (stem and head candidates
        off: which is which is what the record tells; ``glue``: candidate parameters read by glue code, on)."""
        frozen_modules = [m for i in frozen for _, m in table.members[i]] + [m for _, m in table.candidates]
        off = {id(p) for m in frozen_modules for p in m.parameters()} - glue
        off |= {id(p) for p in self.also}
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
                rec, _ = record(self.model, table, set(frozen), args, kwargs, keep, run=run)
        finally:
            for m, mode in modes:
                m.train(mode)
        return rec

    def _warn_eager(self, table: BlockTable, part: Partition, rec: Record) -> None:
        eager = [i for i in part.eager if i < part.k]
        if not eager or tuple(eager) in self._warned:
            return
        self._warned.add(tuple(eager))
        names = [table.names[i] for i in eager]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        reason = part.eager[eager[0]]
        inside = {n for _, m in zip(table.names, table.modules) for n, _ in _named_params_under(self.model, m)}
        feeders = sorted({f for i in eager for f in rec.grad_in.get(i, []) + rec.grad_inside.get(i, [])} - inside)
        fix = (
            f"freeze those too to run them as inference: wrap(model, freeze=..., also_freeze={feeders!r})"
            if feeders
            else "freeze what feeds them, or accept the eager run"
        )
        warnings.warn(
            f"freezert runs frozen block(s) {shown} eagerly, with autograd, because {reason}; {fix}.",
            FreezeWarning,
            stacklevel=user_stacklevel(),
        )


def _named_params_under(model: nn.Module, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    ids = {id(p) for p in module.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _forward_order(table: BlockTable, rec: Record) -> list[int]:
    """Block indices in the order the record saw them run; blocks that did not run keep their places."""
    seen = [min((rec.first_call.get(n, 1 << 30) for n, _ in ms), default=1 << 30) for ms in table.members]
    ran = [i for i in range(len(table)) if seen[i] < 1 << 30]
    order = list(range(len(table)))
    for slot, i in zip(ran, sorted(ran, key=lambda i: (seen[i], i))):
        order[slot] = i
    return order


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (past freezert's and torch.nn's frames)."""
    import os
    import sys

    skip = (os.path.dirname(__file__), os.path.dirname(nn.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level
