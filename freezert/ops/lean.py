"""Lean regions: while a trainable block runs, the ops whose outputs later ops save go through lean versions.

``lean_region()`` (entered around each trainable block by ``ops.substitute``'s lean plan) activates, for the
block's forward only, ``recompute_saved()`` and a ``TorchFunctionMode`` that routes

* ``F.batch_norm`` -> ``batch_norm_lean``, ``F.layer_norm`` -> ``layer_norm_lean``, ``F.dropout`` (training) ->
  ``dropout_lean``, ``F.relu`` / ``silu`` / ``gelu`` / ``hardswish`` / ``relu6`` (``torch.relu``, ``Tensor.relu``)
  -> ``activation``, their in-place forms -> ``activation_``: eager's kernels, outputs marked recomputable;
* ``add`` / ``sub`` / ``mul`` / ``div`` (in place too: a residual ``out += identity``) and ``cat`` with an operand
  that is a recipe -> the same op, its output a recipe over the operands (a residual sum, a gated feature, YOLO's
  concatenated chunks: rebuilt in backward instead of kept, when the operands are kept anyway).

Every other call passes through untouched, and so does everything under ``no_grad`` or inside a
``torch.utils.checkpoint`` region (checkpoint recomputes it anyway). Values, gradients and running statistics are
eager's bit for bit: each lean op calls eager's kernels, and a recipe is the forward's own expression.
"""

from __future__ import annotations

import contextlib
import dis
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import _tree
from . import recompute
from .activation import activation, activation_
from .batch_norm_lean import batch_norm_lean
from .dropout import dropout_lean
from .layer_norm import layer_norm_lean
from .recompute import Snapshot, fresh_recipe, mark_recomputable

_T = torch._C.TensorBase
_DEPTH = [0]  # lean regions entered and not left (nested calls count)

# ``kernels="auto"``: tensors smaller than this run through eager's ops, not the lean ones. A lean op costs a fixed
# amount of Python (its autograd Function, its recipe, the hooks that store it; about 0.1 ms a layer on a CPU) and
# saves bytes in proportion to its tensor: below this size the bytes are few and the time is not (YOLO11n at 320 px,
# batch 2, one CPU thread, step time / saved bytes against naive freezing: lean everywhere 1.065x / 0.45x, from
# 2**16 elements 1.046x / 0.65x, from 2**17 0.997x / 0.74x). ``kernels="lean"`` takes every size.
MIN_ELEMENTS = 2**17
_MIN = [0]  # the threshold of the innermost plan in force (0: every size); see ``small`` and ``thresholded``


def below(elements: int) -> bool:
    """A tensor of ``elements`` elements is below the running plan's size threshold: eager's op is cheaper than
    the lean one there."""
    return elements < _MIN[-1]


def small(t: torch.Tensor) -> bool:
    """``t`` is ``below`` the threshold."""
    return below(t.numel())


@contextlib.contextmanager
def thresholded(min_elements: int) -> Iterator[None]:
    """Within the block, lean ops leave tensors of fewer than ``min_elements`` elements to eager's ops."""
    _MIN.append(min_elements)
    try:
        yield
    finally:
        _MIN.pop()


def _bind(spec: tuple, args: tuple, kwargs: dict) -> list | None:
    """Positional values of ``spec``'s (name, default) parameters from a call; None for an unknown keyword."""
    vals = list(args) + [d for _, d in spec[len(args) :]]
    names = [n for n, _ in spec]
    for k, v in kwargs.items():
        if k not in names:
            return None
        vals[names.index(k)] = v
    return vals


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and (type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter))


def _grad(*ts) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


_BN = (
    ("input", None),
    ("running_mean", None),
    ("running_var", None),
    ("weight", None),
    ("bias", None),
    ("training", False),
    ("momentum", 0.1),
    ("eps", 1e-5),
)


def _batch_norm(func, args, kwargs):
    a = _bind(_BN, args, kwargs)
    if (
        a is None
        or not _plain(a[0])
        or not _grad(a[0], a[3], a[4])
        or a[0].numel() == 0
        or small(a[0])
        or a[0].dim() < 2
        or a[6] is None
        or (not a[5] and (a[1] is None or a[2] is None))
    ):
        return func(*args, **kwargs)
    if a[5]:
        F._verify_batch_size(a[0].size())
    return batch_norm_lean(*a)


_LN = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))


def _layer_norm(func, args, kwargs):
    a = _bind(_LN, args, kwargs)
    if a is None or not _plain(a[0]) or not _grad(a[0], a[2], a[3]) or a[0].numel() == 0 or small(a[0]):
        return func(*args, **kwargs)
    x = a[0]
    if torch.is_autocast_enabled(x.device.type):
        if x.device.type != "cuda":  # CPU autocast leaves layer_norm alone (it runs in the input's dtype)
            if x.device.type != "cpu":
                return func(*args, **kwargs)
        else:  # CUDA autocast runs layer_norm in float32: cast as its policy does
            a[0], a[2], a[3] = (
                None if t is None else t.float() if t.is_floating_point() else t for t in a[0:1] + a[2:4]
            )
    shape = (a[1],) if isinstance(a[1], int) else tuple(a[1])
    return layer_norm_lean(a[0], shape, a[2], a[3], a[4])


def _act(name: str, spec: tuple, inplace_default: bool = False):
    def handler(func, args, kwargs):
        a = _bind(spec, args, kwargs)
        if a is None or not _plain(a[0]) or not a[0].requires_grad or small(a[0]):
            return func(*args, **kwargs)
        if len(a) > 1 and name == "gelu":
            return (
                activation(a[0], "gelu" if a[1] == "none" else "gelu_tanh")
                if a[1] in ("none", "tanh")
                else func(*args, **kwargs)
            )
        inplace = inplace_default or (len(a) > 1 and bool(a[1]))
        return activation_(a[0], name) if inplace else activation(a[0], name)

    return handler


def _dropout(func, args, kwargs):
    a = _bind((("input", None), ("p", 0.5), ("training", True), ("inplace", False)), args, kwargs)
    if (
        a is None
        or not _plain(a[0])
        or not a[0].requires_grad
        or not a[2]
        or a[3]
        or not 0.0 < a[1] < 1.0
        or small(a[0])
    ):
        return func(*args, **kwargs)
    return dropout_lean(a[0], float(a[1]))


def _recall(*leaves, func, spec, dtype=None):
    args, kwargs = _tree.unflatten(list(leaves), spec)
    out = func(*args, **kwargs)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def _marked_operand(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if fresh_recipe(a)[0] is not None:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and fresh_recipe(t)[0] for t in a):
            return True
    return False


def _compose(func, args, kwargs):
    """An elementwise op or cat with a recipe operand: its output is a recipe over the operands."""
    out = func(*args, **kwargs)
    if isinstance(out, torch.Tensor) and out.requires_grad and _marked_operand(args):
        leaves, spec = _tree.flatten((args, kwargs))
        mark_recomputable(out, functools.partial(_recall, func=func, spec=spec), *leaves)
    return out


def _compose_inplace(outofplace):
    def handler(func, args, kwargs):
        x = args[0] if args else None
        if not _plain(x):
            return func(*args, **kwargs)
        r, view = fresh_recipe(x)
        if r is None or view is not None:  # the overwritten value must be a recipe (and not a view's base)
            return func(*args, **kwargs)
        leaves, spec = _tree.flatten((args, kwargs))
        before = [Snapshot(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        dtype = x.dtype
        out = func(*args, **kwargs)
        if out is x and out.requires_grad:
            # computed out of place in the common dtype, then cast to self's: what the in-place op does
            mark_recomputable(out, functools.partial(_recall, func=outofplace, spec=spec, dtype=dtype), *before)
        return out

    return handler


_X = (("input", None), ("inplace", False))
_HANDLERS = {
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.dropout: _dropout,
    F.relu: _act("relu", _X),
    torch.relu: _act("relu", (("input", None),)),
    _T.relu: _act("relu", (("input", None),)),
    torch.relu_: _act("relu", (("input", None),), True),
    _T.relu_: _act("relu", (("input", None),), True),
    F.silu: _act("silu", _X),
    F.hardswish: _act("hardswish", _X),
    F.relu6: _act("relu6", _X),
    F.gelu: _act("gelu", (("input", None), ("approximate", "none"))),
    torch.cat: _compose,
    torch.concat: _compose,
    torch.concatenate: _compose,
}
for _name in ("add", "sub", "mul", "div"):
    _HANDLERS[getattr(_T, _name)] = _compose
    _HANDLERS[getattr(torch, _name)] = _compose
    _HANDLERS[getattr(_T, _name + "_")] = _compose_inplace(getattr(_T, _name))
_HANDLERS[torch.Tensor.__rsub__] = _compose
_HANDLERS[torch.Tensor.__rdiv__] = _compose


def _writes(func, args, kwargs) -> bool:
    """True for an in-place op on its first argument (``add_``, ``x[i] = v``, ``F.relu(x, inplace=True)``)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    return (
        name in _INPLACE_DUNDERS or bool(kwargs.get("inplace")) or (func in _INPLACE_AT and len(args) > 1 and args[1])
    )


_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}
# functional forms with a positional inplace argument, and its position
_INPLACE_AT = {f: 1 for f in (F.relu, F.silu, F.hardswish, F.relu6, F.hardsigmoid, F.mish, F.selu)}
_INPLACE_AT.update({F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.dropout: 3, F.hardtanh: 3, F.threshold: 3})


# functions the mode passes straight through: no handler, and no write unless an ``inplace=`` keyword says so
_PLAIN: set = set()


def _plain_func(func) -> bool:
    name = getattr(func, "__name__", "")
    return (
        func not in _HANDLERS
        and func not in _INPLACE_AT
        and name not in _INPLACE_DUNDERS
        and not (name.endswith("_") and not name.endswith("__"))
    )


class _LeanMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            plain = func in _PLAIN
        except TypeError:  # an unhashable callable
            plain = False
        if plain and not (kwargs and kwargs.get("inplace")):  # conv2d, view, chunk, softmax, ...: most calls
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and _writes(func, args, kwargs):
            recompute.note_edit(args[0])
        handler = _HANDLERS.get(func)
        if handler is None:
            if not plain and _plain_func(func):
                _PLAIN.add(func)
            return func(*args, **kwargs)
        if not torch.is_grad_enabled() or not recompute.active():
            return func(*args, **kwargs)
        return handler(func, args, kwargs)


def routing_paused():
    """Take a lean region's mode off the torch function stack while a lean module runs its own code (its convolution
    needs no routing: one Python call less per op); returns what ``resume_routing`` puts back (None: nothing)."""
    if _routing():
        return torch._C._pop_torch_function_stack()
    return None


def resume_routing(mode) -> None:
    if mode is not None:
        torch._C._push_on_torch_function_stack(mode)


@contextlib.contextmanager
def saving_region() -> Iterator[None]:
    """Saves inside the block go through ``recompute_saved()`` (recipes, in-place checks); no op routing. Inside a
    region whose hooks are innermost already, nothing more is entered (a second layer would wrap each save twice)."""
    if recompute.active():
        yield
        return
    with recompute.recompute_saved():
        yield


# what a forward's own code must mention for the routing to matter there: arithmetic on tensors, cat, and the
# functional forms of the ops above (module calls are swapped instead; the routing costs a Python call per op)
_OPS = {"+", "-", "*", "/", "+=", "-=", "*=", "/="}
_OLD_OPS = {"BINARY_ADD", "BINARY_SUBTRACT", "BINARY_MULTIPLY", "BINARY_TRUE_DIVIDE"}
_OLD_OPS |= {"INPLACE_ADD", "INPLACE_SUBTRACT", "INPLACE_MULTIPLY", "INPLACE_TRUE_DIVIDE"}
_NAMES = {"cat", "concat", "concatenate", "add", "sub", "mul", "div"}
_NAMES |= {"relu", "silu", "gelu", "hardswish", "relu6", "dropout", "batch_norm", "layer_norm"}


def _code_composes(code, owner: type | None, globs: dict, depth: int = 2) -> bool:
    """The code, or a method of ``owner`` / a module-level function it calls (``depth`` levels), does arithmetic,
    a cat, an in-place write or a functional activation."""
    for ins in dis.get_instructions(code):
        if ins.opname == "BINARY_OP" and ins.argrepr in _OPS or ins.opname in _OLD_OPS:
            return True
        if ins.opname == "STORE_SUBSCR":  # x[i] = v writes x in place: the region notes it
            return True
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL") and isinstance(ins.argval, str):
            name = ins.argval
            if name in _NAMES or (name.endswith("_") and not name.endswith("__")):  # any in-place method
                return True
            if depth > 0:  # self.helper(x) or helper(x): its code writes too, while the tensors are alive
                fn = getattr(owner, name, None) if ins.opname != "LOAD_GLOBAL" and owner is not None else None
                fn = fn if fn is not None else (globs.get(name) if ins.opname == "LOAD_GLOBAL" else None)
                sub = getattr(fn, "__code__", None)
                if sub is not None and not isinstance(fn, type) and fn is not getattr(torch.nn.Module, name, None):
                    if _code_composes(sub, owner, getattr(fn, "__globals__", {}), depth - 1):
                        return True
    return False


@functools.cache
def _class_composes(cls: type) -> bool:
    fwd = cls.forward
    code = getattr(fwd, "__code__", None)
    return code is not None and fwd is not torch.nn.Module.forward and _code_composes(code, cls, fwd.__globals__)


def composes(m: torch.nn.Module) -> bool:
    """True when ``m``'s own forward code (not its children's; its own helpers included) does something a lean
    region routes or must see: arithmetic, cat, functional activations, in-place writes."""
    return _class_composes(type(m))


def _routing() -> bool:
    """A lean region's mode is the innermost torch function mode now, and enabled."""
    n = torch._C._len_torch_function_stack()
    return n > 0 and torch._C._is_torch_function_enabled() and type(torch._C._get_function_stack_at(n - 1)) is _LeanMode


@contextlib.contextmanager
def lean_region() -> Iterator[None]:
    """Within the block, the ops above run lean and their outputs are kept as recipes (see the module docstring).
    A region entered inside another one (a Bottleneck inside a C2f) adds nothing: the outer mode routes its ops
    already, and a second mode would run every op through both."""
    _DEPTH[0] += 1
    try:
        if _routing() and recompute.active():
            yield
        else:
            with saving_region(), _LeanMode():
                yield
    finally:
        _DEPTH[0] -= 1


def in_region() -> bool:
    """True while a lean region runs."""
    return _DEPTH[0] > 0
