"""BatchNorm (and BatchNorm + activation) on the lean path: eager's own kernels, outputs kept as recipes.

``batch_norm_lean`` is ``F.batch_norm`` through the kernel eager picks (``_batch_norm_impl_index``: native on CPU,
cuDNN where eager uses it), saving what eager's backward reads (the input and the batch statistics); its output
is marked recomputable, so a later op that saves it (an activation, a convolution) keeps a recipe instead.
``batch_norm_act_lean`` fuses the activation: it saves only the BN input and statistics (eager also keeps the BN
output for the activation's backward) and rebuilds that output in backward.

The rebuild from saved batch statistics must equal the forward bit for bit. On CPU, eager's train-mode kernel
computes ``x * a + b`` with ``a = invstd * weight``, ``b = bias - mean * a``; its eval-mode kernel computes the
same from running statistics, so eval mode with weight ``a`` and a variance whose ``1/sqrt(var + eps)`` is exactly
1 reproduces it without a statistics pass. ``_exact.choose`` checks that per device, dtype and layout, and falls
back to ``batch_norm_elemt`` (CUDA) or to recomputing the statistics (always exact, one more reduction).
"""

from __future__ import annotations

import functools

import torch

from .._errors import FreezeError
from . import _exact, recompute
from . import _registry as reg
from .activation import act_backward, act_forward, check_activation
from .recompute import _compiling

aten = torch.ops.aten


def _cudnn() -> bool:
    return bool(torch.backends.cudnn.enabled)


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "strided"


_impl_index = torch._batch_norm_impl_index  # eager's own entry (the binding is cheaper than torch.ops.aten's)
_impl_index_backward = torch.ops.aten._batch_norm_impl_index_backward.default


def _stats_forward(x, weight, bias, eps: float) -> torch.Tensor:
    """Train-mode BN of ``x`` with its own batch statistics recomputed (running statistics untouched)."""
    return _impl_index(x, weight, bias, None, None, True, 0.0, eps, _cudnn())[0]


_UNIT: dict = {}  # (channels, dtype, device, eps) -> the variance whose 1/sqrt(var + eps) is exactly 1


def _unit(mean: torch.Tensor, eps: float) -> torch.Tensor:
    key = (mean.numel(), mean.dtype, mean.device, eps)
    one = _UNIT.get(key)
    if one is None:
        one = torch.full_like(mean, 1.0) - eps
        if not bool(((one + eps) == 1.0).all()):
            raise RuntimeError("no variance gives a unit scale at this eps")
        _UNIT[key] = one
    return one


def _eval_alpha(x, weight, bias, mean, invstd, eps: float) -> torch.Tensor:
    """Eval-mode kernel with weight ``invstd * weight`` and unit ``1/sqrt(var + eps)``: CPU's train-mode arithmetic."""
    dt = mean.dtype
    if (weight is not None and weight.dtype != dt) or (bias is not None and bias.dtype != dt):
        raise RuntimeError("parameters in another dtype than the statistics: the kernel would round the scale")
    alpha = invstd if weight is None else invstd * weight
    return torch.native_batch_norm(x, alpha, bias, mean, _unit(mean, eps), False, 0.0, eps)[0]


_CANDIDATES = {
    "eval_alpha": _eval_alpha,
    "elemt": lambda x, w, b, mean, invstd, eps: torch.batch_norm_elemt(x, w, b, mean, invstd, eps),
    "stats": lambda x, w, b, mean, invstd, eps: _stats_forward(x, w, b, eps),
}


_HOW: dict = {}  # a cheap key of the common case (contiguous) -> _rebuild_how's answer


def _rebuild_how(x, weight, bias, eps: float) -> str | None:
    """The exact train-mode rebuild for this case (probed once per device, dtypes, layout)."""
    quick = None
    if x.is_contiguous():
        quick = (
            x.dtype,
            x.device,
            x.dim(),
            x.numel() == x.shape[0] * x.shape[1] and x.numel() > 0,  # spatial == 1 below
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
            _cudnn(),
        )
        how = _HOW.get(quick, False)
        if how is not False:
            return how
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    key = (
        "bn",
        x.device.type,
        x.dtype,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        _layout(x),
        x.dim(),
        spatial == 1,
        _cudnn(),
    )

    def probe():
        xp = _exact.random_like(x, 1)
        wp = None if weight is None else _exact.random_like(weight, 2)
        bp = None if bias is None else _exact.random_like(bias, 3)
        want, mean, invstd = _impl_index(xp, wp, bp, None, None, True, 0.0, eps, _cudnn())[:3]
        return want, [(n, functools.partial(f, xp, wp, bp, mean, invstd, eps)) for n, f in _CANDIDATES.items()]

    if key not in _exact._CHOSEN:
        want, cands = probe()
        _exact.choose(key, lambda: want, cands)
    how = _exact._CHOSEN[key]
    if quick is not None:
        _HOW[quick] = how
    return how


def _train_value(x, weight, bias, mean, invstd, *, eps: float, how: str) -> torch.Tensor:
    return _CANDIDATES[how](x, weight, bias, mean, invstd, eps)


def _eval_value(x, weight, bias, mean, var, *, eps: float) -> torch.Tensor:
    return _impl_index(x, weight, bias, mean, var, False, 0.0, eps, _cudnn())[0]


def _bn_forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Eager's BN kernel; saves what its backward reads. Returns (z, s1, s2): batch (mean, invstd) in train mode,
    copies of the running statistics in eval mode (the buffers may change in place before backward)."""
    if training:
        z, s1, s2, reserve, idx = _impl_index(x, weight, bias, running_mean, running_var, True, momentum, eps, _cudnn())
        stats = (s1, s2)
        ctx.save_for_backward(x, weight, s1, s2, reserve)
    else:
        stats = (running_mean.detach().clone(), running_var.detach().clone())
        z, s1, s2, reserve, idx = _impl_index(x, weight, bias, stats[0], stats[1], False, momentum, eps, _cudnn())
        ctx.save_for_backward(x, weight, s1, s2, reserve, *stats)
    ctx.training, ctx.eps, ctx.idx, ctx.has_bias = training, eps, idx, bias is not None
    # the rebuild of the output needs the bias, which eager's backward does not read (so autograd does not keep it)
    ctx.bias = bias.detach() if bias is not None else None
    ctx.bias_version = bias._version if bias is not None else 0
    ctx.mark_non_differentiable(*stats)
    return z, stats


def _bn_backward(ctx, dz, saved):
    """Eager's BN backward (``_batch_norm_impl_index_backward``) on the saved tensors."""
    if ctx.training:
        x, weight, s1, s2, reserve = saved
        rm = rv = None
    else:
        x, weight, s1, s2, reserve, rm, rv = saved
    need = [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[3],
        ctx.has_bias and ctx.needs_input_grad[4],
    ]
    dx, dw, db = _impl_index_backward(ctx.idx, x, dz, weight, rm, rv, s1, s2, ctx.training, ctx.eps, need, reserve)
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None)


class _LeanBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` through eager's kernels; the output is not kept (a recipe when a later op saves it)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        z, stats = _bn_forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps)
        return (z, *stats)

    @staticmethod
    def backward(ctx, dz, _d1=None, _d2=None):
        saved = ctx.saved_tensors
        recompute.release(ctx)
        dx, dw, db = _bn_backward(ctx, dz, saved)
        return dx, None, None, dw, (db if ctx.has_bias else None), None, None, None


def _saved_args(node) -> tuple:
    """A lean BN node's ``(input, weight, bias, s1, s2)`` for a rebuild of its output: its own saved tensors (each
    checked for in-place edits as autograd checks saves) and its bias, which must be as the forward read it."""
    saved = node.saved_tensors
    stats = (saved[2], saved[3]) if node.training else (saved[5], saved[6])
    return saved[0], saved[1], _bias(node), *stats


def _bias(node) -> torch.Tensor | None:
    """The bias a lean BN node's forward read, for a rebuild of its output; eager's backward does not read it, so
    an in-place write since (an optimizer step before backward) is refused here, not silently folded in."""
    bias = node.bias
    if bias is not None and bias._version != node.bias_version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: a "
            f"BatchNorm bias {list(bias.shape)} was written in place between the forward and the backward "
            "(freezert rebuilds the normalised output from it); step the optimizer after backward, or pass "
            "kernels=False"
        )
    return bias


def _rebuild_bn(node, value) -> torch.Tensor:
    """The output of a lean BatchNorm node, from its saves."""
    return value(*_saved_args(node))


def _rebuild_bn_act(node, value, act: str, stash: list) -> torch.Tensor:
    """The output of a lean BN + act node, from its saves; the BN output goes to the node's stash."""
    return _bn_act_value(*_saved_args(node), bn=value, act=act, stash=stash)


def _check_args(input, running_mean, running_var, training, momentum) -> None:
    if momentum is None:
        raise FreezeError(
            "momentum=None is not a batch_norm_act argument; pass 1/num_batches_tracked "
            "as nn.BatchNorm does (FusedConvBNAct does this for you)"
        )
    if input.dim() < 2:
        raise FreezeError(f"batch_norm_act expects (N, C, ...) input, got shape {tuple(input.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise FreezeError(
            "batch_norm_act in eval mode needs running_mean and running_var "
            "(pass training=True to normalise with batch statistics)"
        )
    if training:
        per_channel = input.numel() // max(1, input.shape[1])
        if per_channel <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {list(input.shape)}"
            )


_PARTIALS: dict = {}  # (training, eps, how) -> the recipe function (one object per case, not one per call)


def _partial(training: bool, eps: float, how: str | None):
    fn = _PARTIALS.get((training, eps, how), False)
    if fn is False:
        if not training:
            fn = functools.partial(_eval_value, eps=eps)
        else:
            fn = None if how is None else functools.partial(_train_value, eps=eps, how=how)
        _PARTIALS[(training, eps, how)] = fn
    return fn


def _value_fn(x, weight, bias, training: bool, eps: float):
    """The recipe rebuilding the BN output from (x, weight, bias, s1, s2), or None where none is exact."""
    if not training:
        return _partial(False, eps, None)
    # torch.compile traces no probe (and no recipe: marks are skipped there): recompute the statistics
    how = "stats" if _compiling() else _rebuild_how(x, weight, bias, eps)
    return _partial(True, eps, how)


def module_step(bn) -> tuple:
    """``nn.BatchNorm*.forward``'s bookkeeping for one call of ``bn``, verbatim in effect (``num_batches_tracked``
    counted, a cumulative average for ``momentum=None``): the arguments of the functional call after ``input``,
    ``(running_mean, running_var, weight, bias, use_batch_statistics, momentum_factor, eps)``."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    mean, var = (bn.running_mean, bn.running_var) if track else (None, None)
    return mean, var, bn.weight, bn.bias, use_batch, factor, bn.eps


def batch_norm_lean(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` with eager's values, gradients and running statistics, its output a recipe for later saves."""
    _check_args(input, running_mean, running_var, training, momentum)
    reg.record("batch_norm", reg.LEAN)
    z, s1, s2 = recompute.apply_past_hooks(
        _LeanBatchNorm, input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps)
    )
    fn = _value_fn(input, weight, bias, bool(training), float(eps))
    if fn is None or _compiling() or z.grad_fn is None:
        return z
    # inside ops.recompute_saved(), a later op saving z keeps this recipe: the node's own saves, read in backward
    return recompute.mark_from_node(z, functools.partial(_rebuild_bn, z.grad_fn, fn), input)


def _bn_act_value(x, weight, bias, s1, s2, *, bn, act: str, stash: list | None = None) -> torch.Tensor:
    z = bn(x, weight, bias, s1, s2)
    if stash is not None and not torch.is_grad_enabled():
        # rebuilt in backward for the op that saved the output: the node's own backward, which comes next on this
        # path, needs the same BN output (one pass less; it takes the value and lets it go)
        stash[0] = z
    return act_forward(z, act)


class _LeanBatchNormAct(torch.autograd.Function):
    """BN + act through eager's kernels, saving only the BN input and statistics; any device."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, act, value):
        z, stats = _bn_forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps)
        ctx.act, ctx.value = act, value
        return (act_forward(z, act), *stats)

    @staticmethod
    def backward(ctx, dy, _d1=None, _d2=None):
        saved = ctx.saved_tensors
        recompute.release(ctx)
        x, weight = saved[0], saved[1]
        stats = (saved[2], saved[3]) if ctx.training else (saved[5], saved[6])
        stash = getattr(ctx, "stash", None)
        z = stash[0] if stash is not None else None
        if z is not None:  # rebuilt a moment ago by the recipe of this op's output (same inputs, same bits)
            stash[0] = None
        elif ctx.value is not None:  # the BN output, rebuilt exactly from the saved statistics
            z = ctx.value(x, weight, _bias(ctx), *stats)
        else:
            z = _stats_forward(x, weight, _bias(ctx), ctx.eps)
        dz = act_backward(z, dy, ctx.act)
        del z
        dx, dw, db = _bn_backward(ctx, dz, saved)
        return dx, None, None, dw, (db if ctx.has_bias else None), None, None, None, None, None


def batch_norm_act_lean(
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
    """``act(F.batch_norm(...))`` as a plain-torch autograd Function saving the input and (mean, invstd).

    Any device and dtype; activations as in ``freezert.ops.activation``. Values, gradients and running statistics
    are eager's bit for bit; backward rebuilds the BN output without a statistics pass where that is exact."""
    act = check_activation(activation)
    _check_args(input, running_mean, running_var, training, momentum)
    return _bn_act(input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps), act)


def _bn_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    act: str,
) -> torch.Tensor:
    """``batch_norm_act_lean`` once its arguments are checked (``LeanConvBNAct`` calls it with a module's)."""
    reg.record("batch_norm_act", reg.LEAN)
    value = _value_fn(input, weight, bias, training, eps)
    # its saves (the input, statistics) are no recipes: autograd keeps them, not the recompute hooks
    y, s1, s2 = recompute.apply_past_hooks(
        _LeanBatchNormAct, input, running_mean, running_var, weight, bias, training, momentum, eps, act, value
    )
    if value is None or _compiling():  # (torch.compile keeps no recipe)
        return y
    node = y.grad_fn
    if node is None:
        return y
    # inside ops.recompute_saved(), a later op saving y keeps this recipe: the node's own saves (the BN input and
    # statistics), read and normalised again in backward; the rebuilt BN output is handed on to the node itself
    node.stash = stash = [None]
    return recompute.mark_from_node(y, functools.partial(_rebuild_bn_act, node, value, act, stash), input)
