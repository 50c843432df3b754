"""Freezing schedules (Composer-compatible linear, FreezeOut, gradient-norm, unfreezing) and optimizer surgery.

A schedule only *decides* a frozen set of blocks from training progress (and, for ``GradientNorm``, from the
gradient norms it observes); ``apply_freeze`` carries a decision out: it freezes the blocks (through
``FrozenModel.set_freeze`` when the target has one, else by ``requires_grad``), takes frozen parameters out of
the optimizer's param groups and purges their optimizer state, and gives unfrozen parameters back as a new
param group with their own learning rate. Parameter identity is never changed (EMA copies hold references).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._errors import FreezeError
from .blocks import as_named_blocks
from .monitor import block_grad_norms

__all__ = [
    "FreezeChange",
    "FreezeOut",
    "GradientNorm",
    "Linear",
    "Schedule",
    "Unfreeze",
    "apply_freeze",
    "freeze_layers",
    "freeze_layers_state_dict",
    "linear_fraction",
    "load_freeze_layers_state_dict",
    "rebuild_ddp",
    "record_forward_order",
]

_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# validation


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise FreezeError(f"{name}={value!r} is outside [0, 1]; pass a fraction between 0 and 1")
    return float(value)


def _check_progress(progress: Any) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not (0.0 <= progress <= 1.0):
        raise FreezeError(
            f"progress={progress!r} is outside [0, 1]; pass the fraction of training done, e.g. step / total_steps"
        )
    return float(progress)


# ---------------------------------------------------------------------------------------------------------
# Composer's functional form


def linear_fraction(current_duration: float, freeze_start: float = 0.5, freeze_level: float = 1.0) -> float:
    """Composer's linear schedule: 0 until ``freeze_start``, then rising linearly to ``freeze_level`` at 1."""
    current_duration = _check_fraction("current_duration", current_duration)
    freeze_start = _check_fraction("freeze_start", freeze_start)
    freeze_level = _check_fraction("freeze_level", freeze_level)
    if current_duration <= freeze_start:
        return 0.0
    # Same operations in the same order as Composer, so the floats agree bit for bit.
    elapsed = current_duration - freeze_start
    total = 1.0 - freeze_start
    return freeze_level * (elapsed / total)


def _leaf_param_layers(model: nn.Module) -> list[nn.Module]:
    """Composer's layers: modules without children that own parameters, depth-first in registration order."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen:  # a module registered twice is one layer (Composer would count it twice)
            return
        seen.add(id(m))
        kids = list(m.children())
        if not kids:
            if next(m.parameters(), None) is not None:
                out.append(m)
            return
        for k in kids:
            visit(k)

    visit(model)
    return out


class _UseRecorder(TorchFunctionMode):
    """Sees every torch function call of one forward and reports the tensors it reads (parameters included).

    Module hooks miss parameters used without their module's ``forward``: ``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly (issue 9), so a hook-based order put ``out_proj`` last.
    """

    def __init__(self, see: Callable[[Any], None]):
        super().__init__()
        self._see = see

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf)
        return func(*args, **kwargs)


class _OrderRecorder:
    """Orders layers by the first use of their parameters (or first call) in one forward of the root.

    It holds no reference to the root module, so the weak per-model registry below does not keep models alive.
    ``on_done`` callbacks run once the order is known.
    """

    def __init__(self, root: nn.Module, layers: list[nn.Module]):
        self._layers = list(layers)
        self._owner: dict[int, int] = {}
        for i, m in enumerate(self._layers):
            for p in m.parameters():
                self._owner.setdefault(id(p), i)  # a shared parameter belongs to the first layer that owns it
        self._seen: list[int] = []
        self._seen_set: set[int] = set()
        self._depth = 0
        self._mode: _UseRecorder | None = None
        self.order: list[nn.Module] | None = None
        self.on_done: list[Callable[[], None]] = []
        self._handles = [m.register_forward_pre_hook(self._layer_called) for m in self._layers]
        self._idx = {id(m): i for i, m in enumerate(self._layers)}
        self._handles.append(root.register_forward_pre_hook(self._start))
        self._handles.append(root.register_forward_hook(self._done, always_call=True))

    def _mark(self, i: int) -> None:
        if i not in self._seen_set:
            self._seen_set.add(i)
            self._seen.append(i)

    def _layer_called(self, module: nn.Module, args: Any) -> None:
        self._mark(self._idx[id(module)])

    def _tensor_used(self, t: torch.Tensor) -> None:
        i = self._owner.get(id(t))
        if i is not None:
            self._mark(i)

    def _start(self, module: nn.Module, args: Any) -> None:
        self._depth += 1
        if self._depth == 1 and self.order is None:
            self._mode = _UseRecorder(self._tensor_used)
            self._mode.__enter__()

    def _done(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth > 0 or self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        # Layers that did not run keep their registration order, after the ones that did.
        self._set_order(self._seen + [i for i in range(len(self._layers)) if i not in self._seen_set])

    def _set_order(self, idx: list[int]) -> None:
        self.order = [self._layers[i] for i in idx]
        for h in self._handles:
            h.remove()
        self._handles, self._seen, self._seen_set = [], [], set()
        done, self.on_done = self.on_done, []
        for fn in done:
            fn()


@dataclass
class _FunctionalState:
    recorder: _OrderRecorder
    registration: list[nn.Module]
    frozen_ids: set[int]
    depth: int = 0
    pending: list[Optimizer] | None = None  # a freeze decided before the order was known

    def layers(self) -> list[nn.Module]:
        return self.recorder.order if self.recorder.order is not None else self.registration

    def apply(self, optimizers: list[Optimizer]) -> None:
        """Freezes the first ``depth`` layers in forward order (never the last) and fixes the optimizers."""
        layers = self.layers()
        for layer in layers[: min(self.depth, max(len(layers) - 1, 0))]:
            self.frozen_ids.add(id(layer))
        params: dict[int, nn.Parameter] = {}
        for layer in layers[:-1]:
            if id(layer) in self.frozen_ids:
                for p in layer.parameters():
                    params[id(p)] = p
        _remove_params(optimizers, params)
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None

    def apply_pending(self) -> None:
        if self.pending is not None:
            opts, self.pending = self.pending, None
            self.apply(opts)


_FUNCTIONAL: weakref.WeakKeyDictionary[nn.Module, _FunctionalState] = weakref.WeakKeyDictionary()


def _functional_state(model: nn.Module) -> _FunctionalState:
    st = _FUNCTIONAL.get(model)
    if st is None:
        layers = _leaf_param_layers(model)
        st = _FUNCTIONAL[model] = _FunctionalState(_OrderRecorder(model, layers), layers, set())
        st.recorder.on_done.append(st.apply_pending)
    return st


def record_forward_order(model: nn.Module) -> None:
    """Watches the next forward pass of ``model`` to order its layers by first use (done once per model).

    ``freeze_layers`` calls this itself on first use; a first call that already freezes something before any
    forward was seen applies its freeze at the end of the next forward, in forward order.
    """
    _functional_state(model)


def freeze_layers(
    model: nn.Module,
    optimizers: Optimizer | Sequence[Optimizer] | None,
    current_duration: float,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
) -> tuple[int, float]:
    """Drop-in for Composer's ``freeze_layers``: freezes the first ``int(pct * (num_layers - 1))`` layers.

    Layers are Composer's (modules without children that own parameters); unlike Composer they are ordered by
    forward execution (the first use of each layer's parameters in one recorded forward), frozen parameters
    leave the optimizers *and* their optimizer state is purged (composer#1002), and the frozen set never
    shrinks. Returns ``(freeze_depth, freeze_percentage)`` like Composer. Checkpoint the functional state with
    ``freeze_layers_state_dict``.
    """
    freeze_percentage = linear_fraction(current_duration, freeze_start, freeze_level)
    st = _functional_state(model)
    depth = max(int(freeze_percentage * len(st.registration[0:-1])), st.depth)  # the last layer is never frozen
    st.depth = depth
    opts = _as_optimizers(optimizers)
    if st.recorder.order is None and depth > 0:
        # No forward seen yet: registration order would freeze the wrong layers (a head registered first).
        # The freeze lands at the end of the next forward, in forward order; its gradients never reach an
        # optimizer because the parameters leave the optimizers then, before any step.
        st.pending = opts
    else:
        st.apply(opts)
    return depth, freeze_percentage


def freeze_layers_state_dict(model: nn.Module) -> dict:
    """The functional form's memory for ``model`` (forward order by layer name, depth) for a checkpoint."""
    st = _functional_state(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    order = None if st.recorder.order is None else [names[id(m)] for m in st.recorder.order]
    return {"version": _STATE_VERSION, "kind": "freeze_layers", "order": order, "depth": st.depth}


def load_freeze_layers_state_dict(
    model: nn.Module, state: dict, optimizers: Optimizer | Sequence[Optimizer] | None = None
) -> None:
    """Restores ``freeze_layers_state_dict`` into ``model`` (a new object after resuming) and re-applies it.

    Call it before ``optimizer.load_state_dict``: frozen parameters leave ``optimizers`` as they had when saved.
    """
    if not isinstance(state, dict) or state.get("kind") != "freeze_layers" or state.get("version") != _STATE_VERSION:
        raise FreezeError(
            f"freeze_layers state {state!r:.80} is not understood; pass what freeze_layers_state_dict() returned"
        )
    st = _functional_state(model)
    if state["order"] is not None:
        by_name = dict(model.named_modules(remove_duplicate=False))
        missing = [n for n in state["order"] if n not in by_name]
        if missing:
            raise FreezeError(
                f"the checkpoint's freeze_layers order names layer {missing[0]!r}, which this model does not have; "
                "resume into the same architecture"
            )
        idx = {id(m): i for i, m in enumerate(st.recorder._layers)}
        st.recorder._set_order([idx[id(by_name[n])] for n in state["order"]])
    st.depth = max(st.depth, int(state["depth"]))
    opts = _as_optimizers(optimizers)
    if st.recorder.order is None and st.depth > 0:
        st.pending = opts
    else:
        st.apply(opts)


# ---------------------------------------------------------------------------------------------------------
# optimizer surgery

# Per optimizer: parameters freezert took out, with the index of the group they came from (groups are never
# deleted, so the index stays valid and an unfrozen parameter returns with that group's hyperparameters).
_REMOVED: weakref.WeakKeyDictionary[Optimizer, dict[int, tuple[nn.Parameter, int]]] = weakref.WeakKeyDictionary()
# Frozen block indices of plain modules (a FrozenModel reports its own through ``frozen_indices``).
_PLAIN_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]] = weakref.WeakKeyDictionary()


def _as_optimizers(optimizer: Any) -> list[Optimizer]:
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


def _same_optimizer(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one optimizer, looking through wrappers that hold it (accelerate's)."""
    if a is None or b is None:
        return False
    return a is b or getattr(a, "optimizer", None) is b or getattr(b, "optimizer", None) is a


def _remove_params(optimizers: list[Optimizer], params: dict[int, nn.Parameter]) -> None:
    """Takes ``params`` out of every param group and purges their optimizer state; empty groups stay."""
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


def _restore_params(
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


def _sibling_homes(target: nn.Module, optimizers: list[Optimizer], params: list[nn.Parameter]) -> dict:
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


def _unique_params(modules: list[nn.Module]) -> dict[int, nn.Parameter]:
    out: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            out.setdefault(id(p), p)
    return out


def _resolve_blocks(target: Any, blocks: Any = None) -> list[tuple[str, nn.Module]]:
    if blocks is None:
        if hasattr(target, "set_freeze") and hasattr(target, "blocks"):  # a FrozenModel knows its blocks
            blocks = target.blocks
        else:
            try:
                from .blocks import find_blocks
            except ImportError:  # core not importable: top-level children, in registration order
                blocks = list(target.named_children())
            else:
                blocks = find_blocks(target)
    return as_named_blocks(blocks, "the model has no blocks to freeze; pass blocks=[...] explicitly")


def _frozen_of(target: Any) -> tuple[int, ...]:
    if hasattr(target, "set_freeze") and hasattr(target, "frozen_indices"):
        return tuple(target.frozen_indices)
    return _PLAIN_FROZEN.get(target, ())


def _block_param_sets(
    blocks: list[tuple[str, nn.Module]], frozen: tuple[int, ...], train_bn: bool = False
) -> dict[int, nn.Parameter]:
    """Parameters of the frozen blocks that no trainable block shares (tied weights keep training).

    With ``train_bn`` the BatchNorms' own parameters keep training too (Lightning's ``train_bn=True``).
    """
    fz = set(frozen)
    trainable = _unique_params([m for i, (_, m) in enumerate(blocks) if i not in fz])
    if train_bn:
        trainable.update(_unique_params([b for i in fz for b in _bns(blocks[i][1])]))
    return {k: p for k, p in _unique_params([blocks[i][1] for i in sorted(fz)]).items() if k not in trainable}


def _bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


# BatchNorms that a schedule froze in a plain module, with the hook that keeps them in eval mode: the
# trainer's model.train() at every epoch start would otherwise switch them back (pytorch#66073).
_FROZEN_BN: weakref.WeakKeyDictionary[_BatchNorm, Any] = weakref.WeakKeyDictionary()


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def _fix_bn(bn: _BatchNorm) -> None:
    """Puts a frozen block's BatchNorm in eval mode and keeps it there through later ``.train()`` calls."""
    if bn not in _FROZEN_BN:
        _FROZEN_BN[bn] = bn.register_forward_pre_hook(_keep_eval)
    bn.eval()


def _release_bn(bn: _BatchNorm, training: bool) -> None:
    """Undoes ``_fix_bn``: the BatchNorm follows ``training`` (its model's mode) again."""
    hook = _FROZEN_BN.pop(bn, None)
    if hook is not None:
        hook.remove()
        bn.train(training)


def _set_frozen_bns(target: nn.Module, blocks: list[tuple[str, nn.Module]], frozen: tuple[int, ...], train_bn: bool):
    """Frozen blocks' BatchNorms stop updating running statistics (eval mode) unless ``train_bn``."""
    want: dict[int, _BatchNorm] = {} if train_bn else {id(b): b for i in frozen for b in _bns(blocks[i][1])}
    mine = {id(b) for _, m in blocks for b in _bns(m)}
    for bn in [b for b in list(_FROZEN_BN.keys()) if id(b) in mine and id(b) not in want]:
        _release_bn(bn, target.training)
    for bn in want.values():
        _fix_bn(bn)


def _frozen_now(target: Any, blocks: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    """The frozen set a schedule finds at attach: freezert's, plus blocks frozen by hand in a plain module."""
    if hasattr(target, "set_freeze"):
        return _frozen_of(target)
    return tuple(sorted(set(_frozen_of(target)) | set(_hand_frozen(blocks))))


def _hand_frozen(blocks: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    """Blocks whose parameters all have requires_grad=False (frozen by hand, outside freezert)."""
    out = []
    for i, (_, m) in enumerate(blocks):
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            out.append(i)
    return tuple(out)


@dataclass(frozen=True)
class FreezeChange:
    """What one ``apply_freeze`` changed: block indices newly frozen and newly unfrozen (truthy if any)."""

    frozen: tuple[int, ...] = ()
    unfrozen: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.frozen or self.unfrozen)


def apply_freeze(
    target: nn.Module,
    optimizer: Optimizer | Sequence[Optimizer] | None,
    indices: Sequence[int],
    *,
    blocks: Sequence[Any] | None = None,
    lr: float | None = None,
    train_bn: bool = False,
) -> FreezeChange:
    """Makes exactly ``indices`` the frozen blocks of ``target`` and fixes the optimizer(s) to match.

    ``target`` is a ``FrozenModel`` (its ``set_freeze`` rebuilds the frozen segment) or a plain module whose
    blocks are ``blocks`` (default: ``find_blocks``). Frozen parameters leave every param group and their
    optimizer state is purged; parameters that become trainable again return as a new param group (one per
    group they came from, hyperparameters copied from it) with learning rate ``lr`` (default: that group's).
    In a plain module, frozen blocks' BatchNorms run in eval mode (running statistics fixed) unless ``train_bn``,
    which keeps their parameters training too; blocks frozen by hand count as frozen, so ``indices=[]`` thaws them.
    """
    blk = _resolve_blocks(target, blocks)
    n = len(blk)
    want: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise FreezeError(f"block index {i!r} is outside 0..{n - 1}; the model has {n} blocks")
        want.append(i)
    new = tuple(sorted(set(want)))
    if len(new) >= n:
        raise FreezeError(f"freezing all {n} blocks leaves nothing to train; freeze at most {n - 1}")
    fm = hasattr(target, "set_freeze")
    prev = _frozen_of(target)
    if not fm:
        prev = tuple(sorted(set(prev) | set(_hand_frozen(blk))))
    opts = _as_optimizers(optimizer)
    if fm and hasattr(target, "frozen_parameters"):  # includes the stem frozen together with block 0
        was_frozen = {id(p): p for p in target.frozen_parameters()}
    else:
        was_frozen = _block_param_sets(blk, prev, train_bn)
    if fm:
        target.set_freeze(list(new) or None)
        if hasattr(target, "frozen_parameters"):
            now_frozen = {id(p): p for p in target.frozen_parameters()}
        else:
            now_frozen = _block_param_sets(blk, new)
    else:
        now_frozen = _block_param_sets(blk, new, train_bn)
        for p in now_frozen.values():
            p.requires_grad_(False)
        _PLAIN_FROZEN[target] = new
        _set_frozen_bns(target, blk, new, train_bn)
    for p in now_frozen.values():
        p.grad = None
    # Always remove the whole frozen set (idempotent): a fresh optimizer after resume may still hold it.
    _remove_params(opts, now_frozen)
    back = [p for k, p in was_frozen.items() if k not in now_frozen]
    # Parameters of this model that freezert removed earlier and that are not frozen now come back too.
    seen = {id(p) for p in back}
    mine = {id(p) for p in target.parameters()}
    for opt in opts:
        for k, (p, _) in list(_REMOVED.get(opt, {}).items()):
            if k in mine and k not in now_frozen and k not in seen:
                back.append(p)
                seen.add(k)
    if not fm:
        for p in back:
            p.requires_grad_(True)
    else:  # the wrapper restored requires_grad; a parameter the user had frozen stays out
        back = [p for p in back if p.requires_grad]
    _restore_params(opts, back, lr, _sibling_homes(target, opts, back))
    return FreezeChange(frozen=tuple(i for i in new if i not in prev), unfrozen=tuple(i for i in prev if i not in new))


# ---------------------------------------------------------------------------------------------------------
# optimizer layout (for checkpoints)


def _param_names(target: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in target.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    return names


def _layout(opt: Optimizer, names: dict[int, str]) -> dict:
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


def _restore_layout(opt: Optimizer, layout: dict, by_name: dict[str, nn.Parameter]) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# schedules


class Schedule:
    """Base class: decides the frozen blocks from progress in [0, 1]; ``attach``-ed, it also applies them.

    Plain loop::

        sched = Linear(0.5, 1.0).attach(model, optimizer, blocks=blocks)
        for step in range(total):
            loss = ...; loss.backward()
            sched.after_backward()          # only GradientNorm reads gradients
            optimizer.step(); optimizer.zero_grad()
            sched.step((step + 1) / total)  # applies a new frozen set when the decision changes
    """

    #: Monotone schedules keep whatever was frozen when they were attached (e.g. ``wrap(model, freeze=4)``).
    _keeps_initial = True
    #: Whether ``after_backward`` must compute per-block gradient norms.
    needs_grad_norms = False

    def __init__(self) -> None:
        self._target: nn.Module | None = None
        self._blocks: list[tuple[str, nn.Module]] | None = None
        self._optimizers: list[Optimizer] = []
        self._initial: tuple[int, ...] = ()
        self._current: tuple[int, ...] = ()
        self._pending: dict | None = None
        self._lr_schedulers: list[Any] = []
        self.train_bn = False

    # -- decision (pure apart from the schedule's own memory) ---------------------------------------------
    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        """Sorted block indices to freeze at ``progress`` for a model of ``n_blocks`` blocks."""
        raise NotImplementedError

    def observe(self, grad_norms: Sequence[float | None]) -> None:
        """Per-block gradient L2 norms of one step (None for frozen blocks); ignored by most schedules."""

    def unfreeze_lr(self) -> float | None:
        """Learning rate for parameters returned to training now (None: that of the group they left)."""
        return None

    def _decision_state(self) -> dict:
        return {}

    def _load_decision_state(self, state: dict) -> None:
        pass

    # -- binding and application ----------------------------------------------------------------------------
    def attach(
        self,
        target: nn.Module | None = None,
        optimizer: Optimizer | Sequence[Optimizer] | None = None,
        *,
        blocks: Sequence[Any] | None = None,
        lr_schedulers: Any = None,
        train_bn: bool | None = None,
    ) -> Schedule:
        """Binds the schedule to a model (FrozenModel or plain module + ``blocks``) and optimizer(s); returns self.

        Call again with only ``optimizer=`` to bind an optimizer created later (after wrapping, or a new fit's):
        the frozen set leaves it. ``train_bn=True`` keeps frozen blocks' BatchNorms training (plain modules). LR
        schedulers passed as ``lr_schedulers`` learn about param groups added by unfreezing (their
        ``base_lrs`` grow); without that, torch's schedulers leave a new group's learning rate untouched.
        """
        if lr_schedulers is not None:
            self._lr_schedulers = list(lr_schedulers) if isinstance(lr_schedulers, (list, tuple)) else [lr_schedulers]
        if train_bn is not None:
            self.train_bn = bool(train_bn)
        rebind = target is None and optimizer is not None
        if target is not None:
            self._target = target
            self._blocks = _resolve_blocks(target, blocks)
            self._current = _frozen_now(target, self._blocks)
            self._initial = self._initial_from(target)
        if optimizer is not None:
            self._optimizers = _as_optimizers(optimizer)
        if self._target is None:
            raise FreezeError("attach() needs a model the first time; pass attach(model, optimizer)")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)
        elif rebind and self._current:
            # A new optimizer (a new fit, a rebuilt trainer): the frozen set leaves it too.
            self._apply(self._current)
        elif self._initial:
            # Frozen parameters leave the optimizer from the start (the user may have passed them all).
            self._apply(self._current if self._keeps_initial else self._initial)
        return self

    def _initial_from(self, target: nn.Module) -> tuple[int, ...]:
        return _frozen_now(target, self._blocks or [])

    @property
    def frozen(self) -> list[int]:
        """Block indices frozen now by this schedule."""
        return list(self._current)

    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks this schedule counts (after ``attach``)."""
        self._require_attached()
        return list(self._blocks or [])

    def _require_attached(self) -> None:
        if self._target is None:
            raise FreezeError(
                f"this {type(self).__name__} schedule is not attached; call .attach(model, optimizer) first "
                "(or use .frozen_blocks(progress, n_blocks) for the decision alone)"
            )

    def _apply(self, indices: Sequence[int], lr: float | None = None) -> FreezeChange:
        counts = [len(o.param_groups) for o in self._optimizers]
        change = apply_freeze(
            self._target, self._optimizers, indices, blocks=self._blocks, lr=lr, train_bn=self.train_bn
        )
        self._current = tuple(sorted(set(indices)))
        for opt, n in zip(self._optimizers, counts):
            for sch in self._lr_schedulers:
                if _same_optimizer(getattr(sch, "optimizer", None), opt) and isinstance(
                    getattr(sch, "base_lrs", None), list
                ):
                    for g in opt.param_groups[n:]:
                        g.setdefault("initial_lr", g["lr"])
                        sch.base_lrs.append(g["initial_lr"])
                        if isinstance(getattr(sch, "_last_lr", None), list):
                            sch._last_lr.append(g["lr"])
                        lambdas = getattr(sch, "lr_lambdas", None)  # LambdaLR, MultiplicativeLR: one per group
                        if isinstance(lambdas, list) and lambdas:
                            lambdas.append(lambdas[0])
        return change

    def step(self, progress: float) -> FreezeChange:
        """Applies the frozen set for ``progress``; the returned change is truthy when the set changed.

        Under DistributedDataParallel, rebuild the DDP wrapper when it is truthy (``rebuild_ddp``).
        """
        self._require_attached()
        progress = _check_progress(progress)
        assert self._blocks is not None
        want = set(self.frozen_blocks(progress, len(self._blocks)))
        if self._keeps_initial:
            want |= set(self._initial)
        new = tuple(sorted(want))
        if new == self._current:
            return FreezeChange()
        return self._apply(new, lr=self.unfreeze_lr())

    def after_backward(self) -> None:
        """Feeds the per-block gradient norms of this step to schedules that use them (GradientNorm)."""
        if self.needs_grad_norms:
            self._require_attached()
            assert self._blocks is not None
            self.observe(block_grad_norms(self._blocks))

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Schedule memory, the frozen set and (attached) each optimizer's param-group layout by parameter name."""
        d: dict[str, Any] = {
            "version": _STATE_VERSION,
            "kind": type(self).__name__,
            "decision": self._decision_state(),
            "initial": list(self._initial),
            "frozen": list(self._current),
            "optimizers": None,
        }
        if self._target is not None and self._optimizers:
            names = _param_names(self._target)
            d["optimizers"] = [_layout(o, names) for o in self._optimizers]
        return d

    def load_state_dict(self, state: dict) -> None:
        """Restores the schedule and, attached, re-applies the frozen set and rebuilds the optimizer's groups.

        Call it *before* ``optimizer.load_state_dict``: the optimizer's groups then have the saved layout.
        Unattached, the state is kept and applied at ``attach``.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise FreezeError(
                f"schedule state version {state.get('version') if isinstance(state, dict) else state!r} is not "
                f"understood; this freezert reads version {_STATE_VERSION}"
            )
        if state.get("kind") != type(self).__name__:
            raise FreezeError(
                f"the checkpoint holds a {state.get('kind')} schedule's state, not a {type(self).__name__}'s; "
                "resume with the same schedule class"
            )
        self._load_decision_state(state["decision"])
        self._initial = tuple(state["initial"])
        if self._target is None:
            self._pending = state
            return
        frozen = tuple(state["frozen"])
        apply_freeze(self._target, self._optimizers, frozen, blocks=self._blocks, train_bn=self.train_bn)
        self._current = frozen
        layouts = state.get("optimizers")
        if layouts is not None and self._optimizers:
            if len(layouts) != len(self._optimizers):
                raise FreezeError(
                    f"the checkpoint has {len(layouts)} optimizer layout(s) but {len(self._optimizers)} optimizer(s) "
                    "are attached; attach the same optimizers as the run that saved it"
                )
            by_name = {n: p for n, p in self._target.named_parameters(remove_duplicate=True)}
            for opt, lay in zip(self._optimizers, layouts):
                _restore_layout(opt, lay, by_name)
        elif layouts is not None:
            self._pending = state  # no optimizer yet: finish when one is attached


class Linear(Schedule):
    """Composer's linear schedule on blocks: depth ``int(pct * (n_blocks - 1))``, only ever growing.

    ``pct`` is 0 until ``freeze_start``, then rises linearly to ``freeze_level`` at the end of training.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0):
        super().__init__()
        self.freeze_start = _check_fraction("freeze_start", freeze_start)
        self.freeze_level = _check_fraction("freeze_level", freeze_level)
        self._depth = 0

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        pct = linear_fraction(_check_progress(progress), self.freeze_start, self.freeze_level)
        self._depth = max(self._depth, int(pct * max(n_blocks - 1, 0)))
        return list(range(min(self._depth, max(n_blocks - 1, 0))))

    def _decision_state(self) -> dict:
        return {"depth": self._depth}

    def _load_decision_state(self, state: dict) -> None:
        self._depth = int(state["depth"])

    def __repr__(self) -> str:
        return f"Linear(freeze_start={self.freeze_start}, freeze_level={self.freeze_level})"


_SCALES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "squared": lambda x: x * x,
    "cubic": lambda x: x * x * x,
}


class FreezeOut(Schedule):
    """FreezeOut (Brock et al., 2017): block ``i`` freezes once progress reaches its cut-off time ``t_i``.

    By default ``t_i = scale(t0 + (1 - t0) * i / (n - 1))`` with ``scale`` linear, squared or cubic, so the last
    block's time is 1 (it is never frozen); or pass ``times`` explicitly (one per block, or one per block but
    the last). ``lr_factor`` gives FreezeOut's per-block cosine annealing if you want to apply it.
    """

    def __init__(self, t0: float = 0.8, scale: str = "cubic", *, times: Sequence[float] | None = None):
        super().__init__()
        self.t0 = _check_fraction("t0", t0)
        if scale not in _SCALES:
            raise FreezeError(f"scale={scale!r} is not one of {sorted(_SCALES)}")
        self.scale = scale
        self.times = None if times is None else [_check_fraction(f"times[{i}]", t) for i, t in enumerate(times)]
        self._frozen: set[int] = set()

    def cutoffs(self, n_blocks: int) -> list[float]:
        """Cut-off time of each block (the last block's is ignored: it is never frozen)."""
        if self.times is not None:
            if len(self.times) not in (n_blocks, n_blocks - 1):
                raise FreezeError(
                    f"FreezeOut got {len(self.times)} cut-off times for a model of {n_blocks} blocks; "
                    f"pass {n_blocks - 1} or {n_blocks}"
                )
            return list(self.times) + ([1.0] if len(self.times) == n_blocks - 1 else [])
        f = _SCALES[self.scale]
        if n_blocks == 1:
            return [1.0]
        return [f(self.t0 + (1.0 - self.t0) * i / (n_blocks - 1)) for i in range(n_blocks)]

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = _check_progress(progress)
        t = self.cutoffs(n_blocks)
        self._frozen |= {i for i in range(n_blocks - 1) if progress >= t[i]}
        return sorted(i for i in self._frozen if i < n_blocks - 1)

    def lr_factor(self, block: int, progress: float, n_blocks: int) -> float:
        """FreezeOut's cosine annealing of block ``block``'s learning rate: 1 at 0, 0 at its cut-off."""
        t = self.cutoffs(n_blocks)[block]
        if t <= 0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * min(_check_progress(progress) / t, 1.0)))

    def _decision_state(self) -> dict:
        return {"frozen": sorted(self._frozen)}

    def _load_decision_state(self, state: dict) -> None:
        self._frozen = set(state["frozen"])

    def __repr__(self) -> str:
        return f"FreezeOut(t0={self.t0}, scale={self.scale!r}, times={self.times})"


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear interpolation) percentile, without numpy."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class GradientNorm(Schedule):
    """AutoFreeze's rule (Liu et al., 2021): freeze the prefix whose gradient-norm change rate fell behind.

    Training is split into ``intervals`` equal evaluation intervals. Over each, every trainable block's per-step
    gradient L2 norms are summed; at an interval's end the change rate is ``|prev - cur| / prev``. With ``thr``
    the ``percentile``-th percentile of the rates of the still-trainable blocks, the frozen prefix grows up to
    the first trainable block whose rate is ``>= thr``; the last block is never frozen. (AutoFreeze sums the
    gradient vectors and then takes their norm; summing per-step norms needs no parameter-sized buffer.)
    """

    needs_grad_norms = True

    def __init__(self, intervals: int = 10, percentile: float = 50.0):
        super().__init__()
        if isinstance(intervals, bool) or not isinstance(intervals, int) or intervals < 2:
            raise FreezeError(f"intervals={intervals!r} must be an integer >= 2 (AutoFreeze used 10 to 20)")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise FreezeError(f"percentile={percentile!r} is outside [0, 100]; AutoFreeze's default is 50")
        self.intervals = intervals
        self.percentile = float(percentile)
        self._depth = 0
        self._acc: list[float] | None = None
        self._count = 0
        self._prev: list[float] | None = None
        self._evaluated = 0
        self.rates: list[float | None] | None = None  # last evaluation's change rates, for inspection

    def observe(self, grad_norms: Sequence[float | None]) -> None:
        vals = [None if g is None else float(g) for g in grad_norms]
        if self._acc is None or len(self._acc) != len(vals):
            self._acc = [0.0] * len(vals)
        for i, g in enumerate(vals):
            if g is not None and math.isfinite(g):
                self._acc[i] += g
        self._count += 1

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = _check_progress(progress)
        boundary = min(int(progress * self.intervals + 1e-9), self.intervals)
        if boundary > self._evaluated and self._count > 0:
            self._evaluated = boundary
            self._evaluate(n_blocks)
        return list(range(min(self._depth, max(n_blocks - 1, 0))))

    def _evaluate(self, n_blocks: int) -> None:
        cur = list(self._acc or [0.0] * n_blocks)[:n_blocks]
        cur += [0.0] * (n_blocks - len(cur))
        self._acc, self._count = None, 0
        prev, self._prev = self._prev, cur
        if prev is None:
            return
        rates: list[float | None] = [None] * n_blocks
        for i in range(self._depth, n_blocks):
            if prev[i] > 0 and cur[i] > 0:  # zero: frozen or gradient-free this interval
                rates[i] = abs(prev[i] - cur[i]) / prev[i]
        self.rates = rates
        live = [r for r in rates if r is not None]
        if not live:
            return
        thr = _percentile(live, self.percentile)
        first = next(i for i, r in enumerate(rates) if r is not None and r >= thr)
        self._depth = max(self._depth, min(first, n_blocks - 1))

    def _decision_state(self) -> dict:
        return {
            "depth": self._depth,
            "acc": self._acc,
            "count": self._count,
            "prev": self._prev,
            "evaluated": self._evaluated,
        }

    def _load_decision_state(self, state: dict) -> None:
        self._depth = int(state["depth"])
        self._acc = None if state["acc"] is None else list(state["acc"])
        self._count = int(state["count"])
        self._prev = None if state["prev"] is None else list(state["prev"])
        self._evaluated = int(state["evaluated"])

    def __repr__(self) -> str:
        return f"GradientNorm(intervals={self.intervals}, percentile={self.percentile})"


class Unfreeze(Schedule):
    """Returns frozen blocks to training at progress ``at`` as a new param group with learning rate ``lr``.

    ``blocks`` says what is frozen before ``at``: an int (the first N blocks), a list of indices, another
    schedule (e.g. ``Linear``: progressive freezing, then everything trains again), or None (whatever is frozen
    when attached, e.g. by ``wrap(model, freeze=N)``, as in Lightning's ``BackboneFinetuning``). With ``at`` a
    list of increasing times, the frozen blocks come back in equal chunks from the top (gradual unfreezing);
    ``lr`` may then be a list with one rate per stage. ``lr=None`` keeps the rate of the group they left.
    """

    _keeps_initial = False

    def __init__(
        self,
        at: float | Sequence[float],
        lr: float | Sequence[float | None] | None = None,
        blocks: int | Sequence[int] | Schedule | None = None,
    ):
        super().__init__()
        ats = [at] if isinstance(at, (int, float)) and not isinstance(at, bool) else list(at)  # type: ignore[arg-type]
        if not ats:
            raise FreezeError("Unfreeze(at=[]) has no time; pass a fraction of training such as at=0.5")
        self.at = [_check_fraction(f"at[{i}]" if len(ats) > 1 else "at", a) for i, a in enumerate(ats)]
        if any(b <= a for a, b in zip(self.at, self.at[1:])):
            raise FreezeError(f"at={self.at} is not strictly increasing; pass the unfreezing times in order")
        lrs = list(lr) if isinstance(lr, Sequence) else [lr] * len(self.at)
        if len(lrs) != len(self.at):
            raise FreezeError(f"lr has {len(lrs)} values for {len(self.at)} unfreezing times; pass one per time")
        for v in lrs:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise FreezeError(f"lr={v!r} is not a non-negative number; pass a learning rate such as 1e-4")
        self.lr = lrs
        if isinstance(blocks, int) and not isinstance(blocks, bool) and blocks < 0:
            raise FreezeError(f"blocks={blocks} is negative; pass a block count, a list of indices or a schedule")
        self.blocks_spec = blocks
        self._stage = 0  # number of unfreezing times passed
        self._snapshot: list[int] | None = None  # the frozen set when the first stage came
        self._last: list[int] | None = None  # the last decision before the first stage

    def _initial_from(self, target: nn.Module) -> tuple[int, ...]:
        spec = self.blocks_spec
        n = len(self._blocks or [])
        if spec is None:
            cur = _frozen_of(target)
            if cur:
                return cur
            # A plain module frozen by hand: blocks whose parameters all have requires_grad=False.
            out = []
            for i, (_, m) in enumerate(self._blocks or []):
                ps = list(m.parameters())
                if ps and not any(p.requires_grad for p in ps):
                    out.append(i)
            return tuple(out)
        if isinstance(spec, Schedule):
            return ()
        return tuple(self._static(n))

    def _static(self, n: int) -> list[int]:
        spec = self.blocks_spec
        if isinstance(spec, int):
            if spec >= n:
                raise FreezeError(f"Unfreeze(blocks={spec}) freezes every block of {n}; pass at most {n - 1}")
            return list(range(spec))
        idx = sorted(set(spec))  # type: ignore[arg-type]
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise FreezeError(f"Unfreeze blocks index {i!r} is outside 0..{n - 1}")
        return idx

    def _before(self, progress: float, n_blocks: int) -> list[int]:
        spec = self.blocks_spec
        if isinstance(spec, Schedule):
            return sorted(spec.frozen_blocks(progress, n_blocks))
        if spec is None:
            return list(self._initial)
        return self._static(n_blocks)

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = _check_progress(progress)
        stage = sum(1 for a in self.at if progress >= a)
        if stage == 0 and self._stage == 0:
            self._last = self._before(progress, n_blocks)
            return list(self._last)
        if self._snapshot is None:  # what was frozen just before the first unfreezing time
            self._snapshot = list(self._last) if self._last is not None else self._before(progress, n_blocks)
        self._stage = max(self._stage, stage)
        s = self._snapshot
        k = len(self.at)
        # Chunk j of k (0 = deepest) comes back at stage j + 1; np.array_split sizes, taken from the top.
        sizes = [len(s) // k + (1 if j < len(s) % k else 0) for j in range(k)]
        keep = len(s) - sum(sizes[: self._stage])
        return s[:keep]

    def unfreeze_lr(self) -> float | None:
        return self.lr[self._stage - 1] if self._stage > 0 else None

    def _decision_state(self) -> dict:
        inner = self.blocks_spec._decision_state() if isinstance(self.blocks_spec, Schedule) else None
        return {"stage": self._stage, "snapshot": self._snapshot, "last": self._last, "inner": inner}

    def _load_decision_state(self, state: dict) -> None:
        self._stage = int(state["stage"])
        self._snapshot = None if state["snapshot"] is None else list(state["snapshot"])
        self._last = None if state.get("last") is None else list(state["last"])
        if isinstance(self.blocks_spec, Schedule) and state.get("inner") is not None:
            self.blocks_spec._load_decision_state(state["inner"])

    def __repr__(self) -> str:
        return f"Unfreeze(at={self.at}, lr={self.lr}, blocks={self.blocks_spec!r})"


# ---------------------------------------------------------------------------------------------------------
# DDP


def rebuild_ddp(ddp: nn.Module, **overrides: Any) -> nn.Module:
    """A new DistributedDataParallel over ``ddp.module`` with the same settings, for a changed frozen set.

    DDP registers the parameters that require grad when it is built: a parameter frozen later leaves its
    reducer waiting, and one unfrozen later is never all-reduced (ranks drift apart silently). Rebuilding
    after every change of the frozen set fixes both; the optimizer is untouched (it holds the parameters).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp, DDP):
        raise FreezeError(f"rebuild_ddp got a {type(ddp).__name__}; pass the DistributedDataParallel wrapper")
    import inspect

    accepted = inspect.signature(DDP.__init__).parameters
    kwargs: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "process_group": ddp.process_group,
        "bucket_cap_mb": ddp.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": getattr(ddp, "static_graph", False),
    }
    if "forward_sync_buffers" in accepted and hasattr(ddp, "forward_sync_buffers"):
        kwargs["forward_sync_buffers"] = ddp.forward_sync_buffers  # broadcast_buffers is deprecated there
    else:
        kwargs["broadcast_buffers"] = ddp.broadcast_buffers
    kwargs.update(overrides)
    return DDP(ddp.module, **kwargs)
