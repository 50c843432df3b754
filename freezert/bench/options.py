"""What each freezert option saves on the user's model (``freezert bench --model ... --input SHAPE``).

Naive freezing, freezert's defaults (the lean ops on large tensors), the lean ops on every tensor
(``kernels="lean"``), the eager kernels (``kernels=False``), the feature cache and
each memory option (``memory_budget``, one-byte frozen weights; ``dtype=float16`` on CUDA), each on its own copy
of the model, trained on the same synthetic inputs and stepped in turn, one step each per round with the order
rotated every round.
Measured per option: every step's time, the bytes autograd saves for backward in one step
(``freezert.memory.SavedMeter``), the CUDA peak of its steps, and the largest difference of its outputs from naive
freezing's on the same inputs and weights.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._errors import FreezeError, FreezeWarning
from .._units import fmt_bytes
from .catalog import NAIVE
from .runner import _NoProgress
from .stats import quartiles
from .variants import BenchError
from .zoo import naive_freeze, output_tensors

BUDGET_FRACTION = 0.5  # memory_budget: this fraction of what freezert's defaults save for backward
# ... or, where that is below what recomputing every trainable block still keeps, the first of these that fits
_BUDGET_FALLBACKS = (0.75, 0.9)
DEFAULTS = "freezert"


@dataclass(frozen=True)
class Option:
    """One row of the comparison: ``freezert.wrap`` keyword arguments beside ``freeze=`` (naive: no wrap)."""

    label: str
    kwargs: dict = field(default_factory=dict)
    naive: bool = False
    budget_fraction: float | None = None  # memory_budget= this fraction of the defaults' saved bytes


def default_options(device: torch.device) -> list[Option]:
    """Naive freezing, the defaults, the cache and each memory option (``dtype=float16`` on CUDA only)."""
    opts = [
        Option(NAIVE, naive=True),
        Option(DEFAULTS),
        Option("cache='fp16'", {"cache": "fp16"}),
        Option("kernels='lean'", {"kernels": "lean"}),  # the defaults take tensors of 2**17 elements up only
        Option("kernels=False", {"kernels": False}),
        # recomputation measured on the eager kernels: the lean defaults keep so little that checkpointing a block
        # rarely frees more than its inputs and outputs cost
        Option("memory_budget", {"kernels": False}, budget_fraction=BUDGET_FRACTION),
        Option("weights='int8'", {"weights": "int8"}),
    ]
    if device.type == "cuda":
        opts.append(Option("dtype=float16", {"dtype": torch.float16}))
    return opts


@dataclass
class OptionResult:
    """One option's numbers; ``skipped`` says why it could not run on this model (then it has no numbers)."""

    label: str
    step_ms: list[float] = field(default_factory=list)
    saved_bytes: int | None = None  # saved for backward in one training step
    peak_bytes: int | None = None  # CUDA: the largest peak of its steps, plus what it keeps resident
    max_error: float | None = None  # max |output - naive's output| on the same inputs and weights
    rel_error: float | None = None  # max_error / max |naive's output|
    trainable: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    kwargs: dict[str, str] | None = None  # the wrap() options (repr of each value); None for naive freezing

    @property
    def median_ms(self) -> float:
        return quartiles(self.step_ms)[1]

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = quartiles(self.step_ms)
        return q3 - q1


@dataclass
class OptionsRun:
    """What :func:`measure` measured, in option order; ``stopped`` says why the rounds ended early."""

    results: list[OptionResult]
    rounds: int
    stopped: str | None
    frozen_params: int
    total_params: int


def loss_of(out) -> torch.Tensor:
    """The stand-in loss: the mean square of every floating output that needs a gradient, summed."""
    ts = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not ts:
        raise BenchError(
            "the model's output holds no tensor that needs a gradient, so nothing trains; freeze fewer blocks"
        )
    return torch.stack([t.float().pow(2).mean() for t in ts]).sum()


class _Run:
    """One option on its own copy of the model: its module, an SGD optimizer over what trains, a timed step."""

    def __init__(self, option: Option, module: nn.Module, device: torch.device):
        self.option, self.module, self.device = option, module, device
        params = {id(p): p for p in module.parameters() if p.requires_grad}
        self.opt = torch.optim.SGD(list(params.values()), lr=1e-3, momentum=0.9)
        self.exclude = [*module.parameters(), *module.buffers()]
        self.result = OptionResult(option.label, trainable=sum(p.numel() for p in params.values()))
        self.static_bytes = 0
        self.peaks: list[int] = []
        self.outs: list[torch.Tensor] | None = None  # the checked forward's outputs, until compared
        self.plain: nn.Module | None = None  # the model copy inside ``module``

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch: tuple, meter: bool = False) -> float:
        """One optimizer step; returns its wall time in ms. ``meter``: count what it saves for backward."""
        from ..memory import SavedMeter

        cuda = self.device.type == "cuda"
        self._sync()
        if cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        if meter:
            with SavedMeter(exclude=self.exclude) as saved:
                loss = loss_of(self.module(*batch))
            self.result.saved_bytes = saved.total
        else:
            loss = loss_of(self.module(*batch))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        ms = (time.perf_counter() - t0) * 1e3
        if cuda:
            self.peaks.append(torch.cuda.max_memory_allocated(self.device) - base + self.static_bytes)
        return ms


def _outputs(module: nn.Module, batch: tuple, seed: int) -> list[torch.Tensor]:
    """One forward with autograd on (the first call records the plan as a training call would), outputs detached;
    seeded, so dropout in the trainable part draws the same masks in every option."""
    torch.manual_seed(seed)
    return [t.detach() for t in output_tensors(module(*batch))]


def _error(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float | None, float | None]:
    if len(outs) != len(ref) or any(a.shape != b.shape for a, b in zip(outs, ref)):
        return None, None
    pairs = [(a.double(), b.double()) for a, b in zip(outs, ref) if b.is_floating_point()]
    if not pairs:
        return None, None
    err = max(float((a - b).abs().max()) for a, b in pairs if a.numel())
    scale = max(float(b.abs().max()) for _, b in pairs if b.numel())
    return err, err / scale if scale else None


def _wrap(model: nn.Module, freeze, option: Option, bn: str) -> nn.Module:
    from ..wrapper import wrap

    return wrap(model, freeze, bn=bn, **option.kwargs)


def measure(
    model: nn.Module,
    batches: list[tuple],
    freeze,
    device: torch.device,
    *,
    options: list[Option] | None = None,
    rounds: int = 30,
    warmup: int = 1,
    deadline: float | None = None,
    bn: str = "frozen",
    seed: int = 0,
    progress=None,
) -> OptionsRun:
    """Sets up each option on a copy of ``model``, then steps them in turn for up to ``rounds`` rounds.

    ``batches``: tuples of positional inputs, cycled. Setup per option: one checked forward (its outputs against
    naive freezing's), for the cache a pass over ``batches`` and the check on a hit, then ``warmup`` training
    steps, the last one metered. ``deadline`` (a ``time.perf_counter()`` value) ends the rounds once passed (after
    the first). Options that cannot run on this model are kept with ``skipped`` set. The first option must be
    naive freezing, the second freezert's defaults: naive freezes what the defaults froze, and
    ``memory_budget`` is a fraction of the defaults' saved bytes.
    """
    options = list(options or default_options(device))
    if len(options) < 2 or not options[0].naive or options[1].kwargs or options[1].naive:
        raise BenchError("the options must start with naive freezing and freezert's defaults")
    warmup = max(warmup, 1)  # the metered step
    bar = progress or _NoProgress()
    cuda = device.type == "cuda"
    runs: dict[int, _Run] = {}
    results: dict[int, OptionResult] = {}

    def setup(i: int, frozen: set[str] | None = None) -> _Run | None:
        option = options[i]
        kwargs = None if option.naive else {k: repr(v) for k, v in option.kwargs.items()}
        before = torch.cuda.memory_allocated(device) if cuda else 0
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", FreezeWarning)
            try:
                plain = copy.deepcopy(model).to(device).train()
                module = naive_freeze(plain, frozen or set()) if option.naive else _wrap(plain, freeze, option, bn)
                outs = _outputs(module, batches[0], seed)
                if not option.naive:
                    # The first call records the plan and runs the segment unfolded, in the model's dtype: exact.
                    # The outputs checked are a later call's (BatchNorm folded, weights cast or one-byte); with the
                    # cache, once it holds every batch, a hit's.
                    if getattr(module, "cache", None) is not None:
                        for b in batches[1:]:
                            _outputs(module, b, seed)
                    outs = _outputs(module, batches[0], seed)
                run = _Run(option, module, device)  # the optimizer after the first call: the stem is frozen then
                for k in range(warmup):
                    run.step(batches[k % len(batches)], meter=k == warmup - 1)
                    bar.update()
            except FreezeError as e:
                results[i] = OptionResult(option.label, kwargs=kwargs, skipped=str(e))
                return None
        run.result.notes += sorted({str(w.message) for w in seen if issubclass(w.category, FreezeWarning)})
        if cuda:
            run.static_bytes = torch.cuda.memory_allocated(device) - before
        run.outs, run.plain, run.result.kwargs = outs, plain, kwargs
        runs[i], results[i] = run, run.result
        return run

    # freezert's defaults first: naive freezing freezes exactly what they froze (the stem is known after a call)
    if setup(1) is None:
        raise FreezeError(results[1].skipped)
    if setup(0, frozen={n for n, p in runs[1].plain.named_parameters() if not p.requires_grad}) is None:
        raise BenchError(results[0].skipped)
    saved = runs[0].result.saved_bytes or 0  # naive freezing's: what a budget on the eager kernels cuts
    for i in range(2, len(options)):
        o = options[i]
        if o.budget_fraction is None:
            run = setup(i)
        else:  # resolved now that the defaults' saved bytes are known
            for fraction in (o.budget_fraction, *(f for f in _BUDGET_FALLBACKS if f > o.budget_fraction)):
                budget = max(int(saved * fraction), 1)
                extra = "".join(f", {k}={v}" for k, v in o.kwargs.items())  # e.g. kernels=False
                name = f"memory_budget={fmt_bytes(budget)}{extra}"
                options[i] = Option(name, {**o.kwargs, "memory_budget": budget})
                run = setup(i)
                if run is not None:
                    break
        if run is not None and getattr(run.module, "recompute", None):
            run.result.notes.append(f"recomputes {', '.join(run.module.recompute)} in backward")
    ref = runs[0].outs
    for run in runs.values():
        run.result.max_error, run.result.rel_error = _error(run.outs, ref)
        run.outs = None

    order = [runs[i] for i in sorted(runs)]
    misses = {i: r.module.cache.stats()["misses"] for i, r in runs.items() if getattr(r.module, "cache", None)}
    done, stopped = 0, None
    while done < rounds:
        for j in range(len(order)):
            run = order[(done + j) % len(order)]  # rotated: no option always runs right after the same one
            run.result.step_ms.append(run.step(batches[done % len(batches)]))
            bar.update()
        done += 1
        if deadline is not None and done < rounds and time.perf_counter() > deadline:
            stopped = f"the time budget ran out after {done} of {rounds} rounds"
            break
    for i, run in runs.items():
        if run.peaks:
            run.result.peak_bytes = max(run.peaks)
        if i in misses:
            m = run.module.cache.stats()["misses"] - misses[i]
            run.result.notes.append(
                "every timed step was served from the cache" if m == 0 else f"{m} cache misses in the timed steps"
            )
    frozen_params = sum(p.numel() for p in runs[1].plain.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in runs[1].plain.parameters())
    return OptionsRun([results[i] for i in range(len(options))], done, stopped, frozen_params, total)
