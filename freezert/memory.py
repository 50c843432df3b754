"""Bytes saved for backward, and budgeted recomputation of trainable blocks (the report is ``freezert.report``).

* ``saved_bytes(fn)`` / ``SavedMeter``: bytes autograd saves for backward while ``fn`` runs (unique storages,
  through ``torch.autograd.graph.saved_tensors_hooks``), in total and per block (forward hooks say whose).
* ``plan_recompute(saved, budget)``: which blocks to checkpoint so the saved bytes fit ``budget`` at the least
  recomputation; ``checkpointed(model, names)`` runs them under ``torch.utils.checkpoint`` for a while.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import FreezeError
from ._swap import swapped
from ._units import fmt_bytes, parse_bytes

__all__ = [
    "SavedMeter",
    "checkpointed",
    "forward_flops",
    "plan_recompute",
    "saved_bytes",
]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class SavedMeter:
    """Context manager counting the bytes saved for backward inside it: ``.total``, ``.per_block`` and ``.per_op``.

    ``blocks`` (name -> module) attributes each storage to the innermost block running when it was first
    saved (``None`` outside every block); ``exclude`` tensors (parameters, buffers) are not counted.
    ``.inputs`` / ``.outputs``: per block, bytes of its tensor inputs (what a checkpointed block keeps) and
    autograd-tracked outputs (what a later block may have to save). Enter it outside other saved-tensor
    hooks of interest: the innermost hooks see the saves.
    """

    def __init__(self, blocks: Mapping[str, nn.Module] | None = None, exclude: Iterable[torch.Tensor] = ()):
        self.blocks = dict(blocks or {})
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], tuple[str | None, int]] = {}
        self._ops: dict[tuple[str, int], str] = {}  # storage -> the op that made the tensor first saved from it
        self._stack: list[str] = []
        self._in: dict[str, dict] = {}
        self._out: dict[str, dict] = {}
        self._handles: list[Any] = []
        self._hooks: contextlib.AbstractContextManager | None = None

    @property
    def total(self) -> int:
        return sum(n for _, n in self._seen.values())

    @property
    def inputs(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self._in.items()}

    @property
    def outputs(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self._out.items()}

    @property
    def per_block(self) -> dict[str | None, int]:
        out: dict[str | None, int] = {name: 0 for name in self.blocks}
        for owner, n in self._seen.values():
            out[owner] = out.get(owner, 0) + n
        return out

    @property
    def per_op(self) -> dict[str, int]:
        """Bytes by the op that made each saved storage (the ``grad_fn`` of the tensor or of its base, without its
        ``Backward0`` suffix; "input / frozen part" for tensors without one), largest first."""
        out: dict[str, int] = {}
        for key, (_, n) in self._seen.items():
            out[self._ops[key]] = out.get(self._ops[key], 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _count(self, t: torch.Tensor, owner: str | None = None) -> None:
        key = _storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = (
                owner if owner is not None else (self._stack[-1] if self._stack else None),
                t.untyped_storage().nbytes(),
            )
            src = t if t._base is None else t._base
            op = type(src.grad_fn).__name__ if src.grad_fn is not None else "input / frozen part"
            self._ops[key] = op.removesuffix("Backward0").removesuffix("Backward1")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if torch._C._current_graph_task_id() == -1:  # saves made during backward are transient, not kept ones
            self._count(t)
        return t

    def __enter__(self) -> SavedMeter:
        for name, mod in self.blocks.items():
            self._handles.append(mod.register_forward_pre_hook(self._enter_block(name, mod), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._leave_block(name), always_call=True))
        # chained to the hooks around it (save_on_cpu, another meter: memory_budget measures its steps inside a
        # benchmark's meter), which then see every save too; innermost hooks alone are called otherwise
        from .ops.recompute import outer_hooks, same

        outer = outer_hooks()
        if outer is None:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, same)
        else:
            outer_pack, outer_unpack = outer
            self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: outer_pack(self._pack(t)), outer_unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _enter_block(self, name: str, mod: nn.Module):
        def hook(module, args, kwargs):
            self._stack.append(name)
            if torch.is_grad_enabled():
                _note(self._in.setdefault(name, {}), _tensors((args, kwargs)))
            if (isinstance(module, _Checkpointed) or module in _CHECKPOINTING) and torch.is_grad_enabled():
                # checkpoint keeps its inputs alive for the recompute (not through saved-tensor hooks)
                for t in _tensors((args, kwargs)):
                    self._count(t, name)

        return hook

    def _leave_block(self, name: str):
        def hook(module, args, output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if torch.is_grad_enabled():
                _note(self._out.setdefault(name, {}), _tracked(output))

        return hook


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _note(seen: dict, ts: Iterable[torch.Tensor]) -> None:
    for t in ts:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())


def _tracked(obj: Any) -> Iterator[torch.Tensor]:
    return (t for t in _tensors(obj) if t.requires_grad or t.grad_fn is not None)


def saved_bytes(
    fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = (), blocks: Mapping[str, nn.Module] | None = None
) -> int | dict[str | None, int]:
    """Bytes saved for backward while ``fn()`` runs (unique storages): an int, or per block when ``blocks``."""
    with SavedMeter(blocks, exclude) as meter:
        fn()
    return meter.per_block if blocks is not None else meter.total


def forward_flops(fn: Callable[[], Any], blocks: Mapping[str, nn.Module]) -> dict[str, float]:
    """FLOPs of each block's forward while ``fn()`` runs (torch.utils.flop_counter; 0 for uncounted ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    handles = []

    def pre(name):
        def hook(module, args):
            mode = FlopCounterMode(display=False)
            mode.__enter__()
            stack.append((name, mode))

        return hook

    def post(name):
        def hook(module, args, output):
            n, mode = stack.pop()
            mode.__exit__(None, None, None)
            out[n] = out.get(n, 0.0) + float(mode.get_total_flops())

        return hook

    stack: list = []
    for name, mod in blocks.items():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return {name: out.get(name, 0.0) for name in blocks}


def plan_recompute(
    saved: Mapping[str, int],
    budget: int | float | str,
    *,
    cost: Mapping[str, float] | None = None,
    inputs: Mapping[str, int] | None = None,
    outputs: Mapping[str, int] | None = None,
    fixed: int = 0,
    resolution: int = 4096,
) -> set[str]:
    """Blocks to checkpoint so ``fixed + saved bytes <= budget`` at the least recomputation cost.

    ``saved``: bytes each block saves; ``inputs``: bytes a checkpointed block still keeps (its inputs);
    ``outputs``: bytes a later block may have to save once this one no longer does (its outputs; a
    conservative charge); ``cost``: the block's forward cost (FLOPs; default its saved bytes). A 0/1 knapsack
    over bytes rounded up to ``resolution`` steps, so the plan never exceeds the budget. Infeasible budgets
    raise a FreezeError that names the minimum.
    """
    budget_b = parse_bytes("memory_budget", budget)
    inputs, outputs = inputs or {}, outputs or {}
    cost = cost if cost is not None else {k: float(v) for k, v in saved.items()}
    gain = {k: max(0, int(v) - int(inputs.get(k, 0)) - int(outputs.get(k, 0))) for k, v in saved.items()}
    total = int(fixed) + sum(int(v) for v in saved.values())
    if total <= budget_b:
        return set()
    floor = total - sum(gain.values())
    if floor > budget_b:
        raise FreezeError(
            f"memory_budget={budget!r} ({fmt_bytes(budget_b)}) is below the minimum of {fmt_bytes(floor)} "
            f"({floor} bytes) with every trainable block it may recompute recomputed; raise it to at least that"
        )
    # Keep (do not checkpoint) the set of blocks with the largest total cost whose gains fit in the slack.
    names = [k for k in saved if gain[k] > 0]
    slack = budget_b - floor
    unit = max(1, math.ceil(sum(gain[k] for k in names) / resolution))
    cap = slack // unit
    best = [0.0] * (cap + 1)
    keep: list[list[bool]] = []
    for k in names:
        w = math.ceil(gain[k] / unit)  # rounded up: the kept blocks' real bytes never pass the slack
        c = float(cost.get(k, 0.0)) + 1e-9  # a tie prefers keeping more blocks
        row = [False] * (cap + 1)
        for b in range(cap, w - 1, -1):
            if best[b - w] + c > best[b]:
                best[b] = best[b - w] + c
                row[b] = True
        keep.append(row)
    chosen, b = set(names), cap
    for i in range(len(names) - 1, -1, -1):
        if keep[i][b]:
            chosen.discard(names[i])
            b -= math.ceil(gain[names[i]] / unit)
    return chosen


# the modules that run under checkpoint right now (``checkpointed``): a meter counts their kept inputs
_CHECKPOINTING: weakref.WeakSet = weakref.WeakSet()


class _Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant ``torch.utils.checkpoint``; same parameters, buffers, keys, attributes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # not a child: keys stay those of the original
        self._modules = inner._modules
        self._parameters = inner._parameters
        self._buffers = inner._buffers
        self.training = inner.training
        for key, value in vars(inner).items():  # YOLO's .f / .i and the like, read by parents
            if not key.startswith("_") and key != "training" and key not in vars(self):
                object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # a kernel substitution's shell passes its original's attributes through
            return getattr(object.__getattribute__(self, "_inner"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        from . import _tree

        inner, calls = self._inner, [0]
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        # The containers of the inputs as they are now: a forward that edits its input list in place (HRNet's
        # branches, x[i] = branch(x[i])) would hand the recompute its own outputs, silently wrong gradients. The
        # forward gets the caller's containers (an edit the caller sees stays), each recompute a fresh copy.
        leaves, spec = _tree.flatten((args, kwargs))

        def run(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return inner(*a, **k)
            a, k = _tree.unflatten(leaves, spec)  # containers built anew, holding what the call held
            with _running_stats_kept(inner):  # the recompute must not update BatchNorm statistics twice
                return inner(*a, **k)

        from .ops.substitute import replay

        # the recompute runs in backward, after the forward's kernel substitutions and lean regions have closed:
        # it must run the same modules and ops, or checkpoint finds other tensors saved ("different metadata")
        again = replay()
        return checkpoint(
            run, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), again), **kwargs
        )


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    # every buffer, not only _BatchNorm's: a lean substitution (ops.lean_modules.LeanBatchNorm) shares the buffers
    # of the BatchNorm it replaces without being one; buffers a forward does not write come back unchanged
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextlib.contextmanager
def checkpointed(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Within the block, each named submodule of ``model`` runs under ``torch.utils.checkpoint``
    (recomputed in backward, BatchNorm statistics updated once); the originals return on exit."""
    plan = []
    for name in sorted(names):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise FreezeError(
                f"checkpoint block {name!r} is not a submodule of {type(model).__name__}; "
                "pass dotted names from model.named_modules()"
            ) from None
        if name == "":
            raise FreezeError("the root module cannot be checkpointed in place; name its blocks instead")
        plan.append((name, _Checkpointed(mod)))
    inner = [rep._inner for _, rep in plan]
    with swapped(model, plan):
        _CHECKPOINTING.update(inner)
        try:
            yield model
        finally:
            for m in inner:
                _CHECKPOINTING.discard(m)
