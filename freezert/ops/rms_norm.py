"""RMSNorm as Llama writes it (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``): lean Function and reference.

Eager keeps the input, the normalised value and the output (which the next projections save);
``rms_norm_lean`` saves the input and one fp32 ``rstd`` per row, and marks its output recomputable, so the
projections after it keep a recipe instead (``ops.recompute``). Plain torch: any device, compilable.
"""

from __future__ import annotations

import functools

import torch

from . import _registry as reg
from .recompute import mark_recomputable


def rms_norm_reference(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (transformers), verbatim in effect: what ``rms_norm_lean`` must match."""
    dtype = input.dtype
    h = input.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _compute(x: torch.Tensor) -> torch.Tensor:
    # Llama's formula computes in float32 whatever the input (float64 too): the same function, so the same
    return x.to(torch.float32)


def _value(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * (x * rstd).to(x.dtype)``: the forward and its recompute recipe."""
    return weight * (_compute(x) * rstd).to(x.dtype)


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xs = _compute(x)
        rstd = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return _value(x, rstd, weight), rstd

    @staticmethod
    def backward(ctx, dy, _drstd=None):
        x, weight, rstd = ctx.saved_tensors
        xs = _compute(x)
        h = (xs * rstd).to(x.dtype)  # recomputed, not saved
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (
                (dy * h).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
                if weight.dim() == 1
                else (dy * h).sum_to_size(weight.shape).to(weight.dtype)
            )
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).to(x.dtype).to(xs.dtype)  # eager rounds the gradient at h's dtype first
            xhat = xs * rstd
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def rms_norm_lean(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama's RMSNorm as a plain-torch autograd Function saving the input and per-row fp32 ``rstd``."""
    reg.record("rms_norm", reg.LEAN)
    y, rstd = _LeanRMSNorm.apply(input, weight, float(eps))
    return mark_recomputable(y, _value, input, rstd, weight)


@functools.cache
def _llama_forward_code():
    """The bytecode of transformers' ``LlamaRMSNorm.forward`` (None without transformers)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:
        return None
    return LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(m: torch.nn.Module) -> bool:
    """True for a transformers RMSNorm whose forward is Llama's formula (Llama, Mistral, Qwen2, ...)."""
    if not type(m).__module__.startswith("transformers.") or not type(m).__name__.endswith("RMSNorm"):
        return False
    code = _llama_forward_code()
    fwd = getattr(type(m).forward, "__code__", None)
    w = getattr(m, "weight", None)
    return (
        code is not None
        and fwd is not None
        and fwd.co_code == code.co_code
        and fwd.co_consts == code.co_consts
        and fwd.co_names == code.co_names
        and isinstance(w, torch.nn.Parameter)
        and isinstance(getattr(m, "variance_epsilon", None), float)
    )
