"""Saved activations stored as a recipe: a fused op's output that a later op saves is recomputed in backward.

A lean Conv-BN-act saves its input ``y`` anyway; when the next convolution saves the activation ``a`` too,
eager keeps both. Inside ``recompute_saved()`` a tensor marked by ``mark_recomputable(a, fn, *args)`` is packed
as ``(fn, args)`` instead, and ``fn(*args)`` rebuilds it (bit for bit: the forward's own expression) when
backward unpacks it. Other saved tensors go to the enclosing ``saved_tensors_hooks`` (e.g. ``save_on_cpu``, a
measurement), and so do a recipe's arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_ATTR = "_freezert_recipe"
_RECIPE = object()


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # very old torch
        return False


def mark_recomputable(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
    """Record that ``out == fn(*args)`` (bit for bit) so a later save of ``out`` can store the recipe; returns ``out``.

    ``args`` should be tensors autograd saves anyway (the op's own saved input and statistics): the recipe
    then costs no memory of its own."""
    # only while autograd records (no_grad outputs are never saved) and outside torch.compile's tracing
    if out.requires_grad and torch.is_grad_enabled() and not _compiling():
        setattr(out, _ATTR, (fn, args))
    return out


def _recipe_of(t: torch.Tensor):
    d = getattr(t, "__dict__", None)
    return d.get(_ATTR) if d else None


def _outer_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


@contextlib.contextmanager
def recompute_saved() -> Iterator[None]:
    """Within the block, saving a ``mark_recomputable`` tensor stores its recipe instead of its data."""
    outer = _outer_hooks()
    opack, ounpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor):
        recipe, view = _recipe_of(t), None
        if recipe is None and t._base is not None:  # a view of a marked tensor (GPT-2's x.view(-1, d) @ W)
            recipe = _recipe_of(t._base)
            if recipe is not None:
                base = t._base
                view = (tuple(t.size()), tuple(t.stride()), t.storage_offset(), tuple(base.stride()))
        if recipe is not None:
            fn, args = recipe
            args = tuple(None if a is None else opack(a) for a in args) if opack else args
            return (_RECIPE, fn, args, view)
        return opack(t) if opack else t

    def unpack(p):
        if isinstance(p, tuple) and len(p) == 4 and p[0] is _RECIPE:
            _, fn, args, view = p
            out = fn(*(tuple(None if a is None else ounpack(a) for a in args) if ounpack else args))
            if view is not None:
                size, stride, offset, base_stride = view
                if tuple(out.stride()) != base_stride:  # the rebuild must lay the values out as the forward did
                    raise RuntimeError(
                        f"freezert recompute: rebuilt tensor strides {tuple(out.stride())} differ "
                        f"from the forward's {base_stride}"
                    )
                out = out.as_strided(size, stride, offset)
            return out
        return ounpack(p) if ounpack else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
