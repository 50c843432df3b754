"""Activations as plain-torch autograd Functions that save only their input; the helpers fused ops share.

``act_forward`` / ``act_backward`` are eager's formulas, which the lean BN + act and any other fused op use in
backward; ``activation`` is the standalone op: it saves its input (eager ReLU saves its output instead) and marks
its output recomputable; ``activation_`` is the in-place form: on a tensor that is a recipe it keeps no copy of
the value it overwrites (eager's in-place SiLU / Hardswish clone it, ReLU keeps its output) and rebuilds it in
backward; ``elementwise`` runs any pure one-tensor function (a Python GELU formula) keeping only its input and
recomputing the function under autograd in backward. ``activation_reference`` is eager.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._errors import FreezeError
from . import _registry as reg
from .recompute import Snapshot, fresh_recipe, local_saves, mark_recomputable, note_edit, pack_now

ACTIVATIONS = ("silu", "relu", "relu6", "hardswish", "gelu", "gelu_tanh", "identity")


def check_activation(name: str | None) -> str:
    """The canonical activation name (None means identity); refuses names the lean path does not know."""
    name = "identity" if name is None else name
    if name not in ACTIVATIONS:
        raise FreezeError(f"activation={name!r} is not supported; use one of {list(ACTIVATIONS)} or None")
    return name


def act_forward(z: torch.Tensor, name: str) -> torch.Tensor:
    """``act(z)`` for a canonical name (a Python branch on a constant: traceable by torch.compile)."""
    if name == "silu":
        return F.silu(z)
    if name == "relu":
        return F.relu(z)
    if name == "relu6":
        return F.relu6(z)
    if name == "hardswish":
        return F.hardswish(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return z


def act_backward(z: torch.Tensor, dy: torch.Tensor, name: str) -> torch.Tensor:
    """``dy * act'(z)``, from the activation's input ``z`` alone: eager's own backward kernels (one pass each)."""
    aten = torch.ops.aten
    if name == "silu":
        return aten.silu_backward(dy, z)
    if name == "relu":
        return aten.threshold_backward(dy, z, 0)
    if name == "relu6":  # hardtanh's convention: no gradient at the kinks
        return aten.hardtanh_backward(dy, z, 0.0, 6.0)
    if name == "hardswish":
        return aten.hardswish_backward(dy, z)
    if name == "gelu":
        return aten.gelu_backward(dy, z)
    if name == "gelu_tanh":
        return aten.gelu_backward(dy, z, approximate="tanh")
    return dy


# eager's ReLU keeps its output for backward, so editing that output in place is an error in eager: the lean
# ReLU (which keeps its input instead) raises the same error, from a look at the output's version in backward
_KEEPS_OUTPUT = ("relu",)


def _check_output(ctx) -> None:
    r = getattr(ctx, "out_recipe", None)
    if r is not None:
        t = r.ref()
        if r.edited or (t is not None and t._version != r.version):
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{list(r.meta[0])} {r.meta[2]}], which is output 0 of ReluBackward0, was written in place after "
                "the ReLU made it (checked by freezert's lean ReLU, which keeps its input but fails as eager does)"
            )


def _watch_output(out: torch.Tensor, name: str) -> torch.Tensor:
    if name in _KEEPS_OUTPUT and out.grad_fn is not None:
        r, _ = fresh_recipe(out)
        if r is not None:
            out.grad_fn.out_recipe = r
    return out


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):
        ctx.name = name
        ctx.save_for_backward(x)
        return act_forward(x, name)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        _check_output(ctx)
        return act_backward(x, dy, ctx.name), None


def activation_reference(input: torch.Tensor, name: str | None = "silu") -> torch.Tensor:
    """The eager activation: what ``activation`` must match."""
    return act_forward(input, check_activation(name))


def activation(input: torch.Tensor, name: str | None = "silu") -> torch.Tensor:
    """``act(input)`` as a plain-torch autograd Function that saves only the input (any device).

    Inside ``ops.recompute_saved()`` a later op that saves the output stores a recipe over the input instead
    (eager keeps both: e.g. ``fc2(gelu(fc1(x)))`` saves the GELU input and its output).
    """
    name = check_activation(name)
    reg.record("activation", reg.LEAN)
    out = mark_recomputable(_Activation.apply(input, name), functools.partial(_value, name=name), input)
    return _watch_output(out, name)


def _value(x: torch.Tensor, *, name: str) -> torch.Tensor:
    return act_forward(x, name)


# in-place forms eager has (GELU has none)
_INPLACE = {
    "silu": lambda z: F.silu(z, inplace=True),
    "relu": torch.relu_,
    "relu6": lambda z: F.relu6(z, inplace=True),
    "hardswish": lambda z: F.hardswish(z, inplace=True),
}


class _ActivationInplace(torch.autograd.Function):
    """``act_(x)`` keeping no copy of the overwritten value: backward rebuilds it from its recipe (``pre``)."""

    @staticmethod
    def forward(ctx, x, name, pre):
        ctx.name, ctx.pre = name, pre
        _INPLACE[name](x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        _check_output(ctx)
        pre, ctx.pre = ctx.pre, None  # drop the handle (and the rebuilt value) once used
        # eager's backward of the in-place op: relu_ / hardtanh_ read the output (the same mask as the input),
        # silu_ / hardswish_ a clone of the input
        return act_backward(pre.value(), dy, ctx.name), None, None


def activation_(input: torch.Tensor, name: str = "relu") -> torch.Tensor:
    """``act(input)`` in place (eager's ``relu_`` / ``F.silu(inplace=True)`` / ...): when ``input`` is a fresh recipe
    (the output of a lean op, unedited), the overwritten value is rebuilt in backward instead of kept, and the
    result is a recipe too; otherwise eager's in-place op runs unchanged."""
    name = check_activation(name)
    if name not in _INPLACE:
        raise FreezeError(f"activation={name!r} has no in-place form; use one of {sorted(_INPLACE)}")
    r, view = fresh_recipe(input)
    pre = pack_now(input) if r is not None and view is None and torch.is_grad_enabled() else None
    note_edit(input)  # a save of the value about to be overwritten is stale from now on
    if pre is None:
        return _INPLACE[name](input)
    before = Snapshot(input)
    reg.record("activation", reg.LEAN)
    out = _ActivationInplace.apply(input, name, pre)
    return _watch_output(mark_recomputable(out, functools.partial(_value, name=name), before), name)


class _Elementwise(torch.autograd.Function):
    """``fn(x)`` for a pure elementwise ``fn``: saves ``x``; backward reruns ``fn`` under autograd (eager's own
    derivative formulas, in eager's order) and asks it for the input's gradient."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        # the rerun's saves live only inside this call: keep them from enclosing hooks (save_on_cpu, a meter)
        with torch.enable_grad(), local_saves():
            xd = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(ctx.fn(xd), xd, dy)
        return dx, None


def _no_grad_call(x: torch.Tensor, *, fn) -> torch.Tensor:
    with torch.no_grad():
        return fn(x)


def elementwise(input: torch.Tensor, fn) -> torch.Tensor:
    """``fn(input)`` keeping only ``input`` for backward; the output is a recipe (``fn`` must be a pure function
    of its one tensor argument, e.g. transformers' ``NewGELUActivation``)."""
    reg.record("activation", reg.LEAN)
    return mark_recomputable(_Elementwise.apply(input, fn), functools.partial(_no_grad_call, fn=fn), input)
