"""A wrapped model's block table and plan as text (what runs as inference, eagerly, or trains): what
``freezert.inspect`` and ``FrozenModel.inspect`` print."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .wrapper import FrozenModel


def describe(fm: FrozenModel) -> str:
    plan, model = fm._plan, fm.model
    t, part = plan.table, plan.part
    planned = plan.driven or plan.sig is not None
    where = f"at {t.path!r}" if t.path else "at the root"
    lines = [f"{type(model).__name__}: {len(t)} blocks {where} ({t.kind})"]
    lines.append(f"{'idx':>4}  {'name':<32} {'type':<22} {'params':>12}  state")

    def row(idx, name, m, state, kind=None):
        n = sum(p.numel() for p in m.parameters())
        lines.append(f"{idx:>4}  {name:<32} {(kind or type(m).__name__)[:22]:<22} {n:>12,}  {state}")

    def cut():
        b = ", ".join(map(str, fm.boundary)) or "none"
        inference = [j for j in range(k) if j not in part.eager]
        if len(inference) == k:
            lines.append(f"{'':>4}  ---- cut: blocks 0..{k - 1} run as the inference segment; boundary: {b} ----")
        else:
            lines.append(
                f"{'':>4}  ---- cut: blocks 0..{k - 1} frozen; {len(inference)} run as inference, "
                f"{k - len(inference)} eagerly; cached boundary: {b} ----"
            )

    fs = set(part.frozen)
    for name, m in t.stem:
        row("stem", name, m, "frozen with block 0 (inference)" if 0 in fs else "train (runs before block 0)")
    k = part.k
    for i, (name, m) in enumerate(zip(t.names, t.modules)):
        if k and i == k:
            cut()
        if i not in fs:
            state = "train"
        elif i in part.eager:
            state = f"frozen (eager: {part.eager[i]})"
        elif i >= k:
            state = "frozen (eager: after a trainable block)"
        else:
            state = "frozen (inference)"
        members = t.members[i]
        row(i, name, m, state, "+".join(n for n, _ in members) if len(members) > 1 else None)
    if k and k == len(t):  # every block frozen: the cut falls after the last one (a linear probe)
        cut()
    stem = {n for n, _ in t.stem}
    for name, m in t.candidates:
        if name not in stem:
            row("head" if planned else "?", name, m, "train" if planned else "stem or head: the first forward decides")
    direct = list(t.direct_parameters(model))
    if direct:
        shown = ", ".join(f"{n} ({'train' if p.requires_grad else 'frozen'})" for n, p in direct)
        lines.append(f"parameters outside every module: {shown}")
    total = sum(p.numel() for p in model.parameters())
    fz = sum(p.numel() for p in fm.frozen_parameters())
    lines.append(f"frozen {fz:,} of {total:,} parameters ({100 * fz / max(total, 1):.1f}%)")
    if not planned and fs:
        lines.append(
            "not recorded yet: pass example_inputs= (or call fm.plan(...)) to see the stem, head and eager blocks"
        )
    return "\n".join(lines)
