"""BatchNorm fused with SiLU / ReLU / identity: Triton kernels, autograd wiring, plain-torch reference.

Backward recomputes the normalised value from the saved input and the per-channel (mean, invstd),
so only the input and per-channel vectors are saved; eager BN + SiLU also saves the BN output.
``batch_norm_act_lean`` (``batch_norm_lean.py``) does the same in plain torch with eager's own kernels.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .._errors import FreezeError
from . import _registry as reg
from .activation import act_forward, check_activation
from .batch_norm_lean import _check_args, batch_norm_act_lean
from .recompute import mark_recomputable

_ACTS = {"silu": 0, "relu": 1, "identity": 2}


def _act_code(activation: str | None) -> int:
    name = "identity" if activation is None else activation
    if name not in _ACTS:
        raise FreezeError(f"activation={activation!r} is not supported; use one of {sorted(_ACTS)} or None")
    return _ACTS[name]


def batch_norm_act_reference(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``act(F.batch_norm(...))`` in plain torch: what the Triton and lean paths must match."""
    act = check_activation(activation)
    return act_forward(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps), act)


@functools.cache
def _kernels() -> SimpleNamespace:
    # Defined on first use, so importing this module never imports triton, and so the kernels
    # see TRITON_INTERPRET as it is when they first run (conftest sets it before that).
    # Triton (compiler and interpreter alike) resolves names in a kernel through the module's
    # globals, not closures: bind triton, tl and the helper kernels there, on first use.
    global triton, tl, _tile, _act_fwd, _act_bwd
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(t, NSB, offs_s0, offs_c, S, C, sN, BLOCK_S: tl.constexpr, CL: tl.constexpr):
        # Tile t of the (N, C, S) view: batch item n, spatial block sb; returns offsets and masks.
        # The unit stride is a literal so the compiler sees contiguity (vector loads, coalescing).
        n = t // NSB
        sb = t - n * NSB
        offs_s = sb * BLOCK_S + offs_s0
        mask_s = offs_s < S
        if CL:  # rows of C channels, channels contiguous
            offs = offs_s[:, None].to(tl.int64) * C + offs_c[None, :]
        else:  # NCHW: each (n, c) plane is S contiguous elements
            offs = n.to(tl.int64) * sN + offs_c[None, :].to(tl.int64) * S + offs_s[:, None]
        mask = mask_s[:, None] & (offs_c < C)[None, :]
        return offs, mask, mask_s

    @triton.jit
    def _act_fwd(z, ACT: tl.constexpr):
        if ACT == 0:
            z = z / (1.0 + tl.exp(-z))
        elif ACT == 1:
            z = tl.maximum(z, 0.0)
        return z

    @triton.jit
    def _act_bwd(z, dy, ACT: tl.constexpr):
        if ACT == 0:
            s = 1.0 / (1.0 + tl.exp(-z))
            dy = dy * (s * (1.0 + z * (1.0 - s)))
        elif ACT == 1:
            dy = tl.where(z > 0.0, dy, 0.0)
        return dy

    @triton.jit
    def stats(
        x_ptr,
        cnt_ptr,
        mean_ptr,
        m2_ptr,
        N,
        C,
        S,
        sN,
        NSB,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CL: tl.constexpr,
    ):
        # Per-program Welford partials (count, mean, M2) per channel, merged tile by tile (Chan).
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        nk = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s0 = tl.arange(0, BLOCK_S)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(pid_k, N * NSB, nk):
            offs, mask, mask_s = _tile(t, NSB, offs_s0, offs_c, S, C, sN, BLOCK_S, CL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tcnt = tl.sum(mask_s.to(tl.float32), axis=0)
            tmean = tl.sum(x, axis=0) / tcnt
            d = tl.where(mask, x - tmean[None, :], 0.0)
            tm2 = tl.sum(d * d, axis=0)
            new = count + tcnt
            delta = tmean - mean
            mean += delta * (tcnt / new)
            m2 += tm2 + delta * delta * (count * (tcnt / new))
            count = new
        mask_c = offs_c < C
        out = pid_k * C + offs_c
        tl.store(cnt_ptr + out, count, mask=mask_c)
        tl.store(mean_ptr + out, mean, mask=mask_c)
        tl.store(m2_ptr + out, m2, mask=mask_c)

    @triton.jit
    def finalize(
        cnt_ptr,
        pmean_ptr,
        pm2_ptr,
        mean_ptr,
        invstd_ptr,
        rm_ptr,
        rv_ptr,
        C,
        K,
        eps,
        momentum,
        UPDATE: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # Merge the K partials per channel; write mean, invstd; update running stats like F.batch_norm.
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, K):
            pc = tl.load(cnt_ptr + k * C + offs_c, mask=mask_c, other=0.0)
            pmean = tl.load(pmean_ptr + k * C + offs_c, mask=mask_c, other=0.0)
            pm2 = tl.load(pm2_ptr + k * C + offs_c, mask=mask_c, other=0.0)
            new = count + pc
            frac = tl.where(new > 0.0, pc / tl.maximum(new, 1.0), 0.0)
            delta = pmean - mean
            mean += delta * frac
            m2 += pm2 + delta * delta * count * frac
            count = new
        var = m2 / tl.maximum(count, 1.0)  # count is 0 only in masked lanes
        tl.store(mean_ptr + offs_c, mean, mask=mask_c)
        tl.store(invstd_ptr + offs_c, 1.0 / tl.sqrt(var + eps), mask=mask_c)
        if UPDATE:
            rm = tl.load(rm_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (m2 / tl.maximum(count - 1.0, 1.0))
            tl.store(rm_ptr + offs_c, rm.to(rm_ptr.dtype.element_ty), mask=mask_c)
            tl.store(rv_ptr + offs_c, rv.to(rv_ptr.dtype.element_ty), mask=mask_c)

    @triton.jit
    def forward(
        x_ptr,
        y_ptr,
        mean_ptr,
        invstd_ptr,
        w_ptr,
        b_ptr,
        N,
        C,
        S,
        sN,
        NSB,
        ACT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CL: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        nk = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_s0 = tl.arange(0, BLOCK_S)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        scale = w * invstd
        shift = b - mean * scale
        for t in range(pid_k, N * NSB, nk):
            offs, mask, mask_s = _tile(t, NSB, offs_s0, offs_c, S, C, sN, BLOCK_S, CL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _act_fwd(x * scale[None, :] + shift[None, :], ACT)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_reduce(
        x_ptr,
        dy_ptr,
        mean_ptr,
        invstd_ptr,
        w_ptr,
        b_ptr,
        sdz_ptr,
        sdzx_ptr,
        N,
        C,
        S,
        sN,
        NSB,
        ACT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CL: tl.constexpr,
    ):
        # Per-program partial sums of dz and dz * xhat per channel (dz: grad at the BN output).
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        nk = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_s0 = tl.arange(0, BLOCK_S)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        sdz = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        sdzx = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for t in range(pid_k, N * NSB, nk):
            offs, mask, mask_s = _tile(t, NSB, offs_s0, offs_c, S, C, sN, BLOCK_S, CL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * invstd[None, :]
            dz = _act_bwd(xhat * w[None, :] + b[None, :], dy, ACT)
            dz = tl.where(mask, dz, 0.0)
            sdz += dz
            sdzx += dz * xhat
        out = pid_k * C + offs_c
        tl.store(sdz_ptr + out, tl.sum(sdz, axis=0), mask=mask_c)
        tl.store(sdzx_ptr + out, tl.sum(sdzx, axis=0), mask=mask_c)

    @triton.jit
    def backward_input(
        x_ptr,
        dy_ptr,
        dx_ptr,
        mean_ptr,
        invstd_ptr,
        w_ptr,
        b_ptr,
        sdz_ptr,
        sdzx_ptr,
        inv_count,
        N,
        C,
        S,
        sN,
        NSB,
        TRAINING: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CL: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        nk = tl.num_programs(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_s0 = tl.arange(0, BLOCK_S)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        wi = w * invstd
        if TRAINING:
            # batch statistics depend on x: subtract the mean gradient and its projection on xhat
            mdz = tl.load(sdz_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
            mdzx = tl.load(sdzx_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
        for t in range(pid_k, N * NSB, nk):
            offs, mask, mask_s = _tile(t, NSB, offs_s0, offs_c, S, C, sN, BLOCK_S, CL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * invstd[None, :]
            dz = _act_bwd(xhat * w[None, :] + b[None, :], dy, ACT)
            if TRAINING:
                dz = dz - mdz[None, :] - xhat * mdzx[None, :]
            tl.store(dx_ptr + offs, (dz * wi[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(
        stats=stats, finalize=finalize, forward=forward, backward_reduce=backward_reduce, backward_input=backward_input
    )


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _Geometry:
    """The input as an (N, C, S) strided view, tile sizes and grid; shared by forward and backward."""

    def __init__(self, x: torch.Tensor):
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // max(1, n * c)
        self.C = c
        self.channels_last = x.dim() == 2 or x.stride(1) == 1 and (s == 1 or not x.is_contiguous())
        if self.channels_last:  # one row per (n, spatial) position, channels contiguous
            self.N, self.S, self.sN = 1, n * s, 0
            self.BLOCK_C = min(_next_pow2(c), 64)
            self.BLOCK_S = max(16, min(_next_pow2(n * s), 4096 // self.BLOCK_C))
        else:  # NCHW: each (n, c) plane is S contiguous elements
            self.N, self.S, self.sN = n, s, c * s
            self.BLOCK_C = 4
            self.BLOCK_S = max(16, min(_next_pow2(s), 1024))
        self.NSB = -(-self.S // self.BLOCK_S)
        self.warps = 8 if self.BLOCK_S * self.BLOCK_C >= 4096 else 4
        self.grid_c = -(-c // self.BLOCK_C)
        tiles = self.N * self.NSB
        self.K = max(1, min(tiles, reg.grid_programs(x.device) // self.grid_c))
        self.count = n * s

    def args(self) -> tuple[int, ...]:
        return (self.N, self.C, self.S, self.sN, self.NSB)

    def meta(self) -> dict:
        return dict(BLOCK_S=self.BLOCK_S, BLOCK_C=self.BLOCK_C, CL=self.channels_last, num_warps=self.warps)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is NCHW- or channels_last-contiguous, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g laid out with exactly x's strides (the kernels index both with one set of offsets)."""
    if g.stride() == x.stride():
        return g
    return torch.empty_like(x, dtype=g.dtype).copy_(g)


def _triton_value(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    act: int,
    geo: _Geometry | None = None,
) -> torch.Tensor:
    """The forward kernel's ``act(bn(x))`` from saved statistics: the Triton forward and its recompute recipe."""
    k = _kernels()
    geo = geo or _Geometry(x)
    w = weight if weight is not None else torch.ones(geo.C, device=x.device, dtype=torch.float32)
    b = bias if bias is not None else torch.zeros(geo.C, device=x.device, dtype=torch.float32)
    y = reg.empty_like(x)
    with reg.on_device(x):
        k.forward[(geo.grid_c, geo.K)](x, y, mean, invstd, w, b, *geo.args(), ACT=act, **geo.meta())
    return y


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, act):
        k = _kernels()
        x = _dense(x)
        geo = _Geometry(x)
        dev, C = x.device, geo.C
        w = weight if weight is not None else torch.ones(C, device=dev, dtype=torch.float32)
        b = bias if bias is not None else torch.zeros(C, device=dev, dtype=torch.float32)
        if training:
            f32 = dict(device=dev, dtype=torch.float32)
            pcnt = torch.empty(geo.K, C, **f32)
            pmean = torch.empty(geo.K, C, **f32)
            pm2 = torch.empty(geo.K, C, **f32)
            k.stats[(geo.grid_c, geo.K)](x, pcnt, pmean, pm2, *geo.args(), **geo.meta())
            mean = reg.empty(C, **f32)
            invstd = reg.empty(C, **f32)
            update = running_mean is not None
            bc = min(_next_pow2(C), 1024)
            k.finalize[(-(-C // bc),)](
                pcnt,
                pmean,
                pm2,
                mean,
                invstd,
                running_mean if update else mean,
                running_var if update else mean,
                C,
                geo.K,
                float(eps),
                float(momentum),
                UPDATE=update,
                BLOCK_C=bc,
            )
        else:
            # copies: the running buffers may change in place before backward runs
            mean = running_mean.detach().to(torch.float32, copy=True)
            invstd = torch.rsqrt(running_var.detach().float() + eps)
        y = _triton_value(x, mean, invstd, weight, bias, act=act, geo=geo)
        ctx.save_for_backward(x, mean, invstd, w, b)
        ctx.training, ctx.act = training, act
        ctx.has_w, ctx.has_b = weight is not None, bias is not None
        # (mean, invstd) go out too: with them a later save of y can be a recipe (ops.recompute)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean=None, _dinvstd=None):
        k = _kernels()
        x, mean, invstd, w, b = ctx.saved_tensors
        geo = _Geometry(x)
        dy = _like(dy, x)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        C = geo.C
        sdz = sdzx = mean  # placeholders when no reduction is needed
        if ctx.training or need_w or need_b:
            f32 = dict(device=x.device, dtype=torch.float32)
            psdz = torch.empty(geo.K, C, **f32)
            psdzx = torch.empty(geo.K, C, **f32)
            k.backward_reduce[(geo.grid_c, geo.K)](
                x, dy, mean, invstd, w, b, psdz, psdzx, *geo.args(), ACT=ctx.act, **geo.meta()
            )
            sdz, sdzx = psdz.sum(0), psdzx.sum(0)
        dx = None
        if need_x:
            dx = reg.empty_like(x)
            k.backward_input[(geo.grid_c, geo.K)](
                x,
                dy,
                dx,
                mean,
                invstd,
                w,
                b,
                sdz,
                sdzx,
                1.0 / geo.count,
                *geo.args(),
                TRAINING=ctx.training,
                ACT=ctx.act,
                **geo.meta(),
            )
        dw = sdzx.to(w.dtype) if ctx.has_w and need_w else None
        db = sdz.to(b.dtype) if ctx.has_b and need_b else None
        return dx, None, None, dw, db, None, None, None, None


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "silu",
    *,
    impl: str = "triton",
) -> torch.Tensor:
    """``act(F.batch_norm(...))`` in one pass; backward recomputes it from the input (Triton path).

    ``impl``: "triton" (Triton where it runs, else the eager reference), "lean" (``batch_norm_act_lean``),
    "auto" (Triton on CUDA, lean elsewhere).

    Same arguments and running-statistics update as ``F.batch_norm`` (``momentum`` is a float; the
    cumulative average of ``momentum=None`` is ``nn.BatchNorm``'s job, done by ``FusedConvBNAct``).
    """
    impl = reg.check_impl(impl)
    if impl != "triton" and (check_activation(activation) not in _ACTS or reg.lean_here(impl, input)):
        return batch_norm_act_lean(input, running_mean, running_var, weight, bias, training, momentum, eps, activation)
    act = _act_code(activation)
    _check_args(input, running_mean, running_var, training, momentum)
    path = reg.choose("batch_norm_act", input, running_mean, running_var, weight, bias, supported=input.numel() > 0)
    if path == reg.REFERENCE:
        if impl == "auto":  # CUDA tensors Triton cannot take (float64, no triton): still lean
            return batch_norm_act_lean(
                input, running_mean, running_var, weight, bias, training, momentum, eps, activation
            )
        return batch_norm_act_reference(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation
        )
    x = _dense(input)
    with reg.on_device(x):
        y, mean, invstd = _BatchNormAct.apply(
            x, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps), act
        )
    # inside ops.recompute_saved(), a later op saving y stores a recipe: the same kernel on the saved input
    return mark_recomputable(y, functools.partial(_triton_value, act=act), x, mean, invstd, weight, bias)
