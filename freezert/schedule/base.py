"""The ``Schedule`` base class: binding a decision to a model and optimizers, stepping it, checkpoints.

A schedule only *decides* a frozen set of blocks from training progress (subclasses in ``decide.py``); attached
to a model and optimizer(s) it also carries each decision out through ``apply_freeze`` and records enough to
resume into new objects. This module also holds the validation of fractions shared by the schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .._errors import FreezeError
from ..monitor import block_grad_norms
from .apply import FreezeChange, apply_freeze, frozen_now, resolve_blocks
from .optim import as_optimizers, optimizer_layout, param_names, restore_layout, same_optimizer

__all__ = ["STATE_VERSION", "Schedule", "check_fraction", "check_progress"]

#: Version of every checkpoint state the schedule package writes (schedules and the functional form).
STATE_VERSION = 1


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in [0, 1]; else a FreezeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise FreezeError(f"{name}={value!r} is outside [0, 1]; pass a fraction between 0 and 1")
    return float(value)


def check_progress(progress: Any) -> float:
    """Training progress as a float in [0, 1]; else a FreezeError that says how to compute it."""
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not (0.0 <= progress <= 1.0):
        raise FreezeError(
            f"progress={progress!r} is outside [0, 1]; pass the fraction of training done, e.g. step / total_steps"
        )
    return float(progress)


class Schedule:
    """Base class: decides the frozen blocks from progress in [0, 1]; ``attach``-ed, it also applies them.

    Plain loop::

        sched = Linear(0.5, 1.0).attach(model, optimizer, blocks=blocks)
        for step in range(total):
            loss = ...; loss.backward()
            sched.after_backward()          # only GradientNorm reads gradients
            optimizer.step(); optimizer.zero_grad()
            sched.step((step + 1) / total)  # applies a new frozen set when the decision changes
    """

    #: Monotone schedules keep whatever was frozen when they were attached (e.g. ``wrap(model, freeze=4)``).
    _keeps_initial = True
    #: Whether ``after_backward`` must compute per-block gradient norms.
    needs_grad_norms = False

    def __init__(self) -> None:
        self._target: nn.Module | None = None
        self._blocks: list[tuple[str, nn.Module]] | None = None
        self._optimizers: list[Optimizer] = []
        self._initial: tuple[int, ...] = ()
        self._current: tuple[int, ...] = ()
        self._pending: dict | None = None
        self._lr_schedulers: list[Any] = []
        self.train_bn = False

    # -- decision (pure apart from the schedule's own memory) ---------------------------------------------
    def frozen_blocks(self, progress: float, n_blocks: int) -> list[int]:
        """Sorted block indices to freeze at ``progress`` for a model of ``n_blocks`` blocks."""
        raise NotImplementedError

    def observe(self, grad_norms: Sequence[float | None]) -> None:
        """Per-block gradient L2 norms of one step (None for frozen blocks); ignored by most schedules."""

    def unfreeze_lr(self) -> float | None:
        """Learning rate for parameters returned to training now (None: that of the group they left)."""
        return None

    def _decision_state(self) -> dict:
        return {}

    def _load_decision_state(self, state: dict) -> None:
        pass

    # -- binding and application ----------------------------------------------------------------------------
    def attach(
        self,
        target: nn.Module | None = None,
        optimizer: Optimizer | Sequence[Optimizer] | None = None,
        *,
        blocks: Sequence[Any] | None = None,
        lr_schedulers: Any = None,
        train_bn: bool | None = None,
    ) -> Schedule:
        """Binds the schedule to a model (FrozenModel or plain module + ``blocks``) and optimizer(s); returns self.

        Call again with only ``optimizer=`` to bind an optimizer created later (after wrapping, or a new fit's):
        the frozen set leaves it. ``train_bn=True`` keeps frozen blocks' BatchNorms training (plain modules). LR
        schedulers passed as ``lr_schedulers`` learn about param groups added by unfreezing (their
        ``base_lrs`` grow); without that, torch's schedulers leave a new group's learning rate untouched.
        """
        if lr_schedulers is not None:
            self._lr_schedulers = list(lr_schedulers) if isinstance(lr_schedulers, (list, tuple)) else [lr_schedulers]
        if train_bn is not None:
            self.train_bn = bool(train_bn)
        rebind = target is None and optimizer is not None
        if target is not None:
            self._target = target
            self._blocks = resolve_blocks(target, blocks)
            self._current = frozen_now(target, self._blocks)
            self._initial = self._initial_from(target)
        if optimizer is not None:
            self._optimizers = as_optimizers(optimizer)
        if self._target is None:
            raise FreezeError("attach() needs a model the first time; pass attach(model, optimizer)")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)
        elif rebind and self._current:
            # A new optimizer (a new fit, a rebuilt trainer): the frozen set leaves it too.
            self._apply(self._current)
        elif self._initial:
            # Frozen parameters leave the optimizer from the start (the user may have passed them all).
            self._apply(self._current if self._keeps_initial else self._initial)
        return self

    def _initial_from(self, target: nn.Module) -> tuple[int, ...]:
        return frozen_now(target, self._blocks or [])

    @property
    def frozen(self) -> list[int]:
        """Block indices frozen now by this schedule."""
        return list(self._current)

    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks this schedule counts (after ``attach``)."""
        self._require_attached()
        return list(self._blocks or [])

    def _require_attached(self) -> None:
        if self._target is None:
            raise FreezeError(
                f"this {type(self).__name__} schedule is not attached; call .attach(model, optimizer) first "
                "(or use .frozen_blocks(progress, n_blocks) for the decision alone)"
            )

    def _apply(self, indices: Sequence[int], lr: float | None = None) -> FreezeChange:
        counts = [len(o.param_groups) for o in self._optimizers]
        change = apply_freeze(
            self._target, self._optimizers, indices, blocks=self._blocks, lr=lr, train_bn=self.train_bn
        )
        self._current = tuple(sorted(set(indices)))
        for opt, n in zip(self._optimizers, counts):
            for sch in self._lr_schedulers:
                if same_optimizer(getattr(sch, "optimizer", None), opt) and isinstance(
                    getattr(sch, "base_lrs", None), list
                ):
                    for g in opt.param_groups[n:]:
                        g.setdefault("initial_lr", g["lr"])
                        sch.base_lrs.append(g["initial_lr"])
                        if isinstance(getattr(sch, "_last_lr", None), list):
                            sch._last_lr.append(g["lr"])
                        lambdas = getattr(sch, "lr_lambdas", None)  # LambdaLR, MultiplicativeLR: one per group
                        if isinstance(lambdas, list) and lambdas:
                            lambdas.append(lambdas[0])
        return change

    def step(self, progress: float) -> FreezeChange:
        """Applies the frozen set for ``progress``; the returned change is truthy when the set changed.

        Under DistributedDataParallel, rebuild the DDP wrapper when it is truthy (``rebuild_ddp``).
        """
        self._require_attached()
        progress = check_progress(progress)
        assert self._blocks is not None
        want = set(self.frozen_blocks(progress, len(self._blocks)))
        if self._keeps_initial:
            want |= set(self._initial)
        new = tuple(sorted(want))
        if new == self._current:
            return FreezeChange()
        return self._apply(new, lr=self.unfreeze_lr())

    def after_backward(self) -> None:
        """Feeds the per-block gradient norms of this step to schedules that use them (GradientNorm)."""
        if self.needs_grad_norms:
            self._require_attached()
            assert self._blocks is not None
            self.observe(block_grad_norms(self._blocks))

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Schedule memory, the frozen set and (attached) each optimizer's param-group layout by parameter name."""
        d: dict[str, Any] = {
            "version": STATE_VERSION,
            "kind": type(self).__name__,
            "decision": self._decision_state(),
            "initial": list(self._initial),
            "frozen": list(self._current),
            "optimizers": None,
        }
        if self._target is not None and self._optimizers:
            names = param_names(self._target)
            d["optimizers"] = [optimizer_layout(o, names) for o in self._optimizers]
        return d

    def load_state_dict(self, state: dict) -> None:
        """Restores the schedule and, attached, re-applies the frozen set and rebuilds the optimizer's groups.

        Call it *before* ``optimizer.load_state_dict``: the optimizer's groups then have the saved layout.
        Unattached, the state is kept and applied at ``attach``.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise FreezeError(
                f"schedule state version {state.get('version') if isinstance(state, dict) else state!r} is not "
                f"understood; this freezert reads version {STATE_VERSION}"
            )
        if state.get("kind") != type(self).__name__:
            raise FreezeError(
                f"the checkpoint holds a {state.get('kind')} schedule's state, not a {type(self).__name__}'s; "
                "resume with the same schedule class"
            )
        self._load_decision_state(state["decision"])
        self._initial = tuple(state["initial"])
        if self._target is None:
            self._pending = state
            return
        frozen = tuple(state["frozen"])
        apply_freeze(self._target, self._optimizers, frozen, blocks=self._blocks, train_bn=self.train_bn)
        self._current = frozen
        layouts = state.get("optimizers")
        if layouts is not None and self._optimizers:
            if len(layouts) != len(self._optimizers):
                raise FreezeError(
                    f"the checkpoint has {len(layouts)} optimizer layout(s) but {len(self._optimizers)} optimizer(s) "
                    "are attached; attach the same optimizers as the run that saved it"
                )
            by_name = {n: p for n, p in self._target.named_parameters(remove_duplicate=True)}
            for opt, lay in zip(self._optimizers, layouts):
                restore_layout(opt, lay, by_name)
        elif layouts is not None:
            self._pending = state  # no optimizer yet: finish when one is attached
