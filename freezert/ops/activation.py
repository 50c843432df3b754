"""Activations as plain-torch autograd Functions that save only their input; the helpers fused ops share.

``act_forward`` / ``act_backward`` are the formulas the lean Conv-BN-act and any other fused op recompute
in backward; ``activation`` is the standalone op (eager SiLU/GELU already save only their input, so its use
is as the recompute building block and the ``torch.compile``-friendly form), ``activation_reference`` eager.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._errors import FreezeError
from . import _registry as reg
from .recompute import mark_recomputable

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


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):
        ctx.name = name
        ctx.save_for_backward(x)
        return act_forward(x, name)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
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
    return mark_recomputable(_Activation.apply(input, name), functools.partial(_value, name=name), input)


def _value(x: torch.Tensor, *, name: str) -> torch.Tensor:
    return act_forward(x, name)
