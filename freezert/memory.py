"""Where a training step's memory goes, and budgeted recomputation of trainable blocks.

* ``saved_bytes(fn)`` / ``SavedMeter``: bytes autograd saves for backward while ``fn`` runs (unique storages,
  through ``torch.autograd.graph.saved_tensors_hooks``), in total and per block (forward hooks say whose).
* ``plan_recompute(saved, budget)``: which blocks to checkpoint so the saved bytes fit ``budget`` at the least
  recomputation; ``checkpointed(model, names)`` runs them under ``torch.utils.checkpoint`` for a while.
* ``memory_report(...)``: parameters, gradients, optimizer state, saved activations per block, cache by
  tier, as a table (and a matplotlib plot on request).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._errors import FreezeError
from ._swap import swapped
from ._units import fmt_bytes, parse_bytes

__all__ = [
    "MemoryReport",
    "SavedMeter",
    "checkpointed",
    "forward_flops",
    "memory_report",
    "plan_recompute",
    "saved_bytes",
]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class SavedMeter:
    """Context manager counting the bytes saved for backward inside it: ``.total`` and ``.per_block``.

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

    def _count(self, t: torch.Tensor, owner: str | None = None) -> None:
        key = _storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = (
                owner if owner is not None else (self._stack[-1] if self._stack else None),
                t.untyped_storage().nbytes(),
            )

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if torch._C._current_graph_task_id() == -1:  # saves made during backward are transient, not kept ones
            self._count(t)
        return t

    def __enter__(self) -> SavedMeter:
        for name, mod in self.blocks.items():
            self._handles.append(mod.register_forward_pre_hook(self._enter_block(name, mod), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._leave_block(name), always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
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
            f"({floor} bytes) with every trainable block recomputed; raise it to at least that"
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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        inner, calls = self._inner, [0]

        def run(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return inner(*a, **k)
            with _running_stats_kept(inner):  # the recompute must not update BatchNorm statistics twice
                return inner(*a, **k)

        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
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


# --- the report -------------------------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """One training step's memory by kind (``rows``) and saved activations by block (``saved``)."""

    rows: list[tuple[str, int]] = field(default_factory=list)
    saved: dict[str, int] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # frozen-weight bytes under other storage options
    measured: str = "counted"

    @property
    def total(self) -> int:
        return sum(n for _, n in self.rows)

    def table(self) -> str:
        """The report as fixed-width text (what ``str(report)`` prints)."""
        width = max(
            [len(k) for k, _ in self.rows]
            + [len(f"  {k}") for k in self.saved]
            + [len(k) for k in [*self.options, *self.weights]]
            + [24]
        )
        lines = [f"{'memory (' + self.measured + ')':<{width}}  {'bytes':>14}  {'':>10}"]
        for k, n in self.rows:
            lines.append(f"{k:<{width}}  {n:>14,}  {fmt_bytes(n):>10}")
            if k == "saved activations":
                for b, m in self.saved.items():
                    lines.append(f"{'  ' + str(b):<{width}}  {m:>14,}  {fmt_bytes(m):>10}")
        lines.append(f"{'total':<{width}}  {self.total:>14,}  {fmt_bytes(self.total):>10}")
        for title, entries in (("saved activations with", self.options), ("frozen weights held as", self.weights)):
            if entries:  # each against the first entry
                lines += ["", f"{title:<{width}}  {'bytes':>14}  {'vs first':>10}"]
                first = next(iter(entries.values())) or 1
                lines += [f"{k:<{width}}  {n:>14,}  {n / first:>9.2f}x" for k, n in entries.items()]
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: str | None = None):
        """A stacked bar of the rows and a bar per block (matplotlib); saved to ``path`` when given."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise FreezeError("memory_report(plot=...) needs matplotlib; pip install matplotlib") from None
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        bottom = 0.0
        for k, n in self.rows:
            a.bar(["step"], [n / 2**20], bottom=bottom, label=k)
            bottom += n / 2**20
        a.set_ylabel("MiB")
        a.legend(fontsize=7)
        b.bar([str(k) for k in self.saved], [n / 2**20 for n in self.saved.values()])
        b.set_ylabel("saved for backward (MiB)")
        b.tick_params(axis="x", rotation=90, labelsize=6)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _bytes(ts: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in ts:
        if t is not None and isinstance(t, torch.Tensor):
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def memory_report(
    model: nn.Module,
    step: Callable[[], Any],
    *,
    blocks: Mapping[str, nn.Module] | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    frozen: Iterable[nn.Parameter] | None = None,
    cache_bytes: Mapping[str, int] | None = None,
    options: Mapping[str, Callable[[], Any]] | None = None,
    plot: str | None = None,
) -> MemoryReport:
    """Runs ``step()`` (a forward + backward, optionally the optimizer step) once and reports its memory.

    ``frozen``: the frozen parameters (default: those with ``requires_grad=False``); ``blocks``: names or
    name -> module (default: the model's children); ``cache_bytes``: tier -> bytes of a feature cache;
    ``options``: name -> another step callable whose saved bytes are listed for comparison; ``plot``: a path.
    """
    if blocks is None:
        blocks = dict(model.named_children())
    elif not isinstance(blocks, Mapping):
        blocks = {name: model.get_submodule(name) for name in blocks}
    params = list(model.parameters())
    frozen_ids = {id(p) for p in frozen} if frozen is not None else {id(p) for p in params if not p.requires_grad}
    exclude = [*params, *model.buffers()]
    cuda = any(p.is_cuda for p in params)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with SavedMeter(blocks, exclude) as meter:
        step()
    report = MemoryReport(measured="CUDA allocator + counted" if cuda else "counted")
    report.rows.append(("frozen parameters", _bytes(p for p in params if id(p) in frozen_ids)))
    report.rows.append(("trainable parameters", _bytes(p for p in params if id(p) not in frozen_ids)))
    report.rows.append(("buffers", _bytes(model.buffers())))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # a step that zeroed them (set_to_none): what backward would allocate
        grads = [p for p in params if p.requires_grad and id(p) not in frozen_ids]
    report.rows.append(("gradients", _bytes(grads)))
    state = [
        t
        for s in (optimizer.state.values() if optimizer is not None else ())
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    report.rows.append(("optimizer state", _bytes(state)))
    per = meter.per_block
    report.saved = {str(k): v for k, v in per.items() if k is not None}
    if per.get(None):
        report.saved["(outside blocks)"] = per[None]
    report.rows.append(("saved activations", meter.total))
    for tier, n in (cache_bytes or {}).items():
        report.rows.append((f"cache ({tier})", int(n)))
    if cuda:
        torch.cuda.synchronize()
        report.rows.append(("CUDA peak during step, above start", torch.cuda.max_memory_allocated() - start))
    for name, fn in (options or {}).items():
        report.options[name] = saved_bytes(fn, exclude=exclude)
    if plot is not None:
        report.plot(plot)
    return report
