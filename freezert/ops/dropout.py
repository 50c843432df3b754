"""Dropout on the lean path: eager's random draws and values, a one-byte mask kept, the output a recipe.

On CPU eager's ``F.dropout`` draws ``noise = bernoulli(1 - p) / (1 - p)`` in the input's dtype and returns
``input * noise``, keeping ``noise`` (a full-precision tensor) for backward; ``dropout_lean`` draws the same noise
from the same generator, keeps it as a bool mask (the noise is exactly ``mask / (1 - p)`` again), and marks the
output recomputable. On CUDA eager uses the fused ``native_dropout`` (a bool mask already): the lean op calls it
and only adds the recipe, where ``native_dropout_backward`` rebuilds the output exactly (checked once per dtype).
"""

from __future__ import annotations

import functools

import torch

from . import _exact
from . import _registry as reg
from .recompute import mark_recomputable

aten = torch.ops.aten


def _fused(x: torch.Tensor) -> bool:
    # eager's choice (ATen Dropout.cpp, is_fused_kernel_acceptable): native_dropout off the CPU
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone")


def _noise(mask: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor:
    return mask.to(dtype).div_(1 - p)


class _LeanDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, fused):
        if fused:
            out, mask = aten.native_dropout(x, p, True)
        else:  # eager's _dropout: noise drawn in the input's dtype and layout, then input * noise
            noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
            out = x * noise
            mask = noise != 0
            del noise
        ctx.p, ctx.fused, ctx.dtype = p, fused, x.dtype
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, dy, _dmask=None):
        (mask,) = ctx.saved_tensors
        if ctx.fused:
            return aten.native_dropout_backward(dy, mask, 1.0 / (1.0 - ctx.p)), None, None
        return dy * _noise(mask, ctx.dtype, ctx.p), None, None  # eager's MulBackward0: grad * noise


def _cpu_value(x: torch.Tensor, mask: torch.Tensor, *, p: float) -> torch.Tensor:
    return x * _noise(mask, x.dtype, p)


def _fused_value(x: torch.Tensor, mask: torch.Tensor, *, p: float) -> torch.Tensor:
    return aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))


def _fused_exact(x: torch.Tensor, p: float) -> bool:
    key = ("dropout", x.device.type, x.dtype, p)
    if key not in _exact._CHOSEN:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(0)
            xp = _exact.random_like(x, 4)
            out, mask = aten.native_dropout(xp, p, True)
        _exact.choose(key, lambda: out, [("fused", lambda: _fused_value(xp, mask, p=p))])
    return _exact._CHOSEN[key] is not None


def dropout_lean(input: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """``F.dropout(input, p, training=True)``: eager's draws, values and gradients; keeps a bool mask; the output is
    a recipe over (input, mask) for a later op that saves it (attention probabilities before ``@ v``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_lean needs 0 < p < 1, got p={p}")
    fused = _fused(input)
    reg.record("dropout", reg.LEAN)
    out, mask = _LeanDropout.apply(input, float(p), fused)
    if fused:
        if not _fused_exact(input, float(p)):
            return out
        return mark_recomputable(out, functools.partial(_fused_value, p=float(p)), input, mask)
    return mark_recomputable(out, functools.partial(_cpu_value, p=float(p)), input, mask)
