"""One frozen module run as inference (``_Runner``): its private copy under no_grad, installed as the user's
module's ``forward`` so hooks fire on the user's module; what a cache hit hands back instead (``_Slot`` templates
and placeholders whose values cannot be read)."""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import _tree
from .record import METADATA, op_name

if TYPE_CHECKING:
    from .segment import FrozenSegment


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def model_layout(t: torch.Tensor) -> torch.Tensor:
    """A tensor a channels_last segment made, back in the layout the model's own modules give (contiguous)."""
    return t.contiguous() if _channels_last(t) else t


def _shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the original tensor objects."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _out_dtype(module: nn.Module) -> torch.dtype | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _unhooked(copy_of: nn.Module) -> nn.Module:
    """A private copy without the hooks it inherited: hooks fire on the user's modules, never on copies."""
    for m in copy_of.modules():
        for name in _HOOKS:
            d = m.__dict__.get(name)
            if d:
                d.clear()
    return copy_of


# transformers (5.x) records hidden states and attentions with forward hooks it installs once, on the layers and their
# attention modules (``transformers.utils.output_capturing``); each returns at once unless the call asks for the
# output it records. The flag that asks, by that output:
_CAPTURE_FLAGS = {
    "attentions": "output_attentions",
    "cross_attentions": "output_attentions",
    "hidden_states": "output_hidden_states",
}


def idle_capture(hook: Callable, requested: Callable[[str], bool]) -> bool:
    """True for a transformers hook a cache hit may skip: an output-capturing hook whose output this call does not
    ask for (``requested(flag)`` false: it does nothing), or ``enable_input_require_grads``' hook, which only marks
    the embeddings' output ``requires_grad`` (a hit replays the outputs marked as the record saw them)."""
    f = getattr(hook, "__func__", hook)
    name, module = getattr(f, "__name__", None), str(getattr(f, "__module__", ""))
    if not module.startswith("transformers."):
        return False
    if name == "make_inputs_require_grads":
        return True
    if name != "output_capturing_hook":
        return False
    cells = dict(zip(f.__code__.co_freevars, f.__closure__ or ()))
    try:
        flag = _CAPTURE_FLAGS.get(cells["key"].cell_contents)
    except (KeyError, ValueError):
        return False
    return flag is not None and not requested(flag)


def has_hooks(m: nn.Module, requested: Callable[[str], bool] | None = None) -> bool:
    """A forward or pre-forward hook on ``m`` (with ``requested``: one that is not an idle transformers capture)."""
    if not (m._forward_hooks or m._forward_pre_hooks):
        return False  # the common case, on every cached call: no list built
    if requested is None:
        return True
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    return any(not idle_capture(h, requested) for h in hooks)


def hooked_inside(module: nn.Module, requested: Callable[[str], bool] | None = None) -> nn.Module | None:
    """A submodule (not ``module`` itself) with a forward or pre-forward hook, if any (see ``has_hooks``)."""
    return next((m for m in module.modules() if m is not module and has_hooks(m, requested)), None)


@contextlib.contextmanager
def _all_eval(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


class PlaceholderRead(RuntimeError):
    """Code read a frozen output that the cache does not store (a branch or hook no recorded call took)."""

    def __init__(self, key):
        super().__init__(
            f"freezert: frozen output {key} was read outside the cached part after the call returned; the cache "
            "does not store it. Call the model once more (freezert then stores it), or drop cache="
        )
        self.key = key


class _Placeholder(torch.Tensor):
    """Stands for a frozen output a cache hit does not store, which only the skipped part itself reads: its
    shape can be asked, any read of its values raises ``PlaceholderRead``, so nothing is ever computed from it."""

    key: tuple

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op_name(func) in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise PlaceholderRead(next(t.key for t in _tree.tensors((args, kwargs)) if isinstance(t, _Placeholder)))


def contains_placeholder(obj) -> tuple | None:
    """The key of a placeholder inside ``obj`` (nested), if any."""
    return next((t.key for t in _tree.tensors(obj) if isinstance(t, _Placeholder)), None)


def _grad_inputs(args, kwargs) -> tuple[bool, bool]:
    """(needs autograd, marked): an input that depends on a trainable parameter needs autograd through the module;
    one that requires grad with no trainable parameter behind it was marked by the model's own code (HF's
    ``enable_input_require_grads``, wav2vec2's feature encoder): inference gives the same gradients, and the
    outputs are marked in turn so what follows sees them as the model would."""
    wanted = [t for t in _tree.tensors((args, kwargs)) if t.requires_grad] if torch.is_grad_enabled() else []
    if not wanted:
        return False, False
    seen: set[int] = set()
    stack = [t.grad_fn for t in wanted]
    if any(isinstance(t, nn.Parameter) for t in wanted):
        return True, False
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf that collects a gradient
        if isinstance(var, nn.Parameter) and var.requires_grad:
            return True, False
        stack.extend(f for f, _ in fn.next_functions)
    return False, True


class _Runner(nn.Module):
    """Runs one frozen module as inference: its private copy under no_grad (folded and pre-cast once the segment
    is ready). The user's module stays in the model; while the segment is installed, its ``forward`` is this
    runner's, so its hooks fire with the module they were registered on."""

    def __init__(self, original: nn.Module, segment: FrozenSegment, key: tuple[int, int], *, copy_module: bool):
        super().__init__()
        # Not registered as a submodule: the copy must not appear in state_dict, parameters or .to().
        self.__dict__["target"] = _unhooked(_shared_copy(original)) if copy_module else original
        self.__dict__["original"] = original
        self.__dict__["segment"] = segment
        self.__dict__["plain"] = types.MethodType(type(original).forward, original)  # set again at install
        # the hook dicts of its submodules, read at each call (a hook added later must fire)
        subs = [m for m in original.modules() if m is not original]
        self.__dict__["sub_hooks"] = [d for m in subs for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.key = key  # (unit, member): where the record saw this module
        self.out_dtype = _out_dtype(original)
        self.leaves = True  # its output is read outside the segment (set by the segment)
        self.template = None  # (structure, slots) of the last output: what a cache hit hands back in its place
        self.replay = None  # set by FrozenSegment.replaying(): what to return instead of running
        self.captured = None  # set by FrozenSegment.capturing(): where the outputs of this call go

    @property
    def device(self) -> torch.device | None:
        """Where this runner's last output lives (from its recorded template)."""
        slots = [s for s in self.template[1] if isinstance(s, _Slot)] if self.template else []
        return slots[0].device if slots else None

    def hooked_inside(self) -> bool:
        """True when one of the user's submodules of this module has a forward or pre-forward hook now."""
        return any(self.__dict__["sub_hooks"])

    def _cast_in(self, t: torch.Tensor) -> torch.Tensor:
        seg = self.__dict__["segment"]
        if t.is_floating_point():
            if seg.dtype is not None:
                t = t.to(seg.dtype)
            if seg.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _cast_out(self, t: torch.Tensor) -> torch.Tensor:
        if self.out_dtype is not None and t.is_floating_point() and t.dtype != self.out_dtype:
            t = t.to(self.out_dtype)
        seg = self.__dict__["segment"]
        # channels_last="auto": back to the model's layout where the output leaves the segment
        if seg.channels_last and seg.layout == "auto" and self.leaves and not seg.driving:
            t = model_layout(t)
        return t

    def forward(self, *args, **kwargs):
        if self.replay is not None:
            return self.replay()
        plain = self.__dict__["plain"]
        needs, marked = _grad_inputs(args, kwargs)
        seg, target, original = self.__dict__["segment"], self.__dict__["target"], self.__dict__["original"]
        if needs or target is original or self.hooked_inside():
            seg.restore_originals()  # the user's own module runs: its weights where it expects them
        if needs:
            # A call the record did not plan for (an input that depends on a trainable parameter): autograd
            # through the user's own module, exactly as naive freezing runs it.
            return plain(*args, **kwargs)
        with torch.no_grad():
            if target is original:  # bn="train": the user's own module, batch statistics and all
                out = plain(*args, **kwargs)
            elif self.hooked_inside():
                # a hook on one of its submodules must see that submodule's own output: the user's modules run,
                # unfolded, in the segment's eval mode
                with _all_eval(original):
                    out = plain(*args, **kwargs)
            else:
                cast = seg.prepared and (seg.dtype is not None or seg.channels_last)
                if cast:
                    args, kwargs = _tree.map_tensors((args, kwargs), self._cast_in)
                out = target(*args, **kwargs)
                if cast:
                    out = _tree.map_tensors(out, self._cast_out)
        leaves, spec = _tree.flatten(out)
        if marked:
            for v in leaves:
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    v.requires_grad_(True)
        self.template = (spec, [_Slot.of(v) if isinstance(v, torch.Tensor) else v for v in leaves])
        if self.captured is not None:
            self.captured[self.key] = [v for v in leaves if isinstance(v, torch.Tensor)]
        return out


class _Slot:
    """Shape, dtype and device of one tensor in a runner's output (batch dimension first)."""

    __slots__ = ("shape", "dtype", "device", "requires_grad")

    def __init__(self, shape, dtype, device, requires_grad: bool = False):
        self.shape, self.dtype, self.device, self.requires_grad = tuple(shape), dtype, device, requires_grad

    @classmethod
    def of(cls, t: torch.Tensor) -> _Slot:
        # an output the model's own code marked requires_grad (or a runner marked after a marked input) is replayed
        # marked too: a checkpointed layer after it needs that to pass gradients to its parameters
        return cls(t.shape, t.dtype, t.device, t.requires_grad and t.grad_fn is None)

    def placeholder(self, batch: int, key: tuple) -> torch.Tensor:
        # A zero-stride expand: the right shape for the model's glue code, no memory, no values to read.
        base = torch.zeros((), dtype=self.dtype, device=self.device).expand(batch, *self.shape[1:])
        p = torch.Tensor._make_subclass(_Placeholder, base)
        p.key = key
        return p
