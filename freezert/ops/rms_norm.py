"""RMSNorm as Llama writes it (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``): lean Function and reference.

Eager keeps the input, its float32 copy, the normalised value and more (and the next projections save the
output); ``rms_norm_lean`` keeps the input and one fp32 ``rstd`` per row, marks its output recomputable (the
projections after it keep a recipe), and in backward reruns Llama's own ops under autograd: values and gradients
are eager's bit for bit. A float32 input is read twice by Llama's formula (``.to(float32)`` is then the input
itself), so it enters the Function twice and its two gradients reach the engine as eager's do, in eager's order.
Plain torch: any device.
"""

from __future__ import annotations

import functools

import torch

from . import _registry as reg
from .recompute import local_saves, mark_recomputable


def rms_norm_reference(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (transformers), verbatim in effect: what ``rms_norm_lean`` must match."""
    dtype = input.dtype
    h = input.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _value(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """``weight * (x * rstd).to(dtype)`` in float32: the forward's last steps, and its recompute recipe."""
    return weight * (x.to(torch.float32) * rstd).to(dtype)


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x2, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        # keep the smaller of the input and its float32 copy (float64 models: the copy, as eager does)
        keep = x if x.element_size() <= 4 else h
        ctx.save_for_backward(keep, weight, rstd)  # rstd: one float a row, kept for the output's recipe
        ctx.eps, ctx.split, ctx.dtype, ctx.copy = eps, x2 is not None, x.dtype, keep is not x
        copy = h if keep is not x else h.new_empty(0)  # returned so the recipe can name it (never the input)
        ctx.mark_non_differentiable(rstd, copy)
        return weight * (h * rstd).to(x.dtype), rstd, copy

    @staticmethod
    def backward(ctx, dy, _drstd=None, _dkeep=None):
        kept, weight, _ = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.enable_grad(), local_saves():  # the rerun's saves live only inside this call
            w = weight.detach().requires_grad_(ctx.needs_input_grad[2])
            xa = kept.detach().requires_grad_(need_x)  # the read by the product (x * rstd)
            xb = kept.detach().requires_grad_(need_x) if ctx.split else xa  # the read by pow
            ha, hb = (xa, xb) if ctx.split or ctx.copy else (xa.to(torch.float32),) * 2
            h = ha * torch.rsqrt(hb.pow(2).mean(-1, keepdim=True) + ctx.eps)
            out = w * h.to(ctx.dtype)
            wanted = [t for t in ((xa, xb) if ctx.split else (xa,)) if t.requires_grad]
            if w.requires_grad:
                wanted.append(w)
            grads = list(torch.autograd.grad(out, wanted, dy, allow_unused=True)) if wanted else []
        gx = grads.pop(0) if need_x else None
        if gx is not None and ctx.copy:  # eager's ToCopyBackward0: the float32 gradient cast back
            gx = gx.to(ctx.dtype)
        gx2 = grads.pop(0) if need_x and ctx.split else None
        gw = grads.pop(0) if w.requires_grad else None
        return gx, gx2, gw, None


def rms_norm_lean(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama's RMSNorm as a plain-torch autograd Function saving the input (or, for float64, its float32 copy)
    and per-row fp32 ``rstd``."""
    reg.record("rms_norm", reg.LEAN)
    twice = input if input.dtype == torch.float32 else None
    y, rstd, copy = _LeanRMSNorm.apply(input, twice, weight, float(eps))
    kept = copy if copy.numel() else input
    return mark_recomputable(y, functools.partial(_value, dtype=input.dtype), kept, rstd, weight)


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
