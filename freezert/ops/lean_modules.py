"""Module swaps of the lean path: BatchNorm, LayerNorm, activations (in place too), dropout, Python-formula
activations and Llama's RMSNorm, each computing exactly what the module it replaces computes.

Each replacement is a shell around the original module: it shares the original's parameter, buffer and child
dicts (``parameters()``, ``state_dict()`` keys and ``.to()`` moves are the original's), reads and writes
``training`` through to it, and falls back to it for any other attribute (``bn.eps``, ``act.inplace``). It
calls the original unchanged when there is nothing to save (``no_grad``, or no input or parameter needing grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import recompute
from .activation import activation, activation_, elementwise
from .batch_norm_lean import _bn_act as bn_act
from .batch_norm_lean import batch_norm_lean, module_step
from .dropout import dropout_lean
from .layer_norm import layer_norm_lean
from .lean import below, resume_routing, routing_paused, small
from .rms_norm import rms_norm_lean

_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward
# torch's global module hooks (the dicts themselves: registering adds to them)
_GLOBAL_PRE = nn.modules.module._global_forward_pre_hooks
_GLOBAL_POST = nn.modules.module._global_forward_hooks


class _Shell(nn.Module):
    """Shares the wrapped module's parameters, buffers and children; ``training`` and attributes pass through."""

    def __init__(self, inner: nn.Module):
        object.__setattr__(self, "_inner", inner)
        mode = inner.training
        super().__init__()  # sets training = True, which passes through: put the original's mode back
        inner.training = mode
        self._parameters = inner._parameters
        self._buffers = inner._buffers
        self._modules = inner._modules

    @property
    def training(self) -> bool:  # nn.Module.train() sets it on every module it walks: keep the original in step
        return self._inner.training

    @training.setter
    def training(self, mode: bool) -> None:
        self._inner.training = mode

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def extra_repr(self) -> str:
        return repr(self._inner)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _eager(fn, input: torch.Tensor) -> torch.Tensor:
    """``fn(input)`` through eager's ops, for a tensor below the plan's size threshold (``lean.small``): past the
    recompute hooks where ``input`` is no recipe (autograd keeps and checks the saves natively, no Python per
    save), else under them."""
    paused = recompute.pause(input)
    try:
        return fn(input)
    finally:
        recompute.resume(paused)


def _conv_out_elements(conv: nn.Module, input: torch.Tensor) -> int:
    """About how many elements ``conv(input)`` makes: the input's, times out over in channels, over the strides (times
    them for a transposed convolution): a size decision made before the convolution runs, so the whole layer can
    take eager's path."""
    n = input.numel() // max(1, conv.in_channels) * conv.out_channels
    for s in conv.stride:
        n = n * s if conv.transposed else n // max(1, s)
    return n


def _bn_call(bn: nn.Module, input: torch.Tensor) -> tuple:
    """``nn.BatchNorm*.forward``'s checks and bookkeeping for one call on ``input``: the functional arguments after
    the input (``module_step``)."""
    bn._check_input_dim(input)
    args = module_step(bn)
    if args[4]:  # batch statistics
        F._verify_batch_size(input.size())
    return args


class LeanBatchNorm(_Shell):
    """``nn.BatchNorm1d/2d/3d`` (not subclasses with their own forward) through ``batch_norm_lean``: the same
    bookkeeping (``num_batches_tracked``, cumulative ``momentum=None``), eager's kernel; the output a recipe."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self._inner
        if not _needs_grad(input, bn.weight, bn.bias) or type(input) is not torch.Tensor:
            return bn(input)
        if small(input):
            return _eager(bn, input)
        with torch._C.DisableTorchFunction():  # a lean region's mode around us has nothing to do in here
            return batch_norm_lean(input, *_bn_call(bn, input))


class LeanConvBNAct(_Shell):
    """A module computing ``act(bn(conv(x)))`` (an ``nn.Sequential`` of the three, Ultralytics' ``Conv``) with
    BN and the activation as one ``batch_norm_act_lean``: one autograd node and one recipe instead of two of each
    (the same bytes kept and the same values, bit for bit; less Python per layer). ``conv`` runs as a module, so
    its hooks fire."""

    def __init__(self, inner: nn.Module, names: tuple[str, str, str], act: str):
        super().__init__(inner)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_act", act)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        inner = self._inner
        names = self._names
        mods = inner._modules
        conv, bn = mods[names[0]], mods[names[1]]
        if type(input) is not torch.Tensor or not torch.is_grad_enabled():
            return inner(input)
        w, b = bn._parameters.get("weight"), bn._parameters.get("bias")
        if not (
            input.requires_grad
            or conv._parameters["weight"].requires_grad
            or (w is not None and w.requires_grad)
            or (b is not None and b.requires_grad)
        ):
            return inner(input)
        # a lean region's mode has nothing to route in here, unless hooks on the convolution run user code (which
        # the mode must see: an in-place edit of a recipe)
        hooked = conv._forward_pre_hooks or conv._forward_hooks or _GLOBAL_PRE or _GLOBAL_POST
        mode = None if hooked else routing_paused()
        try:
            if below(_conv_out_elements(conv, input)):  # the whole layer eager, the convolution's saves too
                return _eager(inner, input)
            z = conv(input)
            if type(z) is not torch.Tensor:
                return mods[names[2]](bn(z))
            with torch._C.DisableTorchFunction():
                mean, var, weight, bias, batch, momentum, eps = _bn_call(bn, z)
                return bn_act(z, mean, var, weight, bias, bool(batch), float(momentum), float(eps), self._act)
        finally:
            resume_routing(mode)

    def extra_repr(self) -> str:
        return f"{self._names}, {self._act}"


class LeanLayerNorm(_Shell):
    """``nn.LayerNorm`` through ``layer_norm_lean`` (eager's kernels; the output a recipe)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        ln = self._inner
        if (
            not _needs_grad(input, ln.weight, ln.bias)
            or type(input) is not torch.Tensor
            or (torch.is_autocast_enabled(input.device.type) and input.device.type != "cpu")
        ):  # CUDA autocast runs layer_norm in float32: leave that to eager
            return ln(input)
        if small(input):
            return _eager(ln, input)
        with torch._C.DisableTorchFunction():
            return layer_norm_lean(input, tuple(ln.normalized_shape), ln.weight, ln.bias, ln.eps)


class LeanActivation(_Shell):
    """An activation module (``nn.ReLU``/``SiLU``/``GELU``/``Hardswish``/``ReLU6``, transformers' one-call ones)
    through ``activation`` (saves its input; the output a recipe) or, in place, ``activation_``."""

    def __init__(self, inner: nn.Module, name: str):
        super().__init__(inner)
        object.__setattr__(self, "_name", name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _needs_grad(input) or type(input) is not torch.Tensor:
            return self._inner(input)
        if small(input):
            return _eager(self._inner, input)
        with torch._C.DisableTorchFunction():
            if getattr(self._inner, "inplace", False):
                return activation_(input, self._name)
            return activation(input, self._name)

    def extra_repr(self) -> str:
        return self._name


class LeanDropout(_Shell):
    """``nn.Dropout`` in training through ``dropout_lean`` (eager's draws; a bool mask kept; the output a recipe)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        d = self._inner
        if (
            not (d.training and 0.0 < d.p < 1.0 and not d.inplace and _needs_grad(input))
            or type(input) is not torch.Tensor
        ):
            return d(input)
        if small(input):
            return _eager(d, input)
        with torch._C.DisableTorchFunction():
            return dropout_lean(input, float(d.p))


class LeanElementwise(_Shell):
    """A parameter-free elementwise activation module (a Python formula) through ``ops.elementwise``: keeps the
    input only, reruns the module's formula under autograd in backward (eager's formulas, eager's order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_grad(x) or type(x) is not torch.Tensor:
            return self._inner(x)
        if small(x):
            return _eager(self._inner, x)
        with torch._C.DisableTorchFunction():
            return elementwise(x, self._inner.forward)


class LeanRMSNorm(_Shell):
    """transformers' Llama-style RMSNorm through ``rms_norm_lean`` (Llama's formula; exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._inner
        if not _needs_grad(x, norm.weight) or type(x) is not torch.Tensor:
            return norm(x)
        if small(x):
            return _eager(norm, x)
        with torch._C.DisableTorchFunction():
            return rms_norm_lean(x, norm.weight, norm.variance_epsilon)


def plain_batch_norm(m: nn.Module) -> bool:
    """An ``nn.BatchNorm1d/2d/3d`` whose forward is torch's own (not SyncBatchNorm, not timm's BatchNormAct)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward is _BN_FORWARD
