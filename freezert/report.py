"""Where one training step's memory goes: ``memory_report`` for any model and step, and ``FrozenModel.memory_report``
(``report_for``), which adds what freezert itself holds (its private weight copies, the cache by tier) and measures
each alternative by running it: naive freezing, every trainable block recomputed, the eager kernels."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _tree
from ._errors import FreezeError
from ._units import fmt_bytes
from .memory import SavedMeter, checkpointed, saved_bytes

if TYPE_CHECKING:
    from .wrapper import FrozenModel

__all__ = ["MemoryReport", "memory_report", "report_for"]


@dataclass
class MemoryReport:
    """One training step's memory by kind (``rows``, summed in ``total``), saved activations by block (``saved``),
    the saved activations each alternative measured (``options``), the frozen weights' bytes under each storage
    (``weights``) and ``notes`` (what is not counted, and why)."""

    rows: list[tuple[str, int]] = field(default_factory=list)
    saved: dict[str, int] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    measured: str = "counted"
    cuda_peak: int | None = None  # the CUDA allocator's peak during the step, above its start (not in the total)

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
        if self.cuda_peak is not None:
            peak = self.cuda_peak
            lines.append(f"{'CUDA peak during the step':<{width}}  {peak:>14,}  {fmt_bytes(peak):>10}")
        for title, entries in (("saved activations with", self.options), ("frozen weights held as", self.weights)):
            if entries:  # each against the first entry
                lines += ["", f"{title:<{width}}  {'bytes':>14}  {'vs first':>10}"]
                first = next(iter(entries.values())) or 1
                lines += [f"{k:<{width}}  {n:>14,}  {n / first:>9.2f}x" for k, n in entries.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: str | None = None):
        """The report as a figure (matplotlib): the step's memory by kind, the saved activations by block, and what
        each option saves against the first; saved to ``path`` when given."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise FreezeError("memory_report(plot=...) needs matplotlib; pip install matplotlib") from None
        both = (("saved activations with", self.options), ("frozen weights", self.weights))
        sections = [(t, e) for t, e in both if e]
        fig, grid = plt.subplots(2, 2, figsize=(12, 8))
        axes = list(grid.flat)
        for ax in axes[2 + len(sections) :]:
            ax.set_axis_off()
        a, b = axes[0], axes[1]
        bottom = 0.0
        for k, n in self.rows:
            a.bar(["step"], [n / 2**20], bottom=bottom, label=f"{k}: {fmt_bytes(n)}")
            bottom += n / 2**20
        a.set_ylabel("MiB")
        a.set_title(f"one training step ({self.measured})", fontsize=9)
        a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # beside the bar
        names = [str(k) for k in self.saved]
        b.barh(names[::-1], [n / 2**20 for n in list(self.saved.values())[::-1]])
        b.set_xlabel("MiB")
        b.set_title("saved for backward, by block", fontsize=9)
        b.tick_params(axis="y", labelsize=6)
        for ax, (title, entries) in zip(axes[2:], sections):
            first = next(iter(entries.values())) or 1
            labels = list(entries)[::-1]
            values = [entries[k] / 2**20 for k in labels]
            bars = ax.barh(labels, values)
            ax.bar_label(bars, labels=[f"{entries[k] / first:.2f}x" for k in labels], fontsize=7, padding=2)
            ax.set_xlabel("MiB")
            ax.set_title(f"{title} (x: against the first)", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlim(right=max(values) * 1.25 if values and max(values) > 0 else None)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig


def tensor_bytes(ts: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``ts``."""
    seen: dict[tuple[str, int], int] = {}
    for t in ts:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen.setdefault((str(t.device), s.data_ptr()), s.nbytes())
    return sum(seen.values())


def optimizers_of(params: list[nn.Parameter]) -> list[torch.optim.Optimizer]:
    """The live optimizers that hold any of ``params`` (found by the garbage collector's list of objects)."""
    ids = {id(p) for p in params}
    # by type, not isinstance: isinstance reads __class__, which a dead weak proxy raises on (ReferenceError) and
    # some deprecated objects warn about
    found = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)]
    return [o for o in found if any(id(p) in ids for g in o.param_groups for p in g["params"])]


def memory_report(
    model: nn.Module,
    step: Callable[[], Any],
    *,
    blocks: Mapping[str, nn.Module] | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    frozen: Iterable[nn.Parameter] | None = None,
    cache_bytes: Mapping[str, int] | None = None,
    extra: Mapping[str, int] | None = None,
    options: Mapping[str, Callable[[], Any]] | None = None,
    plot: str | None = None,
) -> MemoryReport:
    """Runs ``step()`` (a forward + backward, optionally the optimizer step) once and reports its memory.

    ``frozen``: the frozen parameters (default: those with ``requires_grad=False``); ``blocks``: names or
    name -> module (default: the model's children); ``optimizer``: whose state to count (default: the live
    optimizers holding the model's parameters); ``cache_bytes``: tier -> bytes of a feature cache; ``extra``: more
    rows (name -> bytes); ``options``: name -> another step callable whose saved bytes are listed for comparison.
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
    report.rows.append(("frozen parameters", tensor_bytes(p for p in params if id(p) in frozen_ids)))
    report.rows.append(("trainable parameters", tensor_bytes(p for p in params if id(p) not in frozen_ids)))
    report.rows.append(("buffers", tensor_bytes(model.buffers())))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # a step that zeroed them (set_to_none): what backward would allocate
        grads = [p for p in params if p.requires_grad and id(p) not in frozen_ids]
    report.rows.append(("gradients", tensor_bytes(grads)))
    opts = [optimizer] if optimizer is not None else optimizers_of(params)
    state = [t for o in opts for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    report.rows.append(("optimizer state", tensor_bytes(state)))
    if not opts:
        report.notes.append("no optimizer holds the model's parameters yet: its state is not counted (optimizer=)")
    per = meter.per_block
    report.saved = {str(k): v for k, v in per.items() if k is not None}
    if per.get(None):
        report.saved["(outside blocks)"] = per[None]
    report.rows.append(("saved activations", meter.total))
    report.rows += [(k, int(n)) for k, n in (extra or {}).items()]
    report.rows += [(f"cache ({tier})", int(n)) for tier, n in (cache_bytes or {}).items()]
    if cuda:
        torch.cuda.synchronize()
        report.cuda_peak = torch.cuda.max_memory_allocated() - start
    for name, fn in (options or {}).items():
        report.options[name] = saved_bytes(fn, exclude=exclude)
    if plot is not None:
        report.plot(plot)
    return report


def _default_loss(out: Any) -> torch.Tensor | None:
    ts = [t.float().sum() for t in _tree.tensors(out) if t.is_floating_point() and t.requires_grad]
    return torch.stack(ts).sum() if ts else None


def report_for(fm: FrozenModel, args: tuple, kwargs: dict, loss=None, optimizer=None, plot: str | None = None):
    """See ``FrozenModel.memory_report``: one step as configured (counted), then naive freezing and every trainable
    block recomputed (measured by running them: what enabling them gives), three steps in all; model state kept."""
    model, tail = fm.model, fm._tail

    def step(run=lambda: fm(*args, **kwargs)):
        value = (loss or _default_loss)(run())
        if value is not None and value.requires_grad:
            value.backward()

    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    trainable = tail.trainable_blocks()

    def recomputed():  # as configured, every trainable block under checkpoint: memory_budget's floor
        with checkpointed(model, list(trainable)):
            step()

    options = {"naive freezing (no segment)": lambda: step(lambda: model(*args, **kwargs))}
    if trainable:
        options["every trainable block recomputed"] = recomputed
    if fm.kernels is False:
        from .ops.substitute import swapped

        def lean():
            with swapped(model, tail.substitutions("auto")):
                step(lambda: model(*args, **kwargs))

        options["lean ops (kernels='auto')"] = lean
    cache = None
    if fm.cache is not None:
        cache = {name: t["bytes"] for name, t in fm.cache.stats()["tiers"].items() if t["bytes"]}
    frozen = fm.frozen_parameters()
    seg = fm.segment
    own = {"freezert's weight copies (folded, cast, one-byte)": seg.own_bytes()} if seg is not None else {}
    try:
        with torch.random.fork_rng(devices=sorted({p.device.index for p in params if p.is_cuda})):
            rep = memory_report(
                model,
                step,
                blocks=trainable,
                optimizer=optimizer,
                frozen=frozen,
                cache_bytes=cache,
                extra=own,
                options=options,
            )
            rep.options = {"freezert (as configured)": dict(rep.rows)["saved activations"], **rep.options}
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
    rep.weights = _weight_options(fm, frozen)
    rep.notes.append(
        "the frozen parameters are the user's model's own: freezert's copies are counted on their own row, and "
        "weights='int8'/'fp8' adds one-byte copies beside them (offload_frozen=True moves the float originals a "
        "one-byte segment no longer reads to host memory on CUDA)"
    )
    if plot is not None:
        rep.plot(plot)
    return rep


def _weight_options(fm: FrozenModel, frozen: list[nn.Parameter]) -> dict[str, int]:
    """Bytes of the frozen weights as stored now, pre-cast to 16 bits, and at one byte with their scales."""
    from .segment import ONE_BYTE

    as_is = sum(p.numel() * p.element_size() for p in frozen)
    group, least = ONE_BYTE["group_size"], ONE_BYTE["min_weights"]
    layers = [
        m
        for _, mod in fm._plan.frozen_named()
        for m in mod.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.numel() >= least
    ]
    w = {id(m.weight) for m in layers}
    one_byte = sum(p.numel() * (1 if id(p) in w else p.element_size()) for p in frozen)
    # a float32 scale per group of each row (the segment's scheme: freezert.segment.ONE_BYTE)
    one_byte += sum(m.weight.shape[0] * -(-(m.weight.numel() // m.weight.shape[0]) // group) * 4 for m in layers)
    return {
        "as stored now": as_is,
        "float16 / bfloat16 (dtype=)": sum(p.numel() * min(2, p.element_size()) for p in frozen),
        "one byte + scales (weights='int8' or 'fp8')": one_byte,
    }
