"""Linear + cross-entropy without the full (N, V) logits: chunked matmuls, a Triton softmax/grad kernel.

Rows are processed ``chunk_size`` at a time: logits for the chunk (torch matmul), then one Triton
program per row computes the loss online over V and overwrites the logits with their gradient, which
is folded into grad_input / grad_weight / grad_bias at once. Peak memory is O(chunk x V).
With reduction "mean"/"sum" the gradients are computed in the forward and scaled by grad_output in
backward; with "none" they depend on the per-row grad_output, so backward recomputes the chunks.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .._errors import FreezeError
from . import _registry as reg

_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk by default (128 MiB in fp32)


def linear_cross_entropy_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)``: what the fast path must match."""
    logits = F.linear(input, weight, bias)
    return F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


@functools.cache
def _kernels() -> SimpleNamespace:
    # Defined on first use: importing freezert.ops never imports triton (see batch_norm_act).
    # Triton (compiler and interpreter alike) resolves names in a kernel through the module's
    # globals, not closures: bind triton, tl and the helper kernels there, on first use.
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows(
        z_ptr,
        stride_z,
        tgt_ptr,
        scale_ptr,
        loss_ptr,
        V,
        ignore_index,
        smoothing,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # One row of logits: online max / sum-exp over V, loss, then (optionally) d loss / d logits
        # written over the logits, scaled by the row's scale (1, or grad_output[row] for "none"). The mean's
        # 1/n_valid is applied in fp32 in backward: folded in here, fp16 gradients of size p/n would underflow.
        row = tl.program_id(0)
        zrow = z_ptr + row.to(tl.int64) * stride_z
        t = tl.load(tgt_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = 0.0
        zsum = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            mask = offs < V
            z = tl.load(zrow + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # a block of -inf logits (a bias masking classes) so far: shift by 0, not -inf (-inf - -inf = NaN)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(s)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < V)
        zt = tl.load(zrow + t, mask=valid & in_range, other=0.0).to(tl.float32)
        # without smoothing, skip the sum term: 0 * (a sum holding -inf) would be NaN
        loss = lse - (1.0 - smoothing) * zt - (smoothing / V) * tl.where(smoothing > 0.0, zsum, 0.0)
        loss = tl.where(in_range, loss, float("nan"))  # torch raises; we flag the row
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(scale_ptr + row), 0.0)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                mask = offs < V
                z = tl.load(zrow + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - smoothing / V - tl.where(offs == t, 1.0 - smoothing, 0.0)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(zrow + offs, g.to(z_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(ce_rows=ce_rows)


def _chunked(x, weight, bias, target, row_scale, ignore_index, smoothing, chunk, need_x, need_w, need_b):
    """Per-row losses (fp32) and, where asked, grad_input, grad_weight (fp32), grad_bias (fp32)."""
    k = _kernels()
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    loss = reg.empty(n, device=dev, dtype=torch.float32)
    gx = reg.empty_like(x) if need_x else None
    gw = torch.zeros(v, d, device=dev, dtype=torch.float32) if need_w else None
    gb = torch.zeros(v, device=dev, dtype=torch.float32) if need_b else None
    write = need_x or need_w or need_b
    block_v = min(1 << max(0, v - 1).bit_length(), 4096)
    warps = 8 if block_v >= 2048 else 4
    wt = weight.t()
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        xc = x[r0:r1]
        z = torch.addmm(bias, xc, wt) if bias is not None else torch.mm(xc, wt)  # (rows, V), x's dtype
        k.ce_rows[(r1 - r0,)](
            z,
            z.stride(0),
            target[r0:r1],
            row_scale[r0:r1],
            loss[r0:r1],
            v,
            ignore_index,
            float(smoothing),
            WRITE_GRAD=write,
            BLOCK_V=block_v,
            num_warps=warps,
        )
        if need_x:
            torch.mm(z, weight, out=gx[r0:r1])
        if need_w:
            if z.dtype == torch.float32:
                gw.addmm_(z.t(), xc)
            else:
                gw += torch.mm(z.t(), xc).float()
        if need_b:
            gb += z.sum(0, dtype=torch.float32)
        del z
    return loss, gx, gw, gb


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, smoothing, reduction, chunk, out_dtype):
        n = x.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        need_b = need_b and bias is not None
        n_valid = (target != ignore_index).sum().to(torch.float32)
        row_scale = torch.ones(n, device=x.device, dtype=torch.float32)
        eager = reduction != "none"  # gradients do not depend on grad_output row by row
        loss, gx, gw, gb = _chunked(
            x,
            weight,
            bias,
            target,
            row_scale,
            ignore_index,
            smoothing,
            chunk,
            need_x and eager,
            need_w and eager,
            need_b and eager,
        )
        ctx.reduction, ctx.chunk = reduction, chunk
        ctx.ignore_index, ctx.smoothing = ignore_index, smoothing
        ctx.need = (need_x, need_w, need_b)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.n_valid = n_valid
        if eager:
            ctx.save_for_backward(gx, gw, gb)
        else:
            ctx.save_for_backward(x, weight, bias, target)
        if reduction == "mean":
            return (loss.sum() / n_valid).to(out_dtype)
        if reduction == "sum":
            return loss.sum().to(out_dtype)
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.need
        xdt, wdt, bdt = ctx.dtypes
        if ctx.reduction != "none":
            gx, gw, gb = ctx.saved_tensors
            # mean: every row ignored gives a NaN loss but zero gradients, as eager (nothing to divide)
            g = grad.float() / ctx.n_valid.clamp_min(1.0) if ctx.reduction == "mean" else grad.float()
            gx = (gx * g).to(xdt) if need_x else None
            gw = (gw * g).to(wdt) if need_w else None
            gb = (gb * g).to(bdt) if need_b else None
        else:
            x, weight, bias, target = ctx.saved_tensors
            _, gx, gw, gb = _chunked(
                x,
                weight,
                bias,
                target,
                grad.float().contiguous(),
                ctx.ignore_index,
                ctx.smoothing,
                ctx.chunk,
                need_x,
                need_w,
                need_b,
            )
            gw = gw.to(wdt) if need_w else None
            gb = gb.to(bdt) if need_b else None
        return gx, gw, None, gb, None, None, None, None, None


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the (N, V) logits.

    ``chunk_size`` rows of logits exist at a time (default: about 2**25 logits per chunk).
    The fast path takes (N, D) input and (N,) class-index targets; other shapes use the reference.
    """
    if reduction not in _REDUCTIONS:
        raise FreezeError(f"reduction={reduction!r} is not supported; use one of {_REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise FreezeError(f"label_smoothing={label_smoothing!r} must lie in [0, 1]")
    if chunk_size is not None and chunk_size < 1:
        raise FreezeError(f"chunk_size={chunk_size!r} must be a positive number of rows")
    ok = (
        input.dim() == 2
        and weight.dim() == 2
        and target.dim() == 1
        and target.shape[0] == input.shape[0]
        and weight.shape[1] == input.shape[1]
        and not target.is_floating_point()
        and weight.dtype == input.dtype
        and (bias is None or (bias.dtype == input.dtype and bias.shape == (weight.shape[0],)))
        and input.shape[0] > 0
        and weight.shape[0] > 0
    )
    path = reg.choose("linear_cross_entropy", input, weight, bias, target, supported=ok)
    if path == reg.REFERENCE:
        return linear_cross_entropy_reference(input, weight, target, bias, ignore_index, label_smoothing, reduction)
    n, v = input.shape[0], weight.shape[0]
    chunk = chunk_size or max(1, min(n, _CHUNK_ELEMENTS // v))
    device_type = input.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # as eager: F.linear in the autocast dtype, cross-entropy (and its result) in fp32
        dt = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        if reg.choose("linear_cross_entropy", input, weight, bias, target) == reg.REFERENCE:
            return linear_cross_entropy_reference(input, weight, target, bias, ignore_index, label_smoothing, reduction)
    # Under autocast the loss is fp32, as eager's cross-entropy: cast inside the Function, so the incoming
    # gradient (a GradScaler scale of 65536 is above fp16's range) never passes through the input dtype.
    out_dtype = torch.float32 if autocast else input.dtype
    with torch.autocast(device_type, enabled=False), reg.on_device(input):
        return _LinearCrossEntropy.apply(
            input.contiguous(),
            weight.contiguous(),
            target.contiguous(),
            None if bias is None else bias.contiguous(),
            int(ignore_index),
            float(label_smoothing),
            reduction,
            int(chunk),
            out_dtype,
        )
