"""Finds Conv->BN->act blocks and LayerNorms, and swaps in modules that call the fused ops.

A replacement holds the very same child modules / Parameter / buffer objects as the original, so
parameter identity, buffers and ``state_dict`` keys are unchanged while it is swapped in.
The input module is never edited by ``plan_substitutions``; ``swapped`` edits it only inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._swap import Handle, apply_substitutions, restore  # noqa: F401 (re-exported)
from .._swap import swapped as _swapped
from . import _registry as reg
from .activation import activation
from .batch_norm_act import batch_norm_act
from .layer_norm import layer_norm
from .recompute import recompute_saved
from .rms_norm import is_llama_rms_norm, rms_norm_lean

_ACT_NAMES: dict[type, str] = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}
_TRITON_ACTS = ("silu", "relu", "identity")


# the lean path only: the Triton kernels know silu / relu / identity
_LEAN_ACT_NAMES: dict[type, str] = {nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}


def _act_name(m: nn.Module) -> str | None:
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    return _ACT_NAMES.get(type(m)) or _LEAN_ACT_NAMES.get(type(m))


# transformers' activation modules (transformers.activations), matched by class name: no import needed
_HF_ACTS = {
    "SiLUActivation": "silu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUActivation": "gelu",
}


def _standalone_act(m: nn.Module) -> str | None:
    name = _act_name(m)
    if name is None and type(m).__module__.startswith("transformers."):
        name = _HF_ACTS.get(type(m).__name__)
        if name == "gelu" and getattr(m, "act", None) is not F.gelu:  # use_gelu_python: a Python formula
            name = None
    return name


def _sequential(m: nn.Module) -> bool:
    # nn.Sequential itself, or a subclass that only names it (torchvision's Conv2dNormActivation)
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _plain_bn(m: nn.Module) -> bool:
    # subclasses that override forward (SyncBatchNorm is not a BatchNorm2d anyway) do something else
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def _hooked(m: nn.Module) -> bool:
    # a replacement would silently drop hooks registered on the block itself
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


class FusedConvBNAct(nn.Module):
    """``act(bn(conv(x)))`` with BN and the activation fused; children are the original modules."""

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module,
        names: tuple[str, str, str] = ("conv", "bn", "act"),
        impl: str = "triton",
    ):
        super().__init__()
        activation = _act_name(act)
        if activation is None or (impl == "triton" and activation not in _TRITON_ACTS):
            raise ValueError(
                f"activation {type(act).__name__} is not fusable; use SiLU, ReLU or Identity"
                " (or GELU with impl='lean' / 'auto')"
            )
        self._impl = reg.check_impl(impl)
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
        return batch_norm_act(
            y,
            bn.running_mean if track else None,
            bn.running_var if track else None,
            bn.weight,
            bn.bias,
            use_batch,
            factor,
            bn.eps,
            self._activation,
            impl=self._impl,
        )


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` calling the fused op; registers the original weight / bias Parameter objects."""

    def __init__(self, ln: nn.LayerNorm, impl: str = "triton"):
        super().__init__()
        self._impl = reg.check_impl(impl)
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        self.register_parameter("weight", ln.weight)
        self.register_parameter("bias", ln.bias)
        self.training = ln.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, impl=self._impl)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _replacement(m: nn.Module, impl: str) -> nn.Module | None:
    rep = _fused(m, impl)
    if rep is not None:
        # plain attributes a parent may read, e.g. YOLO's per-layer .f / .i / .type / .np
        for key, value in vars(m).items():
            if not key.startswith("_") and key != "training" and key not in vars(rep):
                setattr(rep, key, value)
    return rep


class LeanActivation(nn.Module):
    """A standalone activation module through ``ops.activation``: its output, when a later layer saves it,
    becomes a recipe over the input the activation saves anyway (lean path only)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self._activation = _standalone_act(act)
        self._impl = "lean"
        self.training = act.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(x, self._activation)

    def extra_repr(self) -> str:
        return self._activation


class LeanRMSNorm(nn.Module):
    """transformers' Llama-style RMSNorm through ``rms_norm_lean``; registers the original weight Parameter."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.register_parameter("weight", norm.weight)
        self.variance_epsilon = norm.variance_epsilon
        self._impl = "lean"
        self.training = norm.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_lean(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _fusable_act(act: nn.Module, impl: str) -> str | None:
    name = _act_name(act)
    return name if name is not None and (impl != "triton" or name in _TRITON_ACTS) else None


def _fused(m: nn.Module, impl: str) -> nn.Module | None:
    if _hooked(m):
        return None
    if type(m) is nn.LayerNorm:
        return FusedLayerNorm(m, impl)
    if impl != "triton" and is_llama_rms_norm(m) and not m._modules and not m._buffers:
        return LeanRMSNorm(m)
    if impl != "triton" and _standalone_act(m) not in (None, "identity") and not getattr(m, "inplace", False):
        # in-place activations already share one storage between what they and the next layer save
        return LeanActivation(m)
    if _sequential(m) and len(m) == 3:
        conv, bn, act = m[0], m[1], m[2]
        if (
            isinstance(conv, nn.Conv2d)
            and _plain_bn(bn)
            and _fusable_act(act, impl) not in (None, "identity")
            and not _hooked(conv)
            and not _hooked(bn)
            and not _hooked(act)
        ):
            return FusedConvBNAct(conv, bn, act, names=tuple(m._modules), impl=impl)
        return None
    children = m._modules
    if set(children) == {"conv", "bn", "act"}:  # YOLOv5 / Ultralytics Conv: forward is act(bn(conv(x)))
        conv, bn, act = children["conv"], children["bn"], children["act"]
        if (
            isinstance(conv, nn.Conv2d)
            and _plain_bn(bn)
            and _fusable_act(act, impl) is not None
            and not _hooked(bn)
            and not _hooked(act)
        ):
            return FusedConvBNAct(conv, bn, act, impl=impl)
    return None


def plan_substitutions(
    module: nn.Module, *, skip: Callable[[str], bool] = lambda name: False, impl: str = "triton"
) -> list[tuple[str, nn.Module]]:
    """(dotted name, replacement) for each Conv-BN-act block and LayerNorm below ``module``.

    ``skip(name)`` excludes a candidate (e.g. frozen blocks); the root itself is never replaced.
    ``impl``: "triton" (Triton kernels where they run, else eager), "lean" (the plain-torch lean
    Functions on every device), "auto" (Triton on CUDA inputs, lean elsewhere; decided per call).
    """
    reg.check_impl(impl)
    plan: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            rep = None if skip(full) else _replacement(child, impl)
            if rep is not None:
                plan.append((full, rep))
            else:
                visit(full, child)

    visit("", module)
    return plan


def _recipes(plan: list[tuple[str, nn.Module]]) -> bool:
    """True when some replacement marks its output recomputable (every fused Conv-BN-act path does, and
    the lean LayerNorm, RMSNorm and activations)."""
    return any(
        isinstance(rep, (FusedConvBNAct, LeanActivation, LeanRMSNorm))
        or (isinstance(rep, FusedLayerNorm) and rep._impl != "triton")
        for _, rep in plan
    )


@contextlib.contextmanager
def swapped(module: nn.Module, plan: list[tuple[str, nn.Module]], *, recompute: bool = True) -> Iterator[nn.Module]:
    """``module`` runs with the replacements inside the block; the fused blocks' activations that later
    layers save are stored as recipes over the BN input (``ops.recompute``), unless ``recompute=False``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(module, plan))
        if recompute and _recipes(plan):
            stack.enter_context(recompute_saved())
        yield module
