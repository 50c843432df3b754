"""Lightning: ``BaseFinetuning`` and ``BackboneFinetuning`` drop-ins that run frozen modules as freezert's
inference segment, and ``FreezertFinetuning``, which drives a freezert schedule over ``pl_module.backbone``.

    from freezert.integrations.lightning import BackboneFinetuning   # instead of lightning's
    trainer = Trainer(callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=10)])

The drop-ins subclass Lightning's own classes: the static helpers, the learning-rate ramp, the param groups and
the checkpoint format are Lightning's. What they add: while a module the callback froze (``self.freeze(module)``;
``pl_module.backbone`` for ``BackboneFinetuning``) stays frozen, ``pl_module.<name>`` is that module wrapped by
``freezert.wrap`` (its frozen blocks from block 0 on run under no_grad as one segment; ``bn="frozen"`` also folds
BatchNorm, and ``cache=`` skips the frozen part for inputs it has seen); a resumed fit gets the saved
``requires_grad`` flags back. ``cache=True`` or a codec name keeps a disk store beside the run's checkpoints
(``<log_dir>/freezert_cache/<module>``), which a resumed fit reopens. docs/INTEGRATIONS.md lists every difference from
Lightning and why.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import require

try:  # the unified package; the standalone pytorch_lightning has its own classes, used by its Trainer
    from lightning.pytorch.callbacks import BackboneFinetuning as _LightningBackbone
    from lightning.pytorch.callbacks import BaseFinetuning as _LightningBase
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError:
    try:
        from pytorch_lightning.callbacks import BackboneFinetuning as _LightningBackbone  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import BaseFinetuning as _LightningBase  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
        from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy  # type: ignore[no-redef]
    except ImportError:
        require("lightning", "lightning", "lightning")
        raise

from .._errors import FreezeError
from ..blocks import find_blocks
from ..cache import FeatureCache
from ..config import FreezeConfig
from ..schedule import Schedule
from ..wrapper import FrozenModel, wrap
from ._stores import STORE_DIR, adopt, disk_store

__all__ = ["BackboneFinetuning", "BaseFinetuning", "FreezertFinetuning", "multiplicative"]


def multiplicative(epoch: int) -> float:
    """Lightning's default backbone learning-rate ramp: doubles every epoch."""
    return 2.0


class _StaticOrNoting:
    """Lightning's static ``freeze``; called on a callback (``self.freeze(...)``) it also notes the modules."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, owner: type | None = None):
        if obj is None:
            return self.func

        @functools.wraps(self.func)
        def freeze(modules, *args, **kwargs):
            obj._note_frozen(modules)
            return self.func(modules, *args, **kwargs)

        return freeze


def _as_modules(modules: Any) -> list[nn.Module]:
    """The modules named by ``freeze``'s argument (a module, a ModuleDict, nested iterables of them)."""
    if isinstance(modules, nn.ModuleDict):
        modules = list(modules.values())
    if isinstance(modules, nn.Module):
        return [modules]
    out: list[nn.Module] = []
    if isinstance(modules, Iterable):
        for m in modules:
            out += _as_modules(m)
    return out


def _flags(module: nn.Module) -> tuple:
    """What decides a module's frozen part: each parameter's requires_grad, each BatchNorm's track_running_stats."""
    rg = tuple(p.requires_grad for p in module.parameters())
    return rg + tuple(m.track_running_stats for m in module.modules() if isinstance(m, _BatchNorm))


def _frozen_part(module: nn.Module) -> tuple[Any, list[nn.Module]]:
    """``freeze=`` for what is frozen in ``module`` ("all", or the names of its blocks from block 0 on whose
    parameters are all frozen; None if neither), and those modules."""
    params = list(module.parameters())
    if not params:
        return None, []
    if not any(p.requires_grad for p in params):
        return "all", [module]
    try:
        blocks = find_blocks(module)
    except FreezeError:
        return None, []
    k = 0
    while k < len(blocks) and not any(p.requires_grad for p in blocks[k][1].parameters()):
        k += 1
    # By name: the wrapper's record may put the blocks in forward order, which indices would not follow.
    return ([name for name, _ in blocks[:k]] or None), [m for _, m in blocks[:k]]


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _drop(fm: FrozenModel) -> nn.Module:
    """Unwraps ``fm`` keeping the flags its model has now (the user may have changed them since the wrap)."""
    flags = [(p, p.requires_grad) for p in fm.module.parameters()]
    model = fm.unwrap()
    for p, rg in flags:
        p.requires_grad_(rg)
    return model


class BaseFinetuning(_LightningBase):
    """Lightning's ``BaseFinetuning`` whose frozen modules run as freezert's inference segment.

    Subclass it as Lightning's (``freeze_before_training``, ``finetune_function``; the static ``freeze``,
    ``make_trainable``, ``flatten_modules``, ``filter_params``, ``filter_on_optimizer``,
    ``unfreeze_and_add_param_group`` are Lightning's own). A module passed to ``self.freeze(...)`` that is an
    attribute of the LightningModule is, while it has frozen blocks from its first on, replaced by
    ``freezert.wrap(module, ...)``: from the end of the first training step that calls it as a whole until the
    next epoch start where its flags changed. ``bn="train"`` (default) runs the frozen modules as they are
    (Lightning's training exactly); ``bn="frozen"`` runs them in eval mode (BatchNorm statistics fixed and folded,
    dropout off), which ``cache=`` needs. Other options are ``freezert.FreezeConfig``'s (``dtype``, ``graphs``...).
    """

    freeze = _StaticOrNoting(_LightningBase.freeze)

    def __init__(self, *, bn: str = "train", cache: Any = None, **options: Any) -> None:
        super().__init__()
        self._init_segments(bn, cache, options)

    def _init_segments(self, bn: str, cache: Any, options: dict) -> None:
        options = {"kernels": False, **options}  # the trainable blocks as Lightning runs them, unless asked
        for name in ("freeze", "blocks", "also_freeze"):
            if name in options:
                raise FreezeError(f"{name}= is decided by the callback's freeze() calls; drop it from the options")
        FreezeConfig.of("all", bn=bn, **options)  # every option checked once, here
        if cache not in (None, False) and bn != "frozen":
            raise FreezeError(
                f"cache={cache!r} needs bn='frozen': with bn={bn!r} the frozen modules run in training mode (batch "
                "statistics, dropout), so a sample's frozen output changes from step to step; pass bn='frozen' "
                "(BatchNorm statistics fixed, dropout off in the frozen part) or drop cache="
            )
        self.bn, self.cache, self.options = bn, cache, options
        self._noted: list[nn.Module] = []  # modules this callback froze (self.freeze) in the current setup
        self._wrapped: dict[str, tuple[FrozenModel, tuple]] = {}  # path -> (FrozenModel in place, flags)
        self._parked: dict[str, tuple[FrozenModel, tuple]] = {}  # taken out while finetune_function runs
        self._watch: dict[str, dict] = {}  # path -> a first call being watched before wrapping
        self._skip: dict[str, tuple[tuple, str]] = {}  # path -> (flags, why it is not wrapped)
        self._held: dict[str, list[_BatchNorm]] = {}  # bn="frozen": BatchNorms put in eval before the wrap
        self._caches: dict[str, FeatureCache] = {}
        self._made: set[str] = set()  # modules whose store this callback made (closed at teardown)
        self._store_root: str | None = None  # <log_dir>/freezert_cache of the current fit
        self._pl_module: Any = None
        self._restored_flags: dict | None = None

    # -- what runs as a segment -----------------------------------------------------------------------------
    @property
    def segments(self) -> dict[str, FrozenModel]:
        """The LightningModule's attributes (dotted names) that run through freezert now."""
        return {path: fm for path, (fm, _) in self._wrapped.items()}

    @property
    def not_wrapped(self) -> dict[str, str]:
        """Modules this callback froze that run plainly, each with why."""
        return {path: why for path, (_, why) in self._skip.items()}

    def _note_frozen(self, modules: Any) -> None:
        for m in _as_modules(modules):
            if all(m is not n for n in self._noted):
                self._noted.append(m)

    def _targets(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """The noted modules that are attributes of ``pl_module``, outermost only, by dotted name."""
        paths = {id(m): name for name, m in pl_module.named_modules() if name}
        found = {paths[id(m)]: m for m in self._noted if id(m) in paths}
        return {p: m for p, m in found.items() if not any(p.startswith(q + ".") for q in found)}

    def _may_wrap(self, trainer: Any) -> bool:
        # Sharded strategies (FSDP, DeepSpeed) own the modules' parameters: those run as Lightning runs them.
        return isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))

    def _park(self, pl_module: nn.Module) -> None:
        """Puts the plain modules back while user code (``finetune_function``) runs; the wrappers wait aside."""
        for path, (fm, flags) in self._wrapped.items():
            _set_child(pl_module, path, fm.module)
            self._parked[path] = (fm, flags)
        self._wrapped = {}

    def _release(self, path: str, pl_module: nn.Module) -> None:
        fm, _ = self._parked.pop(path, None) or self._wrapped.pop(path, (None, None))
        if fm is not None:
            _set_child(pl_module, path, _drop(fm))
        for m in self._held.pop(path, []):
            m.train(pl_module.training)
        w = self._watch.pop(path, None)
        if w is not None:
            w["handle"].remove()

    def _plan(self, trainer: Any, pl_module: nn.Module) -> None:
        """After the flags may have changed: keeps, drops or prepares each module's wrapper."""
        targets = self._targets(pl_module) if self._may_wrap(trainer) else {}
        for path in [p for p in {*self._parked, *self._watch, *self._held} if p not in targets]:
            self._release(path, pl_module)
        for path, module in targets.items():
            flags, (arg, frozen) = _flags(module), _frozen_part(module)
            parked = self._parked.get(path)
            if parked is not None and parked[1] == flags:
                del self._parked[path]
                _set_child(pl_module, path, parked[0])
                self._wrapped[path] = parked
                continue
            watched = self._watch.get(path)
            if watched is not None and watched["flags"] == flags:
                continue
            self._release(path, pl_module)
            if arg is None or self._skip.get(path, (None,))[0] == flags:
                continue
            self._skip.pop(path, None)
            if self.bn == "frozen":  # eval from the first step on, as the wrapper will hold them
                self._held[path] = [m for b in frozen for m in b.modules() if isinstance(m, _BatchNorm)]
                for m in self._held[path]:
                    m.eval()
            watch: dict = {"flags": flags, "arg": arg, "call": None}

            def seen(mod, args, kwargs, watch=watch):
                if watch["call"] is None:
                    watch["call"] = (args, kwargs)

            watch["handle"] = module.register_forward_pre_hook(seen, with_kwargs=True)
            self._watch[path] = watch

    def _wrap_watched(self, pl_module: nn.Module) -> None:
        """At the end of a training step: wraps each watched module that step called as a whole."""
        for path, watch in list(self._watch.items()):
            watch["handle"].remove()
            del self._watch[path]
            module = pl_module.get_submodule(path)
            if watch["call"] is None:
                self._skip[path] = (watch["flags"], "the training step does not call it as a whole")
                continue
            args, kwargs = watch["call"]
            frozen_before = {id(p) for p in module.parameters() if not p.requires_grad}
            try:
                fm = wrap(module, watch["arg"], bn=self.bn, cache=self._cache_for(path), **self.options)
            except FreezeError as e:
                self._skip[path] = (watch["flags"], f"freezert cannot wrap it: {e}")
                continue
            try:
                fm.plan(*args, **kwargs)  # the record finds the stem, frozen with block 0
            except FreezeError as e:
                fm.unwrap()
                self._skip[path] = (watch["flags"], f"freezert cannot plan it: {e}")
                continue
            if any(id(p) not in frozen_before for p in fm.frozen_parameters()):
                fm.unwrap()  # the flags from before the wrap: the stem trains again
                self._skip[path] = (watch["flags"], "modules that run before its first block still train")
                continue
            _set_child(pl_module, path, fm)
            self._wrapped[path] = (fm, watch["flags"])

    def _cache_for(self, path: str) -> FeatureCache | None:
        if self.cache in (None, False):
            return None
        if path not in self._caches:
            if isinstance(self.cache, FeatureCache):
                if self._caches:
                    raise FreezeError(
                        f"cache= is one FeatureCache but the callback runs more than one frozen module ({path!r} "
                        "too); pass cache=True or a codec name so that each gets its own"
                    )
                self._caches[path] = self.cache
            elif self._store_root is not None:  # a disk store beside the checkpoints, reopened on resume
                self._caches[path] = disk_store(self.cache, os.path.join(self._store_root, path))
                self._made.add(path)
            else:
                self._caches[path] = FeatureCache() if self.cache is True else FeatureCache(codec=self.cache)
        return self._caches[path]

    def _unwrap_all(self, pl_module: nn.Module) -> None:
        for path in [*self._wrapped, *self._parked, *self._watch, *self._held]:
            self._release(path, pl_module)

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._noted = []
        self._pl_module = pl_module
        if self.cache not in (None, False) and not isinstance(self.cache, FeatureCache):
            self._store_root = _store_root(trainer)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)  # Lightning's: the checkpoint's param groups
        restored, self._restored_flags = self._restored_flags, None
        if restored is not None:  # the flags as saved (Lightning's setup froze anew what may have been thawed)
            off = set(restored["frozen"])
            for name, p in pl_module.named_parameters():
                p.requires_grad_(name not in off)
            no_stats = set(restored["no_running_stats"])
            for name, m in pl_module.named_modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = name not in no_stats
            if restored.get("stores") and self._store_root is not None:  # before any forward opens a store
                _adopt_all(
                    trainer, {p: os.path.join(self._store_root, p) for p in restored["stores"]}, restored["stores"]
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._plan(trainer, pl_module)  # also when a fit resumes mid-epoch (no epoch start then)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._park(pl_module)
        super().on_train_epoch_start(trainer, pl_module)  # finetune_function and Lightning's metadata, plain names
        self._plan(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # A parameter thawed in the middle of an epoch (by user code) must not stay under no_grad: from the next
        # step's start (this hook) on, the module runs plainly again.
        if any(flags != _flags(fm.module) for fm, flags in self._wrapped.values()):
            self._park(pl_module)
            self._plan(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._watch:
            self._wrap_watched(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._unwrap_all(pl_module)  # Lightning's teardown hooks do not run after an exception

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._unwrap_all(pl_module)
        for path in self._made:  # the index written, the lock released; the next fit reopens the store
            self._caches.pop(path).close()
        self._made = set()
        super().teardown(trainer, pl_module, stage)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _plain(self, name: str) -> str:
        """A name in the LightningModule as the plain model has it (a wrapper puts its model at ``.model``)."""
        for path in self._wrapped:
            if name == path + ".model" or name.startswith(path + ".model."):
                return path + name[len(path) + len(".model") :]
        return name

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state (``internal_optimizer_metadata``...) plus the flags, so a resume gets them back."""
        state = super().state_dict()
        pl = self._pl_module
        if pl is not None:
            state["freezert"] = {
                "frozen": [self._plain(n) for n, p in pl.named_parameters() if not p.requires_grad],
                "no_running_stats": [
                    self._plain(n)
                    for n, m in pl.named_modules()
                    if isinstance(m, _BatchNorm) and not m.track_running_stats
                ],
                "stores": {p: c.path for p, c in self._caches.items() if p in self._made and c.path},
            }
            for c in self._caches.values():
                c.flush()  # the store's index as of this checkpoint
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._restored_flags = state.pop("freezert", None)  # absent in a checkpoint of Lightning's own callback
        super().load_state_dict(state)


class BackboneFinetuning(BaseFinetuning, _LightningBackbone):
    """Lightning's ``BackboneFinetuning`` (same arguments, learning-rate ramp, param groups and checkpoint
    state) with ``pl_module.backbone`` run as freezert's segment while it is frozen.

    With ``bn="train"`` (default) the backbone's BatchNorms keep training until the unfreeze epoch, as in
    Lightning, so only the blocks before the first BatchNorm run as the segment; ``bn="frozen"`` freezes them
    too (eval mode, fixed statistics) and runs the whole backbone as the segment, which ``cache=`` needs.
    """

    def __init__(
        self,
        unfreeze_backbone_at_epoch: int = 10,
        lambda_func: Any = multiplicative,
        backbone_initial_ratio_lr: float = 10e-2,
        backbone_initial_lr: float | None = None,
        should_align: bool = True,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
        verbose: bool = False,
        rounding: int = 12,
        *,
        bn: str = "train",
        cache: Any = None,
        **options: Any,
    ) -> None:
        _LightningBackbone.__init__(
            self,
            unfreeze_backbone_at_epoch,
            lambda_func,
            backbone_initial_ratio_lr,
            backbone_initial_lr,
            should_align,
            initial_denom_lr,
            train_bn,
            verbose,
            rounding,
        )
        self._init_segments(bn, cache, options)

    def freeze_before_training(self, pl_module: Any) -> None:
        if not isinstance(getattr(pl_module, "backbone", None), nn.Module):
            raise FreezeError(
                f"{type(pl_module).__name__} has no nn.Module attribute 'backbone'; BackboneFinetuning freezes "
                "pl_module.backbone: name your feature extractor so"
            )
        self.freeze(pl_module.backbone, train_bn=self.bn != "frozen")


class FreezertFinetuning(Callback):
    """Drives a freezert schedule (``Linear``, ``FreezeOut``, ``GradientNorm``, ``Unfreeze``) over
    ``pl_module.<attr>``, wrapped with ``freezert.wrap`` at setup; the schedule steps at every epoch start with
    progress ``epoch / max_epochs``. Checkpoints hold the schedule's state and keep the model's plain keys.
    """

    def __init__(self, schedule: Schedule, *, attr: str = "backbone", **options: Any) -> None:
        if not isinstance(schedule, Schedule):
            raise FreezeError(
                f"schedule={schedule!r} is not a freezert schedule; pass Linear(...), FreezeOut(...), "
                "GradientNorm(...) or Unfreeze(...), or subclass BaseFinetuning for hand-written freezing"
            )
        self.schedule = schedule
        self.attr = attr
        self.options = options
        self._restored: dict | None = None  # a checkpoint's schedule state, applied once the fit's optimizers exist
        self._store: FeatureCache | None = None  # the disk store made for cache=True or a codec name
        self._restored_store: dict | None = None  # {"path", "frozen"} of the checkpoint's store
        self._adopted: list | None = None  # the frozen blocks the moved store's rows were computed for
        self._fm: FrozenModel | None = None  # what setup put at pl_module.<attr>

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if type(trainer.strategy).__name__.startswith("DeepSpeed"):
            raise NotImplementedError("freezert's finetuning callback does not support the DeepSpeed strategy")
        inner = getattr(pl_module, self.attr, None)
        if isinstance(inner, FrozenModel):
            return
        if not isinstance(inner, nn.Module):
            raise FreezeError(f"the LightningModule has no nn.Module attribute {self.attr!r}; pass attr= naming it")
        options = dict(self.options)
        cache = options.get("cache")
        if cache not in (None, False) and not isinstance(cache, FeatureCache):
            # a disk store beside the run's checkpoints, reopened (moved here) when a fit resumes; the previous fit's
            # store (another model given to this callback) is closed: one writer per store
            if self._store is not None:
                self._store.close()
            self._store = options["cache"] = disk_store(cache, os.path.join(_store_root(trainer), self.attr))
        self._fm = wrap(inner, self.schedule, **options)
        setattr(pl_module, self.attr, self._fm)  # loads plain keys (a pre-hook)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Binds this fit's optimizers (frozen parameters leave them), then a checkpoint's state if resuming."""
        self.schedule.attach(optimizer=list(trainer.optimizers))
        restored, self._restored = self._restored, None
        if restored is not None:
            self.schedule.load_state_dict(restored)
        saved, self._restored_store = self._restored_store, None
        if saved and self._store is not None:
            _adopt_all(trainer, {self.attr: self._store.path}, {self.attr: saved["path"]})
            self._adopted = saved["frozen"]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        if total is None:
            raise FreezeError("FreezertFinetuning needs Trainer(max_epochs=N) to turn epochs into training progress")
        self.schedule.step(min(trainer.current_epoch / total, 1.0))
        adopted, self._adopted = self._adopted, None
        if adopted is not None and self._store.fingerprint is None and self._fm.frozen_indices != adopted:
            # The schedule froze another set at this first epoch of the resumed fit, before any forward bound the
            # store: its rows are of another setup, which the first bind would refuse. Start it anew.
            if trainer.is_global_zero:
                self._store.clear()
            trainer.strategy.barrier("freezert_cache")

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule.needs_grad_norms:
            self.schedule.after_backward()

    def state_dict(self) -> dict[str, Any]:
        state = {"schedule": self.schedule.state_dict()}
        fm = self._fm
        if self._store is not None and fm is not None:
            self._store.flush()  # the store's index as of this checkpoint
            state["store"] = {"path": self._store.path, "frozen": list(fm.frozen_indices)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at on_fit_start: the optimizers the schedule holds now are the previous fit's (or none).
        self._restored = state_dict["schedule"]
        self._restored_store = state_dict.get("store")


def _store_root(trainer: Any) -> str:
    """``<log_dir>/freezert_cache``: beside the fit's ``checkpoints/`` (``default_root_dir`` without a logger)."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, STORE_DIR)


def _adopt_all(trainer: Any, here: dict[str, str], saved: dict[str, str]) -> None:
    """Moves the stores a resumed checkpoint names into this fit's folder (global rank 0), then waits for every
    rank, before any forward opens them."""
    if trainer.is_global_zero:
        for key, path in here.items():
            adopt(saved.get(key), path)
    trainer.strategy.barrier("freezert_cache")
