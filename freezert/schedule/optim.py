"""Optimizer surgery: frozen parameters leave the param groups (state purged), thawed ones come back, layouts.

Parameter identity is never changed (EMA copies hold references). Parameters leave their group in place (groups
are never deleted, so indices do not shift) and return as a new group with the hyperparameters of the group they
left. A layout is an optimizer's param groups by parameter name, for checkpoints that resume into new objects.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .._errors import FreezeError

__all__ = [
    "as_optimizers",
    "optimizer_layout",
    "param_names",
    "remove_params",
    "removed_params",
    "restore_layout",
    "restore_params",
    "same_optimizer",
    "sibling_homes",
]

# Registry (the one place freezert keeps per-optimizer memory): per optimizer, the parameters freezert took out,
# with the index of the group each came from, so a thawed parameter returns with that group's hyperparameters.
# A registry rather than an attribute: the optimizer is the user's (or accelerate's wrapper of it), and weak keys
# keep nothing alive.
_REMOVED: weakref.WeakKeyDictionary[Optimizer, dict[int, tuple[nn.Parameter, int]]] = weakref.WeakKeyDictionary()


def as_optimizers(optimizer: Any) -> list[Optimizer]:
    """``optimizer`` as a list: None, one optimizer, a sequence of them, or a dict of them (its values)."""
    if optimizer is None:
        return []
    if isinstance(optimizer, Optimizer) or hasattr(optimizer, "param_groups"):
        return [optimizer]
    if isinstance(optimizer, dict):
        return list(optimizer.values())
    if isinstance(optimizer, Sequence):
        return list(optimizer)
    raise FreezeError(
        f"optimizer={type(optimizer).__name__} is not an optimizer; "
        "pass a torch.optim.Optimizer, a list of them, or None"
    )


def same_optimizer(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one optimizer, looking through wrappers that hold it (accelerate's)."""
    if a is None or b is None:
        return False
    return a is b or getattr(a, "optimizer", None) is b or getattr(b, "optimizer", None) is a


def removed_params(opt: Optimizer) -> dict[int, tuple[nn.Parameter, int]]:
    """The parameters freezert took out of ``opt`` and still holds out, each with the group it left."""
    return dict(_REMOVED.get(opt, {}))


def remove_params(optimizers: list[Optimizer], params: dict[int, nn.Parameter]) -> None:
    """Takes ``params`` (by id) out of every param group and purges their optimizer state; empty groups stay."""
    if not params:
        return
    for opt in optimizers:
        removed = _REMOVED.setdefault(opt, {})
        for gi, group in enumerate(opt.param_groups):
            keep = []
            for p in group["params"]:
                if id(p) in params:
                    removed.setdefault(id(p), (p, gi))
                else:
                    keep.append(p)
            if len(keep) != len(group["params"]):
                group["params"] = keep
        for p in params.values():
            opt.state.pop(p, None)  # composer#1002: stale state for parameters no longer in any group


def _copy_hparams(group: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}


def restore_params(
    optimizers: list[Optimizer], params: list[nn.Parameter], lr: float | None, homes: dict | None = None
) -> None:
    """Returns ``params`` to the optimizer they left, one new group per origin group, learning rate ``lr``.

    A parameter that was never in an optimizer goes to ``homes[id(p)]`` (optimizer, group), else group 0.
    """
    if not params or not optimizers:
        return
    present = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    buckets: dict[tuple[int, int], list[nn.Parameter]] = {}
    for p in params:
        if id(p) in present:
            continue
        home = (homes or {}).get(id(p), (0, 0))
        for oi, opt in enumerate(optimizers):
            rec = _REMOVED.get(opt, {})
            if id(p) in rec:
                home = (oi, rec.pop(id(p))[1])
                break
        buckets.setdefault(home, []).append(p)
    for (oi, gi), ps in buckets.items():
        opt = optimizers[oi]
        hp = _copy_hparams(opt.param_groups[gi]) if gi < len(opt.param_groups) else {}
        if lr is not None:
            old = hp.get("lr")
            hp["lr"] = torch.tensor(lr, dtype=old.dtype, device=old.device) if isinstance(old, torch.Tensor) else lr
            if "initial_lr" in hp:  # LR schedulers read it as the group's base learning rate
                hp["initial_lr"] = lr
        opt.add_param_group({"params": ps, **hp})


def sibling_homes(target: nn.Module, optimizers: list[Optimizer], params: list[nn.Parameter]) -> dict:
    """For parameters never in an optimizer: the group holding one of the same kind (module type, attribute).

    Trainers group by such rules (transformers: no weight decay on biases and LayerNorm weights), so a thawed
    LayerNorm weight joins the no-decay group's hyperparameters rather than group 0's.
    """
    kind: dict[int, tuple] = {}
    for m in target.modules():
        for name, p in m.named_parameters(recurse=False):
            kind.setdefault(id(p), (type(m), name))
    where: dict[tuple, tuple[int, int]] = {}
    for oi, opt in enumerate(optimizers):
        for gi, g in enumerate(opt.param_groups):
            for p in g["params"]:
                if id(p) in kind:
                    where.setdefault(kind[id(p)], (oi, gi))
    return {id(p): where[kind[id(p)]] for p in params if kind.get(id(p)) in where}


# ---------------------------------------------------------------------------------------------------------
# layouts (for checkpoints)


def param_names(target: nn.Module) -> dict[int, str]:
    """Each parameter's first name in ``target`` (by id): what a layout calls it."""
    names: dict[int, str] = {}
    for name, p in target.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    return names


def optimizer_layout(opt: Optimizer, names: dict[int, str]) -> dict:
    """``opt``'s param groups by parameter name (``names``: ``param_names``), hyperparameters and held-out set."""
    unnamed = 0
    groups = []
    for g in opt.param_groups:
        ps = []
        for p in g["params"]:
            if id(p) in names:
                ps.append(names[id(p)])
            else:  # not a parameter of the target (e.g. a loss module's); matched by position on load
                ps.append(f"<unnamed:{unnamed}>")
                unnamed += 1
        groups.append({"params": ps, "hparams": _copy_hparams(g)})
    removed = [[names[k], gi] for k, (p, gi) in _REMOVED.get(opt, {}).items() if k in names]
    return {"groups": groups, "removed": removed}


def restore_layout(opt: Optimizer, layout: dict, by_name: dict[str, nn.Parameter]) -> None:
    """Rebuilds ``opt``'s param groups as ``layout`` (from ``optimizer_layout``) names them; before its state loads."""
    named = {id(p) for p in by_name.values()}
    unnamed = [p for g in opt.param_groups for p in g["params"] if id(p) not in named]
    table = dict(by_name)
    table.update({f"<unnamed:{i}>": p for i, p in enumerate(unnamed)})
    rebuilt = []
    for gi, g in enumerate(layout["groups"]):
        missing = [n for n in g["params"] if n not in table]
        if missing:
            raise FreezeError(
                f"checkpoint param group {gi} names parameter {missing[0]!r}, which this model does not have; "
                "resume into the same architecture"
            )
        rebuilt.append({"params": [table[n] for n in g["params"]], **_copy_hparams(g["hparams"])})
    placed = {id(p) for g in rebuilt for p in g["params"]}
    stray = [p for g in opt.param_groups for p in g["params"] if id(p) not in placed and p.requires_grad]
    if stray:
        raise FreezeError(
            f"the optimizer holds {len(stray)} trainable parameter(s) the checkpoint's param groups do not; "
            "build the optimizer over the same parameters as the run that saved it"
        )
    for gi, g in enumerate(rebuilt):
        if gi < len(opt.param_groups):
            opt.param_groups[gi].clear()
            opt.param_groups[gi].update(g)
        else:
            opt.param_groups.append(g)
    del opt.param_groups[len(rebuilt) :]
    rec = _REMOVED.setdefault(opt, {})
    rec.clear()
    for name, gi in layout["removed"]:
        if name in by_name:
            p = by_name[name]
            rec[id(p)] = (p, gi)
