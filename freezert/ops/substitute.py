"""Finds Conv->BN->act blocks and LayerNorms, and swaps in modules that call the fused ops.

A replacement holds the very same child modules / Parameter / buffer objects as the original, so
parameter identity, buffers and ``state_dict`` keys are unchanged while it is swapped in.
The input module is never edited by ``plan_substitutions``; ``swapped`` edits it only inside the block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._swap import Handle, apply_substitutions, restore, swapped  # noqa: F401 (re-exported)
from .batch_norm_act import batch_norm_act
from .layer_norm import layer_norm

_ACT_NAMES: dict[type, str] = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}


def _act_name(m: nn.Module) -> str | None:
    return _ACT_NAMES.get(type(m))


def _plain_bn(m: nn.Module) -> bool:
    # subclasses that override forward (SyncBatchNorm is not a BatchNorm2d anyway) do something else
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def _hooked(m: nn.Module) -> bool:
    # a replacement would silently drop hooks registered on the block itself
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


class FusedConvBNAct(nn.Module):
    """``act(bn(conv(x)))`` with BN and the activation fused; children are the original modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module,
                 names: tuple[str, str, str] = ("conv", "bn", "act")):
        super().__init__()
        activation = _act_name(act)
        if activation is None:
            raise ValueError(f"activation {type(act).__name__} is not fusable; use SiLU, ReLU or Identity")
        self._names = names
        self._activation = activation
        for name, mod in zip(names, (conv, bn, act)):
            self._modules[name] = mod  # the same objects: parameters, buffers, keys unchanged
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self._modules[self._names[0]], self._modules[self._names[1]]
        y = conv(x)
        # nn.BatchNorm2d.forward's bookkeeping, verbatim in effect
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        return batch_norm_act(y, bn.running_mean if track else None, bn.running_var if track else None,
                              bn.weight, bn.bias, use_batch, factor, bn.eps, self._activation)


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` calling the fused op; registers the original weight / bias Parameter objects."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        self.register_parameter("weight", ln.weight)
        self.register_parameter("bias", ln.bias)
        self.training = ln.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _replacement(m: nn.Module) -> nn.Module | None:
    rep = _fused(m)
    if rep is not None:
        # plain attributes a parent may read, e.g. YOLO's per-layer .f / .i / .type / .np
        for key, value in vars(m).items():
            if not key.startswith("_") and key != "training" and key not in vars(rep):
                setattr(rep, key, value)
    return rep


def _fused(m: nn.Module) -> nn.Module | None:
    if _hooked(m):
        return None
    if type(m) is nn.LayerNorm:
        return FusedLayerNorm(m)
    if type(m) is nn.Sequential and len(m) == 3:
        conv, bn, act = m[0], m[1], m[2]
        if isinstance(conv, nn.Conv2d) and _plain_bn(bn) and _act_name(act) in ("silu", "relu") \
                and not _hooked(conv) and not _hooked(bn) and not _hooked(act):
            return FusedConvBNAct(conv, bn, act, names=tuple(m._modules))
        return None
    children = m._modules
    if set(children) == {"conv", "bn", "act"}:  # YOLOv5 / Ultralytics Conv: forward is act(bn(conv(x)))
        conv, bn, act = children["conv"], children["bn"], children["act"]
        if isinstance(conv, nn.Conv2d) and _plain_bn(bn) and _act_name(act) is not None \
                and not _hooked(bn) and not _hooked(act):
            return FusedConvBNAct(conv, bn, act)
    return None


def plan_substitutions(module: nn.Module, *, skip: Callable[[str], bool] = lambda name: False
                       ) -> list[tuple[str, nn.Module]]:
    """(dotted name, replacement) for each Conv-BN-act block and LayerNorm below ``module``.

    ``skip(name)`` excludes a candidate (e.g. frozen blocks); the root itself is never replaced.
    """
    plan: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            rep = None if skip(full) else _replacement(child)
            if rep is not None:
                plan.append((full, rep))
            else:
                visit(full, child)

    visit("", module)
    return plan
