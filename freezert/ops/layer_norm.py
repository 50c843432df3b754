"""LayerNorm forward and backward: Triton kernels, autograd wiring, plain-torch reference."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .._errors import FreezeError
from . import _registry as reg
from .recompute import mark_recomputable

# Rows longer than this go to the reference: a row must fit in one block of registers.
_MAX_ROW = 16384


def layer_norm_reference(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` itself: what the Triton path must match."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return F.layer_norm(input, shape, weight, bias, eps)


@functools.cache
def _kernels() -> SimpleNamespace:
    # Defined on first use: importing freezert.ops never imports triton (see batch_norm_act).
    # Triton (compiler and interpreter alike) resolves names in a kernel through the module's
    # globals, not closures: bind triton, tl and the helper kernels there, on first use.
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def forward(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        M,
        N,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask_m = rows < M
        mask_n = cols < N
        mask = mask_m[:, None] & mask_n[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=mask_m)
        tl.store(rstd_ptr + rows, rstd, mask=mask_m)

    @triton.jit
    def backward(
        x_ptr,
        dy_ptr,
        dx_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        dw_ptr,
        db_ptr,
        M,
        N,
        HAS_W: tl.constexpr,
        NEED_DX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Each program walks row blocks pid, pid + G, ...; dx per row, dw/db partials per program.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        mask_n = cols < N
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        # 1-D accumulators: [BLOCK_M, BLOCK_N] tiles would hold two more row blocks in registers (spills)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for rb in range(pid, tl.cdiv(M, BLOCK_M), nprog):
            rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = rows < M
            mask = mask_m[:, None] & mask_n[None, :]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            if NEED_DX:
                wdy = dy
                if HAS_W:
                    wdy = dy * w[None, :]
                c1 = tl.sum(xhat * wdy, axis=1) / N
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + pid * N + cols, dw, mask=mask_n)
        tl.store(db_ptr + pid * N + cols, db, mask=mask_n)

    return SimpleNamespace(forward=forward, backward=backward)


def _blocks(n: int) -> tuple[int, int, int]:
    block_n = 1 << max(0, n - 1).bit_length()
    block_m = max(1, min(64, 4096 // block_n))  # several short rows per program
    num_warps = min(16, max(1, block_m * block_n // 1024))
    return block_m, block_n, num_warps


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n, eps):
        k = _kernels()
        x2 = x.contiguous().view(-1, n)
        m = x2.shape[0]
        block_m, block_n, warps = _blocks(n)
        y = reg.empty_like(x2)
        mean = reg.empty(m, device=x.device, dtype=torch.float32)
        rstd = reg.empty(m, device=x.device, dtype=torch.float32)
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        w = weight if weight is not None else x2  # any pointer: HAS_W / HAS_B say whether it is read
        b = bias if bias is not None else x2
        k.forward[(_cdiv(m, block_m),)](
            x2,
            y,
            w,
            b,
            mean,
            rstd,
            m,
            n,
            float(eps),
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.n, ctx.shape = n, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        k = _kernels()
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        n = ctx.n
        m = x2.shape[0]
        dy2 = dy.contiguous().view(-1, n)
        block_m, block_n, warps = _blocks(n)
        g = max(1, min(_cdiv(m, block_m), reg.grid_programs(x2.device)))
        need_dx = ctx.needs_input_grad[0]
        dx = reg.empty_like(x2) if need_dx else x2
        pdw = torch.empty(g, n, device=x2.device, dtype=torch.float32)
        pdb = torch.empty(g, n, device=x2.device, dtype=torch.float32)
        k.backward[(g,)](
            x2,
            dy2,
            dx,
            weight if weight is not None else x2,
            mean,
            rstd,
            pdw,
            pdb,
            m,
            n,
            HAS_W=weight is not None,
            NEED_DX=need_dx,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=warps,
        )
        dw = pdw.sum(0).to(weight.dtype).view(weight.shape) if weight is not None and ctx.needs_input_grad[1] else None
        db = pdb.sum(0).to(bias.dtype).view(bias.shape) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx.view(ctx.shape) if need_dx else None), dw, db, None, None


def _ln_value(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *, shape: tuple[int, ...], eps: float
) -> torch.Tensor:
    """Eager's LayerNorm kernel: the lean forward's value and its recompute recipe, bit for bit."""
    return torch.ops.aten.native_layer_norm(x, list(shape), weight, bias, eps)[0]


class _LeanLayerNorm(torch.autograd.Function):
    """LayerNorm through eager's kernels saving the input and per-row (mean, rstd); the output is not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, list(shape), weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, x, list(ctx.shape), mean, rstd, weight, bias, need)
        return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), None, None


def layer_norm_lean(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` saving the input and per-row (mean, rstd), its output a recipe for the layers after it.

    Eager's own kernels (values and gradients are eager's bit for bit); inside ``ops.recompute_saved()`` a
    later layer that saves the output (a Linear) stores how to rebuild it instead.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise FreezeError(
            f"normalized_shape={shape} does not match the input's trailing dimensions "
            f"{tuple(input.shape)}; pass the input's last dimensions"
        )
    reg.record("layer_norm", reg.LEAN)
    y = _LeanLayerNorm.apply(input, weight, bias, shape, float(eps))
    return mark_recomputable(y, functools.partial(_ln_value, shape=shape, eps=float(eps)), input, weight, bias)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    impl: str = "triton",
) -> torch.Tensor:
    """``F.layer_norm`` with Triton forward and backward (rows up to 16384 elements).

    ``impl``: "triton" (Triton where it runs, else the reference), "lean" (``layer_norm_lean``), "auto"
    (Triton on CUDA, lean elsewhere).
    """
    impl = reg.check_impl(impl)
    if reg.lean_here(impl, input):
        return layer_norm_lean(input, normalized_shape, weight, bias, eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(shape)
    ok = (
        len(shape) > 0
        and input.dim() >= len(shape)
        and tuple(input.shape[input.dim() - len(shape) :]) == shape
        and (weight is None or weight.numel() == n)
        and (bias is None or bias.numel() == n)
        and 0 < n <= _MAX_ROW
        and input.numel() > 0
    )
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):  # CUDA autocast: fp32 layer_norm
        input = input.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    path = reg.choose("layer_norm", input, weight, bias, supported=ok)
    if path == reg.REFERENCE:
        if impl == "auto" and ok:
            return layer_norm_lean(input, shape, weight, bias, eps)
        return layer_norm_reference(input, shape, weight, bias, eps)
    with reg.on_device(input):
        return _LayerNorm.apply(input, weight, bias, n, float(eps))
