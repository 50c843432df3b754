"""Freezing decisions: ``Linear`` (Composer's), ``FreezeOut``, ``GradientNorm`` (AutoFreeze) and ``Unfreeze``.

Each schedule maps training progress in [0, 1] (and, for ``GradientNorm``, the gradient norms it observes) to a
sorted list of frozen block indices; the ``Schedule`` base class (``base.py``) binds and applies the decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from .._errors import FreezeError
from .apply import check_not_all, frozen_of, hand_frozen
from .base import Schedule, check_fraction, check_progress

__all__ = ["FreezeOut", "GradientNorm", "Linear", "Unfreeze", "linear_fraction"]


def linear_fraction(current_duration: float, freeze_start: float = 0.5, freeze_level: float = 1.0) -> float:
    """Composer's linear schedule: 0 until ``freeze_start``, then rising linearly to ``freeze_level`` at 1."""
    current_duration = check_fraction("current_duration", current_duration)
    freeze_start = check_fraction("freeze_start", freeze_start)
    freeze_level = check_fraction("freeze_level", freeze_level)
    if current_duration <= freeze_start:
        return 0.0
    # Same operations in the same order as Composer, so the floats agree bit for bit.
    elapsed = current_duration - freeze_start
    total = 1.0 - freeze_start
    return freeze_level * (elapsed / total)


class Linear(Schedule):
    """Composer's linear schedule on blocks: depth ``int(pct * (n_blocks - 1))``, only ever growing.

    ``pct`` is 0 until ``freeze_start``, then rises linearly to ``freeze_level`` at the end of training.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0):
        super().__init__()
        self.freeze_start = check_fraction("freeze_start", freeze_start)
        self.freeze_level = check_fraction("freeze_level", freeze_level)
        self._depth = 0

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        pct = linear_fraction(check_progress(progress), self.freeze_start, self.freeze_level)
        self._depth = max(self._depth, int(pct * max(n_blocks - 1, 0)))
        return list(range(min(self._depth, max(n_blocks - 1, 0))))

    def _decision_state(self) -> dict:
        return {"depth": self._depth}

    def _load_decision_state(self, state: dict) -> None:
        self._depth = int(state["depth"])

    def __repr__(self) -> str:
        return f"Linear(freeze_start={self.freeze_start}, freeze_level={self.freeze_level})"


_SCALES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "squared": lambda x: x * x,
    "cubic": lambda x: x * x * x,
}


class FreezeOut(Schedule):
    """FreezeOut (Brock et al., 2017): block ``i`` freezes once progress reaches its cut-off time ``t_i``.

    By default ``t_i = scale(t0 + (1 - t0) * i / (n - 1))`` with ``scale`` linear, squared or cubic, so the last
    block's time is 1 (it is never frozen); or pass ``times`` explicitly (one per block, or one per block but
    the last). ``lr_factor`` gives FreezeOut's per-block cosine annealing if you want to apply it.
    """

    def __init__(self, t0: float = 0.8, scale: str = "cubic", *, times: Sequence[float] | None = None):
        super().__init__()
        self.t0 = check_fraction("t0", t0)
        if scale not in _SCALES:
            raise FreezeError(f"scale={scale!r} is not one of {sorted(_SCALES)}")
        self.scale = scale
        self.times = None if times is None else [check_fraction(f"times[{i}]", t) for i, t in enumerate(times)]
        self._frozen: set[int] = set()

    def cutoffs(self, n_blocks: int) -> list[float]:
        """Cut-off time of each block (the last block's is ignored: it is never frozen)."""
        if self.times is not None:
            if len(self.times) not in (n_blocks, n_blocks - 1):
                raise FreezeError(
                    f"FreezeOut got {len(self.times)} cut-off times for a model of {n_blocks} blocks; "
                    f"pass {n_blocks - 1} or {n_blocks}"
                )
            return list(self.times) + ([1.0] if len(self.times) == n_blocks - 1 else [])
        f = _SCALES[self.scale]
        if n_blocks == 1:
            return [1.0]
        return [f(self.t0 + (1.0 - self.t0) * i / (n_blocks - 1)) for i in range(n_blocks)]

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = check_progress(progress)
        t = self.cutoffs(n_blocks)
        self._frozen |= {i for i in range(n_blocks - 1) if progress >= t[i]}
        return sorted(i for i in self._frozen if i < n_blocks - 1)

    def lr_factor(self, block: int, progress: float, n_blocks: int) -> float:
        """FreezeOut's cosine annealing of block ``block``'s learning rate: 1 at 0, 0 at its cut-off."""
        t = self.cutoffs(n_blocks)[block]
        if t <= 0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * min(check_progress(progress) / t, 1.0)))

    def _decision_state(self) -> dict:
        return {"frozen": sorted(self._frozen)}

    def _load_decision_state(self, state: dict) -> None:
        self._frozen = set(state["frozen"])

    def __repr__(self) -> str:
        return f"FreezeOut(t0={self.t0}, scale={self.scale!r}, times={self.times})"


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear interpolation) percentile, without numpy."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class GradientNorm(Schedule):
    """AutoFreeze's rule (Liu et al., 2021): freeze the prefix whose gradient-norm change rate fell behind.

    Training is split into ``intervals`` equal evaluation intervals. Over each, every trainable block's per-step
    gradient L2 norms are summed; at an interval's end the change rate is ``|prev - cur| / prev``. With ``thr``
    the ``percentile``-th percentile of the rates of the still-trainable blocks, the frozen prefix grows up to
    the first trainable block whose rate is ``>= thr``; the last block is never frozen. (AutoFreeze sums the
    gradient vectors and then takes their norm; summing per-step norms needs no parameter-sized buffer.)
    """

    needs_grad_norms = True

    def __init__(self, intervals: int = 10, percentile: float = 50.0):
        super().__init__()
        if isinstance(intervals, bool) or not isinstance(intervals, int) or intervals < 2:
            raise FreezeError(f"intervals={intervals!r} must be an integer >= 2 (AutoFreeze used 10 to 20)")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise FreezeError(f"percentile={percentile!r} is outside [0, 100]; AutoFreeze's default is 50")
        self.intervals = intervals
        self.percentile = float(percentile)
        self._depth = 0
        self._acc: list[float] | None = None
        self._count = 0
        self._prev: list[float] | None = None
        self._evaluated = 0
        self.rates: list[float | None] | None = None  # last evaluation's change rates, for inspection

    def observe(self, grad_norms: Sequence[float | None]) -> None:
        vals = [None if g is None else float(g) for g in grad_norms]
        if self._acc is None or len(self._acc) != len(vals):
            self._acc = [0.0] * len(vals)
        for i, g in enumerate(vals):
            if g is not None and math.isfinite(g):
                self._acc[i] += g
        self._count += 1

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = check_progress(progress)
        boundary = min(int(progress * self.intervals + 1e-9), self.intervals)
        if boundary > self._evaluated and self._count > 0:
            self._evaluated = boundary
            self._evaluate(n_blocks)
        return list(range(min(self._depth, max(n_blocks - 1, 0))))

    def _evaluate(self, n_blocks: int) -> None:
        cur = list(self._acc or [0.0] * n_blocks)[:n_blocks]
        cur += [0.0] * (n_blocks - len(cur))
        self._acc, self._count = None, 0
        prev, self._prev = self._prev, cur
        if prev is None:
            return
        rates: list[float | None] = [None] * n_blocks
        for i in range(self._depth, n_blocks):
            if prev[i] > 0 and cur[i] > 0:  # zero: frozen or gradient-free this interval
                rates[i] = abs(prev[i] - cur[i]) / prev[i]
        self.rates = rates
        live = [r for r in rates if r is not None]
        if not live:
            return
        thr = _percentile(live, self.percentile)
        first = next(i for i, r in enumerate(rates) if r is not None and r >= thr)
        self._depth = max(self._depth, min(first, n_blocks - 1))

    def _decision_state(self) -> dict:
        return {
            "depth": self._depth,
            "acc": self._acc,
            "count": self._count,
            "prev": self._prev,
            "evaluated": self._evaluated,
        }

    def _load_decision_state(self, state: dict) -> None:
        self._depth = int(state["depth"])
        self._acc = None if state["acc"] is None else list(state["acc"])
        self._count = int(state["count"])
        self._prev = None if state["prev"] is None else list(state["prev"])
        self._evaluated = int(state["evaluated"])

    def __repr__(self) -> str:
        return f"GradientNorm(intervals={self.intervals}, percentile={self.percentile})"


class Unfreeze(Schedule):
    """Returns frozen blocks to training at progress ``at`` as a new param group with learning rate ``lr``.

    ``blocks`` says what is frozen before ``at``: an int (the first N blocks), a list of indices, another
    schedule (e.g. ``Linear``: progressive freezing, then everything trains again), or None (whatever is frozen
    when attached, e.g. by ``wrap(model, freeze=N)``, as in Lightning's ``BackboneFinetuning``). With ``at`` a
    list of increasing times, the frozen blocks come back in equal chunks from the top (gradual unfreezing);
    ``lr`` may then be a list with one rate per stage. ``lr=None`` keeps the rate of the group they left.
    """

    _keeps_initial = False

    def __init__(
        self,
        at: float | Sequence[float],
        lr: float | Sequence[float | None] | None = None,
        blocks: int | Sequence[int] | Schedule | None = None,
    ):
        super().__init__()
        ats = [at] if isinstance(at, (int, float)) and not isinstance(at, bool) else list(at)  # type: ignore[arg-type]
        if not ats:
            raise FreezeError("Unfreeze(at=[]) has no time; pass a fraction of training such as at=0.5")
        self.at = [check_fraction(f"at[{i}]" if len(ats) > 1 else "at", a) for i, a in enumerate(ats)]
        if any(b <= a for a, b in zip(self.at, self.at[1:])):
            raise FreezeError(f"at={self.at} is not strictly increasing; pass the unfreezing times in order")
        lrs = list(lr) if isinstance(lr, Sequence) else [lr] * len(self.at)
        if len(lrs) != len(self.at):
            raise FreezeError(f"lr has {len(lrs)} values for {len(self.at)} unfreezing times; pass one per time")
        for v in lrs:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise FreezeError(f"lr={v!r} is not a non-negative number; pass a learning rate such as 1e-4")
        self.lr = lrs
        if isinstance(blocks, int) and not isinstance(blocks, bool) and blocks < 0:
            raise FreezeError(f"blocks={blocks} is negative; pass a block count, a list of indices or a schedule")
        self.blocks_spec = blocks
        self._stage = 0  # number of unfreezing times passed
        self._snapshot: list[int] | None = None  # the frozen set when the first stage came
        self._last: list[int] | None = None  # the last decision before the first stage

    def _initial_from(self, target: nn.Module) -> tuple[int, ...]:
        spec = self.blocks_spec
        n = len(self._blocks or [])
        if spec is None:  # whatever freezert froze, else (a plain module) the blocks frozen by hand
            return frozen_of(target) or hand_frozen(self._blocks or [])
        if isinstance(spec, Schedule):
            return ()
        return tuple(self._static(n))

    def _static(self, n: int) -> list[int]:
        spec = self.blocks_spec
        if isinstance(spec, int):
            if spec > n:
                raise FreezeError(f"Unfreeze(blocks={spec}) is past the end of the {n} blocks; pass at most {n - 1}")
            if self._target is not None:  # every block: allowed when a head outside them trains (apply_freeze's rule)
                check_not_all(spec, self._target, self._blocks or [], f"Unfreeze(blocks={spec})")
            elif spec == n:
                raise FreezeError(f"Unfreeze(blocks={spec}) freezes every block of {n}; pass at most {n - 1}")
            return list(range(spec))
        idx = sorted(set(spec))  # type: ignore[arg-type]
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise FreezeError(f"Unfreeze blocks index {i!r} is outside 0..{n - 1}")
        return idx

    def _before(self, progress: float, n_blocks: int) -> list[int]:
        spec = self.blocks_spec
        if isinstance(spec, Schedule):
            return sorted(spec.frozen_blocks(progress, n_blocks))
        if spec is None:
            return list(self._initial)
        return self._static(n_blocks)

    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        progress = check_progress(progress)
        stage = sum(1 for a in self.at if progress >= a)
        if stage == 0 and self._stage == 0:
            self._last = self._before(progress, n_blocks)
            return list(self._last)
        if self._snapshot is None:  # what was frozen just before the first unfreezing time
            self._snapshot = list(self._last) if self._last is not None else self._before(progress, n_blocks)
        self._stage = max(self._stage, stage)
        s = self._snapshot
        k = len(self.at)
        # Chunk j of k (0 = deepest) comes back at stage j + 1; np.array_split sizes, taken from the top.
        sizes = [len(s) // k + (1 if j < len(s) % k else 0) for j in range(k)]
        keep = len(s) - sum(sizes[: self._stage])
        return s[:keep]

    def unfreeze_lr(self) -> float | None:
        return self.lr[self._stage - 1] if self._stage > 0 else None

    def _decision_state(self) -> dict:
        inner = self.blocks_spec._decision_state() if isinstance(self.blocks_spec, Schedule) else None
        return {"stage": self._stage, "snapshot": self._snapshot, "last": self._last, "inner": inner}

    def _load_decision_state(self, state: dict) -> None:
        self._stage = int(state["stage"])
        self._snapshot = None if state["snapshot"] is None else list(state["snapshot"])
        self._last = None if state.get("last") is None else list(state["last"])
        if isinstance(self.blocks_spec, Schedule) and state.get("inner") is not None:
            self.blocks_spec._load_decision_state(state["inner"])

    def __repr__(self) -> str:
        return f"Unfreeze(at={self.at}, lr={self.lr}, blocks={self.blocks_spec!r})"
