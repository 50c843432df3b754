"""Applying a freeze: ``apply_freeze`` makes a set of blocks the frozen ones and fixes the optimizers to match.

A target is ``Freezable`` (a ``FrozenModel``: it freezes itself through ``set_freeze`` and rebuilds its inference
segment) or a plain module, frozen by ``requires_grad`` with its frozen blocks' BatchNorms held in eval mode.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from .._errors import FreezeError
from ..blocks import as_named_blocks
from .optim import as_optimizers, remove_params, removed_params, restore_params, sibling_homes

__all__ = ["FreezeChange", "Freezable", "apply_freeze", "check_not_all", "frozen_now", "resolve_blocks"]


@runtime_checkable
class Freezable(Protocol):
    """A model that freezes its own blocks (``freezert.FrozenModel``); anything else is frozen by ``requires_grad``."""

    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The block sequence, as (dotted name, module) pairs."""
        ...

    @property
    def frozen_indices(self) -> list[int]:
        """Sorted indices of the frozen blocks."""
        ...

    def set_freeze(self, freeze: Any) -> None:
        """Makes ``freeze`` (a list of block indices, or None) the frozen set."""
        ...

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters frozen now (a stem frozen with block 0 included)."""
        ...


# Registries (kept because the modules are the user's: freezert adds no attributes to them; weak keys keep
# nothing alive). _PLAIN_FROZEN: the blocks freezert froze in a plain module, which requires_grad alone cannot
# tell apart from blocks frozen by hand, from tied weights that keep training, or from train_bn's BatchNorms.
# _EVAL_HELD: BatchNorms of frozen blocks held in eval mode, with the hook that holds them (a trainer's
# model.train() at every epoch start would otherwise switch them back, pytorch#66073).
_PLAIN_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]] = weakref.WeakKeyDictionary()
_EVAL_HELD: weakref.WeakKeyDictionary[_BatchNorm, Any] = weakref.WeakKeyDictionary()


def resolve_blocks(target: Any, blocks: Any = None) -> list[tuple[str, nn.Module]]:
    """``target``'s blocks: ``blocks`` if given, a ``Freezable``'s own, else ``freezert.find_blocks``'."""
    if blocks is None:
        if isinstance(target, Freezable):
            blocks = target.blocks
        else:
            from ..blocks import find_blocks

            blocks = find_blocks(target)
    return as_named_blocks(blocks, "the model has no blocks to freeze; pass blocks=[...] explicitly")


def frozen_of(target: Any) -> tuple[int, ...]:
    """The blocks freezert froze in ``target`` (a ``Freezable`` reports its own)."""
    if isinstance(target, Freezable):
        return tuple(target.frozen_indices)
    return _PLAIN_FROZEN.get(target, ())


def hand_frozen(blocks: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    """Blocks whose parameters all have requires_grad=False (frozen by hand, outside freezert)."""
    out = []
    for i, (_, m) in enumerate(blocks):
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            out.append(i)
    return tuple(out)


def frozen_now(target: Any, blocks: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    """The frozen set as found now: freezert's, plus blocks frozen by hand in a plain module."""
    if isinstance(target, Freezable):
        return frozen_of(target)
    return tuple(sorted(set(frozen_of(target)) | set(hand_frozen(blocks))))


def check_not_all(count: int, target: Any, blocks: list[tuple[str, nn.Module]], what: str) -> None:
    """Freezing every block is a linear probe when parameters outside the blocks train (a head): allowed then,
    as ``wrap(freeze=N)`` allows it; without any, nothing is left to train, which is refused."""
    n = len(blocks)
    if count < n or isinstance(target, Freezable):  # a FrozenModel's set_freeze applies the same rule itself
        return
    inside = {id(p) for _, m in blocks for p in m.parameters()}
    if not any(id(p) not in inside for p in target.parameters()):
        raise FreezeError(
            f"{what} freezes all {n} blocks and the model has no parameters outside them, leaving nothing to "
            f"train; freeze at most {n - 1}"
        )


def _unique_params(modules: list[nn.Module]) -> dict[int, nn.Parameter]:
    out: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            out.setdefault(id(p), p)
    return out


def _bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


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


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def _hold_eval(bn: _BatchNorm) -> None:
    """Puts a frozen block's BatchNorm in eval mode and keeps it there through later ``.train()`` calls."""
    if bn not in _EVAL_HELD:
        _EVAL_HELD[bn] = bn.register_forward_pre_hook(_keep_eval)
    bn.eval()


def _release_eval(bn: _BatchNorm, training: bool) -> None:
    """Undoes ``_hold_eval``: the BatchNorm follows ``training`` (its model's mode) again."""
    hook = _EVAL_HELD.pop(bn, None)
    if hook is not None:
        hook.remove()
        bn.train(training)


def _set_frozen_bns(target: nn.Module, blocks: list[tuple[str, nn.Module]], frozen: tuple[int, ...], train_bn: bool):
    """Frozen blocks' BatchNorms stop updating running statistics (eval mode) unless ``train_bn``."""
    want: dict[int, _BatchNorm] = {} if train_bn else {id(b): b for i in frozen for b in _bns(blocks[i][1])}
    mine = {id(b) for _, m in blocks for b in _bns(m)}
    for bn in [b for b in list(_EVAL_HELD.keys()) if id(b) in mine and id(b) not in want]:
        _release_eval(bn, target.training)
    for bn in want.values():
        _hold_eval(bn)


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
    Every block may be frozen when parameters outside them train (a head), as with ``wrap(model, freeze=N)``.
    """
    blk = resolve_blocks(target, blocks)
    n = len(blk)
    want: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise FreezeError(f"block index {i!r} is outside 0..{n - 1}; the model has {n} blocks")
        want.append(i)
    new = tuple(sorted(set(want)))
    check_not_all(len(new), target, blk, f"indices={list(new)}")
    freezable = isinstance(target, Freezable)
    prev = frozen_now(target, blk)
    opts = as_optimizers(optimizer)
    if freezable:  # frozen_parameters() includes the stem frozen together with block 0
        was_frozen = {id(p): p for p in target.frozen_parameters()}
        target.set_freeze(list(new) or None)
        now_frozen = {id(p): p for p in target.frozen_parameters()}
    else:
        was_frozen = _block_param_sets(blk, prev, train_bn)
        now_frozen = _block_param_sets(blk, new, train_bn)
        for p in now_frozen.values():
            p.requires_grad_(False)
        _PLAIN_FROZEN[target] = new
        _set_frozen_bns(target, blk, new, train_bn)
    for p in now_frozen.values():
        p.grad = None
    # Always remove the whole frozen set (idempotent): a fresh optimizer after resume may still hold it.
    remove_params(opts, now_frozen)
    back = [p for k, p in was_frozen.items() if k not in now_frozen]
    # Parameters of this model that freezert removed earlier and that are not frozen now come back too.
    seen = {id(p) for p in back}
    mine = {id(p) for p in target.parameters()}
    for opt in opts:
        for k, (p, _) in removed_params(opt).items():
            if k in mine and k not in now_frozen and k not in seen:
                back.append(p)
                seen.add(k)
    if not freezable:
        for p in back:
            p.requires_grad_(True)
    else:  # the wrapper restored requires_grad; a parameter the user had frozen stays out
        back = [p for p in back if p.requires_grad]
    restore_params(opts, back, lr, sibling_homes(target, opts, back))
    return FreezeChange(frozen=tuple(i for i in new if i not in prev), unfrozen=tuple(i for i in prev if i not in new))
