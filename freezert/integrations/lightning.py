"""Lightning: ``FreezertFinetuning`` (``BaseFinetuning``'s extension points) and ``BackboneFinetuning``.

Drop-in for ``lightning.pytorch.callbacks.BackboneFinetuning`` (same arguments, same learning-rate ramp)::

    from freezert.integrations.lightning import BackboneFinetuning
    trainer = Trainer(callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=10)])

What freezert does differently (docs/INTEGRATIONS.md): frozen parameters leave the optimizer and their state
is purged; BatchNorms frozen with ``train_bn=False`` run in eval mode (fixed statistics, as ``wrap``'s
``bn="frozen"``) instead of Lightning's ``track_running_stats=False``; the checkpoint holds the frozen set, so a
resumed fit (with a new callback or the same one) gets the same ``requires_grad`` flags and param groups.
``FreezertFinetuning(schedule=Linear(...))`` instead drives a freezert schedule over ``pl_module.backbone``
wrapped as a ``FrozenModel``, so the frozen prefix runs as freezert's inference segment.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from . import require

try:  # the unified package; the standalone pytorch_lightning has its own Callback class, used by its Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError:
        require("lightning", "lightning", "lightning")
        raise

from .._errors import FreezeError
from ..schedule import Schedule
from ..schedule.apply import _hold_eval as _fix_bn  # TEMP
from ..schedule.apply import _release_eval as _release_bn
from ..schedule.optim import (
    optimizer_layout as _layout,
)  # TEMP
from ..schedule.optim import (
    remove_params as _remove_params,
)
from ..schedule.optim import (
    restore_layout as _restore_layout,
)

__all__ = ["BackboneFinetuning", "FreezertFinetuning", "multiplicative"]


def multiplicative(epoch: int) -> float:
    """Lightning's default backbone learning-rate ramp: doubles every epoch."""
    return 2.0


def _modules(modules: nn.Module | Iterable) -> list[nn.Module]:
    """Every module under ``modules`` (a module, or nested iterables of them), each once."""
    if isinstance(modules, nn.ModuleDict):
        modules = modules.values()
    out: list[nn.Module] = []
    seen: set[int] = set()
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    for r in roots:
        subs = r.modules() if isinstance(r, nn.Module) else _modules(r)
        for m in subs:
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def _own_params(modules: list[nn.Module], train_bn: bool) -> list[nn.Parameter]:
    out, seen = [], set()
    for m in modules:
        if isinstance(m, _BatchNorm) and not train_bn:
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class FreezertFinetuning(Callback):
    """``BaseFinetuning`` with freezert's optimizer surgery and checkpointed freeze state.

    Subclass it as Lightning's ``BaseFinetuning`` (override ``freeze_before_training`` and ``finetune_function``,
    use ``freeze``/``make_trainable``/``unfreeze_and_add_param_group``), or pass ``schedule=`` (a freezert
    ``Linear``, ``FreezeOut``, ``GradientNorm`` or ``Unfreeze``): ``pl_module.<attr>`` is then wrapped with
    ``freezert.wrap`` and the schedule steps at every epoch start with progress ``epoch / max_epochs``.
    """

    def __init__(self, schedule: Schedule | None = None, *, attr: str = "backbone", **wrap_kwargs: Any) -> None:
        self.schedule = schedule
        self.attr = attr
        self.wrap_kwargs = wrap_kwargs
        self._frozen: dict[int, nn.Parameter] = {}  # parameters this callback froze
        self._fixed_bns: dict[int, _BatchNorm] = {}  # BatchNorms held in eval mode
        self._restored: dict | None = None  # a checkpoint's state, applied at on_fit_start
        self._layouts: dict[int, dict] = {}
        self._pl_module: Any = None

    # -- Lightning's BaseFinetuning helpers ----------------------------------------------------------------
    def freeze(self, modules: nn.Module | Iterable, train_bn: bool = True) -> None:
        """Freezes ``modules``; their BatchNorms keep training with ``train_bn``, else run in eval mode."""
        for m in _modules(modules):
            if isinstance(m, _BatchNorm):
                if train_bn:
                    self._thaw_bn(m)
                    continue
                _fix_bn(m)
                self._fixed_bns[id(m)] = m
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                self._frozen[id(p)] = p

    def make_trainable(self, modules: nn.Module | Iterable) -> None:
        """Unfreezes ``modules`` (BatchNorms included) and lets their BatchNorms follow the model's mode."""
        for m in _modules(modules):
            if isinstance(m, _BatchNorm):
                self._thaw_bn(m)
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                self._frozen.pop(id(p), None)

    def _thaw_bn(self, bn: _BatchNorm) -> None:
        self._fixed_bns.pop(id(bn), None)
        _release_bn(bn, True)
        for p in bn.parameters(recurse=False):
            p.requires_grad_(True)
            self._frozen.pop(id(p), None)

    def unfreeze_and_add_param_group(
        self,
        modules: nn.Module | Iterable,
        optimizer: Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> None:
        """Unfreezes ``modules`` into a new param group: ``lr``, or group 0's lr / ``initial_denom_lr``.

        As in Lightning, ``train_bn=False`` only keeps BatchNorm parameters out of the new group.
        """
        mods = _modules(modules)
        self.make_trainable(mods)
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = _own_params(mods, train_bn)
        fresh = [p for p in params if id(p) not in present]
        if len(fresh) != len(params):
            warnings.warn(
                "The provided params to be frozen already exist within another group of this optimizer; those "
                "parameters are skipped. Did you init your optimizer with only the trainable parameters?",
                UserWarning,
                stacklevel=2,
            )
        if fresh:
            group_lr = optimizer.param_groups[0]["lr"] if lr is None else float(lr)
            optimizer.add_param_group({"params": fresh, "lr": group_lr / (initial_denom_lr if lr is None else 1.0)})

    # -- extension points ---------------------------------------------------------------------------------
    def freeze_before_training(self, pl_module: Any) -> None:
        """Override to freeze modules before ``configure_optimizers`` (with ``schedule=``: wraps ``attr``)."""
        if self.schedule is None:
            raise NotImplementedError("override freeze_before_training, or pass schedule= to FreezertFinetuning")
        from ..wrapper import FrozenModel, wrap

        inner = getattr(pl_module, self.attr, None)
        if isinstance(inner, FrozenModel):
            return
        if not isinstance(inner, nn.Module):
            raise FreezeError(f"the LightningModule has no nn.Module attribute {self.attr!r}; pass attr= naming it")
        fm = wrap(inner, freeze=self.schedule, **self.wrap_kwargs)  # loads plain keys when nested (a pre-hook)
        setattr(pl_module, self.attr, fm)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        """Override to unfreeze at epoch starts (with ``schedule=``: steps the schedule)."""
        if self.schedule is None:
            raise NotImplementedError("override finetune_function, or pass schedule= to FreezertFinetuning")

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if type(trainer.strategy).__name__.startswith("DeepSpeed"):
            raise NotImplementedError("freezert's finetuning callback does not support the DeepSpeed strategy")
        self._pl_module = pl_module  # state_dict() takes no module: names are read from this one
        if self._restored is None:
            self._frozen, self._fixed_bns = {}, {}
        self.freeze_before_training(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Binds this fit's optimizers: frozen parameters leave them, or a checkpoint's layout is restored."""
        opts = list(trainer.optimizers)
        if self.schedule is not None:
            self.schedule.attach(optimizer=opts)  # a pending checkpoint state is applied here
        restored, self._restored = self._restored, None
        if restored is not None and self.schedule is None:
            self._apply_restored(pl_module, restored, opts)
        elif self.schedule is None:
            _remove_params(opts, self._frozen)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule is not None:
            total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            if total is None:
                raise FreezeError("schedule= needs Trainer(max_epochs=N) to turn epochs into training progress")
            self.schedule.step(min(trainer.current_epoch / total, 1.0))
            return
        names = _names(pl_module)
        for i, opt in enumerate(trainer.optimizers):
            self.finetune_function(pl_module, trainer.current_epoch, opt)
            self._layouts[i] = _layout(opt, names)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule is not None and self.schedule.needs_grad_norms:
            self.schedule.after_backward()

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.schedule is not None:
            return {"schedule": self.schedule.state_dict()}
        return {
            "frozen": sorted(self._frozen_names),
            "fixed_bns": sorted(self._bn_names),
            "optimizers": {i: lay for i, lay in self._layouts.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.schedule is not None:
            # The optimizers bound now are the previous fit's: the layout must go to the next fit's, at
            # on_fit_start's attach (Schedule.load_state_dict keeps it pending while no optimizer is bound).
            self.schedule._optimizers = []
            self.schedule.load_state_dict(state_dict["schedule"])
            return
        self._restored = state_dict

    def _apply_restored(self, pl_module: Any, state: dict, opts: list[Optimizer]) -> None:
        params = dict(pl_module.named_parameters())
        modules = dict(pl_module.named_modules())
        for p in self._frozen.values():  # what setup() froze but the checkpoint had thawed trains again
            p.requires_grad_(True)
        for bn in self._fixed_bns.values():
            _release_bn(bn, pl_module.training)
        self._frozen, self._fixed_bns = {}, {}
        for n in state["frozen"]:
            params[n].requires_grad_(False)
            self._frozen[id(params[n])] = params[n]
        for n in state["fixed_bns"]:
            _fix_bn(modules[n])
            self._fixed_bns[id(modules[n])] = modules[n]
        for i, opt in enumerate(opts):
            lay = state["optimizers"].get(i)
            if lay is not None:
                _restore_layout(opt, lay, params)
                self._layouts[i] = lay
            else:
                _remove_params([opt], self._frozen)

    @property
    def _frozen_names(self) -> list[str]:
        pl = self._pl_module
        return [] if pl is None else [n for n, p in pl.named_parameters() if id(p) in self._frozen]

    @property
    def _bn_names(self) -> list[str]:
        pl = self._pl_module
        return [] if pl is None else [n for n, m in pl.named_modules() if id(m) in self._fixed_bns]


def _names(pl_module: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, p in pl_module.named_parameters():
        out.setdefault(id(p), n)
    return out


class BackboneFinetuning(FreezertFinetuning):
    """Lightning's ``BackboneFinetuning``, same arguments and learning-rate ramp, on freezert's surgery.

    Freezes ``pl_module.backbone`` before training (its BatchNorms keep training, as in Lightning), unfreezes it at
    ``unfreeze_backbone_at_epoch`` into a new param group at ``backbone_initial_lr`` (default: current lr *
    ``backbone_initial_ratio_lr``), then multiplies that lr by ``lambda_func(epoch + 1)`` each epoch, capped at
    the current lr when ``should_align``.
    """

    def __init__(
        self,
        unfreeze_backbone_at_epoch: int = 10,
        lambda_func: Callable = multiplicative,
        backbone_initial_ratio_lr: float = 10e-2,
        backbone_initial_lr: float | None = None,
        should_align: bool = True,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
        verbose: bool = False,
        rounding: int = 12,
    ) -> None:
        super().__init__()
        self.unfreeze_backbone_at_epoch = unfreeze_backbone_at_epoch
        self.lambda_func = lambda_func
        self.backbone_initial_ratio_lr = backbone_initial_ratio_lr
        self.backbone_initial_lr = backbone_initial_lr
        self.should_align = should_align
        self.initial_denom_lr = initial_denom_lr
        self.train_bn = train_bn
        self.verbose = verbose
        self.rounding = rounding
        self.previous_backbone_lr: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous_backbone_lr": self.previous_backbone_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_backbone_lr = state_dict["previous_backbone_lr"]
        super().load_state_dict(state_dict)

    def freeze_before_training(self, pl_module: Any) -> None:
        if not isinstance(getattr(pl_module, "backbone", None), nn.Module):
            raise FreezeError(
                f"{type(pl_module).__name__} has no nn.Module attribute 'backbone'; BackboneFinetuning freezes "
                "pl_module.backbone: name your feature extractor so"
            )
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        if epoch == self.unfreeze_backbone_at_epoch:
            current_lr = optimizer.param_groups[0]["lr"]
            initial = (
                self.backbone_initial_lr
                if self.backbone_initial_lr is not None
                else current_lr * self.backbone_initial_ratio_lr
            )
            self.previous_backbone_lr = initial
            self.unfreeze_and_add_param_group(
                pl_module.backbone, optimizer, initial, train_bn=self.train_bn, initial_denom_lr=self.initial_denom_lr
            )
            if self.verbose:
                print(f"Current lr: {round(current_lr, self.rounding)}, Backbone lr: {round(initial, self.rounding)}")
        elif epoch > self.unfreeze_backbone_at_epoch:
            current_lr = optimizer.param_groups[0]["lr"]
            nxt = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            nxt = current_lr if (self.should_align and nxt > current_lr) else nxt
            optimizer.param_groups[-1]["lr"] = nxt
            self.previous_backbone_lr = nxt
            if self.verbose:
                print(f"Current lr: {round(current_lr, self.rounding)}, Backbone lr: {round(nxt, self.rounding)}")
