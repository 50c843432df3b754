"""Saved activations stored as recipes: a lean op's output that a later op saves is rebuilt in backward.

``mark_recomputable(out, fn, *args)`` records that ``out == fn(*args)`` bit for bit. Inside ``recompute_saved()``
a saved-tensors hook stores a saved ``out`` (or a view of it) as that recipe instead of its data, when

* ``out`` and every argument are still at the version they had when ``out`` was made (an in-place edit since
  makes the recipe stale: the tensor is then saved as it is, like eager does), and
* every tensor argument costs nothing to keep: saved for backward by some op already (the lean op's own input
  and statistics), a leaf that requires grad (a parameter), or itself a recipe whose arguments are.

Backward unpacks the recipe: the tensor itself while it is alive and unedited, else ``fn`` over the unpacked
arguments (laid out with the forward's strides), kept while some saved reference to it is alive, so a value
needed by several backward nodes is rebuilt once and freed with its last user, as eager frees it.

PyTorch skips its in-place check ("modified by an inplace operation") for tensors that pass through saved-tensor
hooks, so these hooks check the versions themselves and raise eager's error. Inside ``torch.utils.checkpoint``
(whose own hooks are then the enclosing ones) the hooks step aside: checkpoint saves nothing to rebuild from.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

_ATTR = "_freezert_recipe"
# Longest chain of recipes one rebuild may walk (a residual stream: block k's output is a recipe over block k-1's).
# A tensor that would be deeper is not marked: it is saved as it is, and the chain starts again from it, so a
# rebuild never walks far and never brings many earlier values back into memory at once.
MAX_DEPTH = 8
# storages held by a saved-tensor holder right now (a recipe argument found here costs nothing to keep)
_SAVED: dict[int, int] = {}


def _never() -> bool:
    return False


# True while torch.compile traces (a plain function: it runs for every lean op)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _never)


def _key(t: torch.Tensor) -> int:
    """The storage's address: one key per storage, views included (host and device memory share one 64-bit
    address space under CUDA's unified addressing, so addresses do not collide across devices)."""
    # (the storage's address from the tensor's own: asking for the storage would give it a Python object that
    # lives as long as the storage does, one more object per saved tensor for the garbage collector to walk)
    return t.data_ptr() - t.storage_offset() * t.element_size()


class Recipe:
    """How to rebuild a marked tensor: ``fn`` over ``args`` at the versions they had when it was marked.

    Holds no tensor strongly: arguments are weak references (with their versions) or other recipes."""

    __slots__ = ("__weakref__", "args", "depth", "edited", "fn", "meta", "packed", "ref", "version")

    def __init__(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], args: tuple[Any, ...]):
        self.fn = fn
        self.args = enc = tuple([_encode(a) for a in args])
        depth = 0
        for a in enc:
            if a[0] == "r" and a[1].depth > depth:
                depth = a[1].depth
        self.depth = depth + 1
        self.version = out._version
        self.meta = (tuple(out.shape), tuple(out.stride()), out.dtype)
        self.ref = weakref.ref(out)
        self.packed: weakref.ref | None = None  # the _Packed of the first save, shared by later saves
        self.edited = False  # an in-place op wrote the tensor after it was marked (note_edit): saves of it are stale


class Snapshot:
    """A tensor's value at this moment as a recipe argument, taken before an in-place op overwrites it."""

    __slots__ = ("enc",)

    def __init__(self, t: torch.Tensor):
        self.enc = _encode(t)


def _encode(a: Any) -> tuple:
    if isinstance(a, Snapshot):
        return a.enc
    if not isinstance(a, torch.Tensor):
        return ("c", a)
    if a.grad_fn is None:  # a leaf, a parameter or a statistic: never marked (marks go on outputs with a grad_fn)
        return ("t", weakref.ref(a), a._version)
    r, view = fresh_recipe(a)
    if r is not None:
        return ("r", r, view)
    return ("t", weakref.ref(a), a._version)


def fresh_recipe(t: torch.Tensor) -> tuple[Recipe | None, tuple | None]:
    """``t``'s recipe (and ``None``), or its base's recipe and the view's (size, stride, offset); ``(None, None)``
    when neither is marked or the mark is stale (edited in place since)."""
    d = getattr(t, "__dict__", None)
    r = d.get(_ATTR) if d else None
    if r is not None and r.version == t._version:
        return r, None
    base = t._base
    if base is not None:
        d = getattr(base, "__dict__", None)
        r = d.get(_ATTR) if d else None
        if r is not None and r.version == t._version:  # views share the base's version counter
            return r, (tuple(t.size()), tuple(t.stride()), t.storage_offset())
    return None, None


def mark_recomputable(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Record that ``out == fn(*args)`` (bit for bit) so a later save of ``out`` can store the recipe; returns ``out``.

    ``args``: tensors autograd saves anyway (the op's own saved input and statistics), other marked tensors, or
    constants. Skipped under ``no_grad`` (nothing is saved), while ``torch.compile`` traces, and for views."""
    if (
        not _compiling()
        and out.requires_grad
        and torch.is_grad_enabled()
        and out._base is None
        and out.storage_offset() == 0
    ):
        r = Recipe(out, fn, args)
        if r.depth <= MAX_DEPTH:
            out.__dict__[_ATTR] = r
    return out


def mark_from_node(out: torch.Tensor, fn: Callable[[], torch.Tensor], input: torch.Tensor) -> torch.Tensor:
    """Record that ``out == fn()``, where ``fn`` reads what ``out``'s own node saved (``grad_fn.saved_tensors``:
    autograd keeps those until that node's backward, which runs after every op that saved ``out``, and checks them
    for in-place edits). No argument to hold or check per save: the cheap recipe of a lean op's output. Only while
    these hooks are active (not inside checkpoint, whose saves are no tensors to read); ``input``, the node's input,
    sets the recipe's depth when it is itself a recipe (the rebuild reads it through the node)."""
    if not active():
        return out
    r = fresh_recipe(input)[0]
    if r is not None and r.depth >= MAX_DEPTH:
        return out
    out = mark_recomputable(out, fn)
    mark = out.__dict__.get(_ATTR)
    if mark is not None and r is not None:
        mark.depth = r.depth + 1
    return out


def note_edit(t: torch.Tensor) -> None:
    """An in-place op is about to write ``t`` (or the tensor it views): a save of the value it had is now stale,
    and backward must raise as eager does even if ``t`` is gone by then (its version can no longer be read)."""
    for obj in (t, t._base):
        d = getattr(obj, "__dict__", None) if obj is not None else None
        r = d.get(_ATTR) if d else None
        if r is not None:
            r.edited = True


def unmark(t: torch.Tensor) -> None:
    """Forget ``t``'s recipe (an op that cannot rebuild what it made)."""
    d = getattr(t, "__dict__", None)
    if d:
        d.pop(_ATTR, None)


def _inplace_error(t: torch.Tensor, expected: int) -> RuntimeError:
    # eager's message (torch/csrc/autograd/saved_variable.cpp), so callers and tests see the same error
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {expected} instead. "
        "(checked by freezert's saved-tensor hooks, under which PyTorch does not check)"
    )


def _kept(t: torch.Tensor) -> int | None:
    """Count ``t``'s storage as kept by a saved-tensor holder (``_SAVED``); returns the key ``_unkept`` takes, or
    None for a parameter (free anyway, not counted)."""
    if t.grad_fn is None and t.requires_grad:
        return None
    key = _key(t)
    _SAVED[key] = _SAVED.get(key, 0) + 1
    return key


def _unkept(key: int | None) -> None:
    if key is not None:
        n = _SAVED.get(key, 0) - 1
        if n > 0:
            _SAVED[key] = n
        else:
            _SAVED.pop(key, None)


class _Real:
    """A tensor saved as it is: kept (or handed to the enclosing hooks) and checked for in-place edits on unpack."""

    __slots__ = ("__weakref__", "key", "outer", "packed", "ref", "version")

    def __init__(self, t: torch.Tensor, outer):
        self.key = None  # set last: an enclosing hook that raises leaves nothing counted for __del__ to undo
        self.version = t._version
        self.outer = outer
        if outer is None:
            self.packed, self.ref = t, None
        else:  # e.g. save_on_cpu or a measurement: they decide what is kept
            self.packed, self.ref = outer[0](t), weakref.ref(t)
        self.key = _kept(t)

    def __del__(self):
        _unkept(self.key)

    def get(self) -> torch.Tensor:
        if self.outer is None:
            t = self.packed
        else:
            t = self.outer[1](self.packed)
            live = self.ref()
            if live is None:  # gone (moved off by the enclosing hooks): nothing left to check, as in eager
                return t
            if live._version != self.version:
                raise _inplace_error(live, self.version)
            return t
        if t._version != self.version:
            raise _inplace_error(t, self.version)
        return t


class _Packed:
    """A recipe at save time: its arguments held (each checked on unpack), and its rebuilt value while needed."""

    __slots__ = ("__weakref__", "args", "cache", "live", "recipe")

    def __init__(self, recipe: Recipe, args: list):
        self.recipe, self.args = recipe, args
        self.cache: torch.Tensor | None = None
        self.live = 0  # saved references (handles) alive: the rebuilt value is kept while there are any

    def value(self) -> torch.Tensor:
        r = self.recipe
        t = r.ref()
        if t is not None and t._version == r.version:  # still alive and unedited: no rebuild
            return t
        if self.cache is not None:
            return self.cache
        vals = []
        for kind, a, view in self.args:
            if kind == "c":
                vals.append(a)
            elif kind == "t":
                vals.append(a.get())
            else:
                v = a.value()
                vals.append(v if view is None else v.as_strided(*view))
        out = _conform(r.fn(*vals), r.meta)
        if self.live > 0:
            self.cache = out
        return out


def _conform(out: torch.Tensor, meta: tuple) -> torch.Tensor:
    shape, stride, dtype = meta
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise RuntimeError(
            f"freezert recompute: a recipe rebuilt {tuple(out.shape)} {out.dtype}, the forward made {shape} {dtype}"
        )
    if tuple(out.stride()) != stride:  # lay the values out as the forward did (conv backward reads the strides)
        out = torch.empty_strided(shape, stride, dtype=dtype, device=out.device).copy_(out)
    return out


class Handle:
    """What a saved recipe is packed as: one per save, so the rebuilt value lives while some save needs it.

    ``strict`` (a save): unpacking raises eager's in-place error if the tensor was written after it was saved.
    A handle taken by an in-place op on the value it is about to overwrite (``pack_now``) is not strict."""

    __slots__ = ("packed", "strict", "view")

    def __init__(self, packed: _Packed, view: tuple | None, strict: bool = True):
        self.packed, self.view, self.strict = packed, view, strict
        packed.live += 1

    def __del__(self):
        p = self.packed
        p.live -= 1
        if p.live <= 0:
            p.cache = None

    def value(self) -> torch.Tensor:
        if self.strict:
            r = self.packed.recipe
            t = r.ref()
            if t is not None and t._version != r.version:
                raise _inplace_error(t, r.version)
            if r.edited:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a saved {list(r.meta[0])} {r.meta[2]} tensor was written in place after it was "
                    "saved (checked by freezert's saved-tensor hooks, under which PyTorch does not check)"
                )
        v = self.packed.value()
        return v if self.view is None else v.as_strided(*self.view)


def _free(t: torch.Tensor) -> bool:
    """Keeping ``t`` costs nothing: some saved-tensor holder keeps its storage, or it is a parameter."""
    return (t.grad_fn is None and t.requires_grad) or _key(t) in _SAVED


def _live(r: Recipe) -> torch.Tensor | None:
    """The recipe's own tensor when it is alive, unedited and kept anyway: cheaper to hold than to rebuild."""
    t = r.ref()
    return t if t is not None and t._version == r.version and _free(t) else None


def _cost(r: Recipe, extra: dict) -> bool:
    """False if the recipe cannot be rebuilt (an argument gone or edited); else adds to ``extra`` the storages it
    would keep that nothing else keeps."""
    if r.packed is not None and r.packed() is not None:
        return True
    for a in r.args:
        if a[0] == "t":
            t = a[1]()
            if t is None or t._version != a[2]:
                return False
            if not _free(t):
                extra[_key(t)] = t.untyped_storage().nbytes()
        elif a[0] == "r" and _live(a[1]) is None and not _cost(a[1], extra):
            return False
    return True


def _build(r: Recipe, outer) -> _Packed:
    p = r.packed() if r.packed is not None else None
    if p is not None:
        return p
    args = []
    for a in r.args:
        if a[0] == "c":
            args.append(("c", a[1], None))
        elif a[0] == "t":
            args.append(("t", _Real(a[1](), outer), None))
        else:
            live = _live(a[1])
            if live is not None:
                args.append(("t", _Real(live if a[2] is None else live.as_strided(*a[2]), outer), None))
            else:
                args.append(("r", _build(a[1], outer), a[2]))
    p = _Packed(r, args)
    r.packed = weakref.ref(p)
    return p


def _packed(r: Recipe, outer, limit: int | None = None) -> _Packed | None:
    """The shared save-time form of ``r``, or None if it cannot be rebuilt or would keep ``limit`` bytes or more
    that nothing else keeps (then saving the tensor itself is cheaper)."""
    extra: dict = {}
    if not _cost(r, extra) or (limit is not None and extra and sum(extra.values()) >= limit):
        return None
    return _build(r, outer)


def pack_now(t: torch.Tensor) -> Handle | None:
    """A handle on ``t``'s current value as a recipe (before an in-place op overwrites it), or None if it has none
    or some argument is not free. ``handle.value()`` rebuilds it in backward."""
    r, view = fresh_recipe(t)
    if r is None or not active():
        return None
    p = _packed(r, _STATE.frames[-1], t.untyped_storage().nbytes())
    return None if p is None else Handle(p, view, strict=False)


_pop = torch._C._autograd._pop_saved_tensors_default_hooks
_push = torch._C._autograd._push_saved_tensors_default_hooks
_hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)


def pause(*saves: torch.Tensor | None):
    """Take this module's hooks off the top of the stack while a lean op saves ``saves``, none of which is a
    recipe (a convolution's fresh output, a dropout mask): they go to the enclosing hooks or to autograd itself,
    which checks in-place edits natively and costs no Python per save. Returns what ``resume`` puts back (None:
    nothing taken off: inactive, or some tensor is a recipe the hooks must see). Pair with ``hold``."""
    frames = _STATE.frames
    if not frames or frames[-1] is _OFF or not _hooks_enabled() or _compiling():
        return None
    top = outer_hooks()
    if top is None or not getattr(top[0], "_freezert", False):
        return None
    for t in saves:
        if t is not None and fresh_recipe(t)[0] is not None:
            return None
    _pop()
    return top


def resume(top) -> None:
    """Put back what ``pause`` took off."""
    if top is not None:
        _push(*top)


def apply_past_hooks(function: type[torch.autograd.Function], input: torch.Tensor, *args: Any) -> tuple:
    """``function.apply(input, *args)`` for a lean op that saves its input and its outputs after the first (the
    statistics of a BatchNorm): past these hooks where ``pause`` allows (none of them is a recipe), and then held as
    kept by its node until its backward calls ``release``."""
    paused = pause(input)
    try:
        out = function.apply(input, *args)
    finally:
        resume(paused)
    if paused is not None:
        hold(out[0].grad_fn, input, *out[1:])
    return out


class _Held:
    """Storages a lean op saved past the hooks, counted as kept (a recipe over them costs nothing) until the node's
    backward reads them (``release``) or the node is freed."""

    __slots__ = ("keys",)

    def __init__(self, ts: tuple):
        self.keys = [_kept(t) for t in ts if t is not None]

    def __del__(self):
        for k in self.keys:
            _unkept(k)


def hold(node, *saved: torch.Tensor | None) -> None:
    """``node`` (a lean op's ``grad_fn``) saved ``saved`` past the hooks (``pause``): count them as kept."""
    if node is not None:
        node._freezert_held = _Held(saved)


def release(ctx) -> None:
    """In a lean op's backward, once its saved tensors are read: they are no longer kept for recipes."""
    ctx._freezert_held = None


def same(t: torch.Tensor) -> torch.Tensor:
    """The identity, as a saved-tensor hook."""
    return t


def local_saves() -> contextlib.AbstractContextManager:
    """Saves made inside the block (a backward that reruns a small forward under autograd) stay plain: enclosing
    hooks (``save_on_cpu``, a measurement, ``recompute_saved``) do not see them."""
    return torch.autograd.graph.saved_tensors_hooks(same, same)


def outer_hooks():
    """The innermost saved-tensor hooks now, as (pack, unpack), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _is_checkpoint(hooks) -> bool:
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


class _State:
    # one entry per recompute_saved() entered: its enclosing hooks (None: none), or _OFF inside checkpoint
    frames: list = []


_OFF = object()
_STATE = _State()


def active() -> bool:
    """True when this module's hooks are the innermost saved-tensor hooks: inside ``recompute_saved()`` and not
    inside a ``torch.utils.checkpoint`` region (or other hooks) entered within it."""
    if not _STATE.frames or _STATE.frames[-1] is _OFF:
        return False
    top = outer_hooks()
    return top is not None and getattr(top[0], "_freezert", False)


def _hooks(outer):
    def pack(t: torch.Tensor):
        r, view = fresh_recipe(t)
        if r is not None:
            p = _packed(r, outer, t.untyped_storage().nbytes())
            if p is not None:
                return Handle(p, view)
        return _Real(t, outer)

    def unpack(p):
        return p.value() if isinstance(p, Handle) else p.get()

    pack._freezert = True  # active() recognises these hooks on top of the stack
    return pack, unpack


@contextlib.contextmanager
def recompute_saved() -> Iterator[None]:
    """Within the block, saving a fresh ``mark_recomputable`` tensor stores its recipe instead of its data, and every
    saved tensor is checked for in-place edits on unpack (eager's check, which hooks turn off)."""
    outer = outer_hooks()
    if _is_checkpoint(outer):  # checkpoint recomputes the region anyway; its saves must match forward and recompute
        _STATE.frames.append(_OFF)
        try:
            yield
        finally:
            _STATE.frames.pop()
        return
    _STATE.frames.append(outer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(*_hooks(outer)):
            yield
    finally:
        _STATE.frames.pop()
