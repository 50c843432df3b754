"""``FrozenModel`` and ``wrap()``: a model with blocks frozen, its frozen prefix run as an inference segment.

``FrozenModel`` holds what the user's model must get back (``requires_grad`` flags, BatchNorm modes) and the
current plan; a call is: plan if needed (``planner``) -> the prefix answers with the boundary (``prefix``) -> the
trainable part runs (``tail``).
"""

from __future__ import annotations

import inspect as _inspect
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import spec as _spec
from ._errors import FreezeError
from ._swap import hook_count
from .blocks import block_table
from .call import Call
from .config import FreezeConfig
from .describe import describe
from .planner import Plan, Planner
from .prefix import Prefix
from .segment import FrozenSegment
from .tail import Tail

__all__ = ["FrozenModel", "inspect", "wrap"]

# Models wrapped by a live FrozenModel: a second wrap of the same model would fight the first over
# requires_grad flags and BatchNorm modes, and unwrapping both would leave parameters frozen.
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bn_modules(modules) -> Iterator[_BatchNorm]:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                yield sub


_MISSING = object()


def _root_hooked(m: nn.Module) -> bool:
    """Hooks that a call of ``m`` itself runs: its own (forward, pre-forward, backward) or torch's global ones."""
    from torch.nn.modules import module as _mod

    return bool(
        hook_count(m)
        or _mod._global_forward_hooks
        or _mod._global_forward_pre_hooks
        or _mod._global_backward_hooks
        or _mod._global_backward_pre_hooks
    )


class FrozenModel(nn.Module):
    """Behaves like ``model`` with some blocks frozen; the frozen prefix runs as a no-grad inference segment.

    Build it with ``freezert.wrap(model, freeze, **options)`` (options: ``freezert.FreezeConfig``). Its class
    carries the wrapped model's ``forward`` signature (trainers read label names from it), its ``state_dict()``
    the wrapped model's keys, so checkpoints move freely between the wrapped and the plain model.
    """

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any):
        if cls is FrozenModel and isinstance(model, nn.Module) and not isinstance(model, FrozenModel):
            cls = _signed_class(type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, freeze: Any = 10, **options: Any):
        nn.Module.__init__(self)  # not super(): a Hugging Face model's class follows FrozenModel in the MRO
        config = FreezeConfig.of(freeze, **options)
        _check_wrappable(model)
        table = block_table(model, config.blocks)
        from .schedule import Schedule

        self.schedule: Schedule | None = config.freeze if isinstance(config.freeze, Schedule) else None
        freeze = self.schedule.frozen_blocks(0.0, len(table)) if self.schedule is not None else config.freeze
        self.freeze_config = config
        self.model = model
        self._params = list(model.parameters())
        self._requires_grad = [p.requires_grad for p in self._params]
        self._root_training = model.training
        # every module's mode at wrap(): what a BatchNorm gets back even if it is frozen later (the stem, known at
        # the first call, which may come after fm.eval())
        self._modes = {id(m): m.training for m in model.modules()}
        self._forced_bn: dict[int, tuple[nn.Module, bool]] = {}  # BatchNorms set to eval by freezert: their own mode
        self._unwrapped = False
        also = _spec.resolve_params(config.also_freeze, model, table)
        self._planner = Planner(model, table, freeze, config.bn, also)
        self._prefix = Prefix(model, config, scheduled=self.schedule is not None)
        self._prefix.on_reader = weakref.WeakMethod(self._learn_reader)  # no cycle: a dropped wrapper dies
        self._tail = Tail(model, config)
        self._apply_plan(self._planner.unrecorded())
        _LIVE[model] = weakref.ref(self)
        self._register_load_state_dict_pre_hook(_plain_keys_in, with_module=True)
        if self.schedule is not None:
            # The schedule changes the frozen set through set_freeze(); bind the optimizer later with
            # fm.schedule.attach(optimizer=opt) and advance it with fm.schedule.step(progress).
            self.schedule.attach(self)

    # -- the plan and the frozen set -----------------------------------------------------------------------
    def _apply_plan(self, plan: Plan) -> None:
        """Makes ``plan`` current: flags of frozen parameters off, frozen BatchNorms in eval mode."""
        self._plan = plan
        frozen_ids = {id(p) for _, m in plan.frozen_named() for p in m.parameters()}
        frozen_ids |= {id(p) for p in self._planner.also}
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg and id(p) not in frozen_ids)
        # what freezert turned off: checked at every call (a flag turned back on by hand would never get a gradient)
        self._turned_off = [p for p, rg in zip(self._params, self._requires_grad) if rg and id(p) in frozen_ids]
        self._prefix.reset(plan)
        self._tail.reset(plan)
        self._enforce_bn_modes()

    def set_freeze(self, freeze) -> None:
        """Changes the frozen set (anything ``freeze=`` accepts); parameters keep their identity."""
        self._check_live()
        self._planner.freeze = freeze
        self._apply_plan(self._planner.unrecorded(self._plan.table))  # recorded again at the next forward

    def plan(self, *args, **kwargs) -> FrozenModel:
        """Records one forward on these example inputs and plans from it now (else the first call does): the
        stem is frozen, forward order and eager blocks are known. Nothing the model holds changes. Returns self."""
        self._check_live()
        if self._plan.part.frozen and not self._plan.driven:
            call = Call(args, kwargs)
            self._replan(call, call.kind(self.model.training))
        return self

    def _replan(self, call: Call, kind: tuple) -> None:
        self._prefix.restore()  # the record runs the user's modules
        flags = {id(p): rg for p, rg in zip(self._params, self._requires_grad)}
        self._apply_plan(self._planner.recorded(call.args, call.kwargs, kind, flags, run=call.target))

    def _learn_reader(self, key: tuple) -> None:
        """A call read a frozen output the plan let the cache skip: plan again with that reader."""
        self._apply_plan(self._planner.with_reader(self._plan, key))

    def freeze_state_dict(self) -> dict:
        """The frozen set and, with a schedule, its state and the optimizer's groups (for resuming)."""
        d: dict = {"frozen": self.frozen_indices}
        if self.schedule is not None:
            d["schedule"] = self.schedule.state_dict()
        return d

    def load_freeze_state_dict(self, state: dict) -> None:
        """Restores ``freeze_state_dict()``; call it before ``optimizer.load_state_dict``."""
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        else:
            self.set_freeze(list(state["frozen"]))

    # -- modes ---------------------------------------------------------------------------------------------
    def _own_mode(self, before: bool) -> bool:
        """The mode a BatchNorm freezert no longer forces goes back to: its own from before the wrap while the
        model's mode is unchanged since then, else the model's current mode."""
        return before if self.model.training == self._root_training else self.model.training

    def _enforce_bn_modes(self) -> None:
        # Only frozen BatchNorms are touched (eval: fixed statistics); trainable ones keep the user's modes.
        frozen_mods = [m for _, m in self._plan.frozen_named()]
        frozen = {id(m): m for m in _bn_modules(frozen_mods)} if self.freeze_config.bn == "frozen" else {}
        for key in [k for k in self._forced_bn if k not in frozen]:
            m, before = self._forced_bn.pop(key)
            m.train(self._own_mode(before))
        for key, m in frozen.items():
            if key not in self._forced_bn:
                self._forced_bn[key] = (m, self._modes.get(key, m.training))
            m.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self._unwrapped:
            self._enforce_bn_modes()  # .train() must not undo frozen BatchNorm (pytorch#66073)
        return self

    # -- the call ------------------------------------------------------------------------------------------
    def forward(self, *args, cache_ids=None, cache_aug=None, **kwargs):
        self._check_live()
        if _root_hooked(self.model):
            return self._through_root(args, kwargs, cache_ids, cache_aug)
        return self._step(args, kwargs, cache_ids, cache_aug)

    def _through_root(self, args, kwargs, cache_ids, cache_aug):
        """Calls the model itself, with this call standing in for its forward: hooks on the model fire once, see
        what a call of the model sees and may change its inputs (which the cache then keys) and its output. (A
        driven model's blocks run by freezert, not by its forward; another model's forward runs unhooked inside.)"""
        root = self.model
        had = root.__dict__.get("forward", _MISSING)
        real = had if had is not _MISSING else types.MethodType(type(root).forward, root)
        root.forward = lambda *a, **k: self._step(a, k, cache_ids, cache_aug, target=real)
        try:
            return root(*args, **kwargs)
        finally:
            if had is _MISSING:
                root.__dict__.pop("forward", None)
            else:
                root.forward = had

    def _step(self, args, kwargs, cache_ids, cache_aug, target=None):
        if any(p.requires_grad for p in self._turned_off):
            self._refuse_unfrozen()
        call = Call(args, kwargs, cache_ids, cache_aug, target)
        plan = self._plan
        if plan.part.frozen and not call.grad_in and not (plan.driven and call.single_tensor):
            kind = call.kind(self.model.training)
            if plan.sig != kind:  # the first call of a new kind (structure, mode, grad mode, batch), or a new freeze
                self._replan(call, kind)
        return self._tail(call, self._prefix(call), self.model.training)

    def prefetch(self, *args, cache_ids=None, cache_aug=None, **kwargs) -> bool:
        """Starts reading the cached rows of the next batch (the same arguments as that call) on a background
        thread, so that call finds them decoded; True when there was something to start."""
        self._check_live()
        return self._prefix.prefetch(Call(args, kwargs, cache_ids, cache_aug))

    def memory_report(self, *args, loss=None, optimizer=None, plot: str | None = None, **kwargs):
        """Where one training step's memory goes, on these inputs: frozen and trainable parameters, gradients,
        optimizer state, activations saved for backward per block, the cache by tier (counted on the CPU,
        measured with the CUDA allocator on a GPU), and what each option would save: naive freezing for
        reference, recomputation, one-byte frozen weights. ``loss(output)`` defaults to the sum of the floating
        outputs; ``plot`` writes a PNG. The model's gradients, buffers and RNG are as before the report."""
        from .report import report_for

        return report_for(self, args, kwargs, loss=loss, optimizer=optimizer, plot=plot)

    # -- introspection -------------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The block sequence, as (dotted name, module) pairs."""
        t = self._plan.table
        return list(zip(t.names, t.modules))

    @property
    def frozen_indices(self) -> list[int]:
        """Sorted indices of the frozen blocks."""
        return list(self._plan.part.frozen)

    @property
    def eager_blocks(self) -> dict[str, str]:
        """Frozen blocks that run eagerly (autograd through them, no segment, no cache), each with why."""
        return self._plan.eager_blocks()

    @property
    def boundary(self) -> list[int]:
        """Prefix blocks whose outputs the trainable part reads (with a recorded plan: the blocks whose outputs
        a cache stores)."""
        part = self._plan.part
        if part.replay:
            return sorted({u for u, _, _ in part.replay if u < len(self._plan.table)})
        return list(part.boundary)

    @property
    def prefix_length(self) -> int:
        """Number of blocks (from block 0) that run as the inference segment."""
        return self._plan.part.k

    @property
    def segment(self) -> FrozenSegment | None:
        """The inference segment, built at the first forward (None before, or when nothing is frozen)."""
        return self._prefix.segment

    @property
    def cache(self):
        """The ``FeatureCache`` holding frozen-segment outputs (None without ``cache=``)."""
        return self.freeze_config.cache

    @property
    def kernels(self):
        return self.freeze_config.kernels

    @property
    def offloads(self) -> int:
        """How often the frozen weights moved to host memory because the cache served whole batches."""
        return self._prefix.offloads

    @property
    def recompute(self) -> list[str] | None:
        """Trainable blocks recomputed in backward to fit ``memory_budget`` (None until the first training step)."""
        return None if self._tail.recompute is None else list(self._tail.recompute)

    @property
    def recompute_plan(self) -> dict | None:
        """What ``memory_budget``'s plan measured (bytes saved per block) and chose (None before)."""
        return self._tail.recompute_plan

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: hand these to the optimizer."""
        return [p for p in self._params if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters freezert froze: the frozen blocks', the stem's when block 0 is frozen, and ``also_freeze``."""
        out: dict[int, nn.Parameter] = {}
        for _, m in self._plan.frozen_named():
            out.update((id(p), p) for p in m.parameters())
        out.update((id(p), p) for p in self._planner.also)
        return list(out.values())

    def inspect(self) -> str:
        """This model's block table and plan (``freezert.inspect``)."""
        return describe(self)

    def extra_repr(self) -> str:
        p = self._plan.part
        return f"frozen={list(p.frozen)}, prefix={p.k}, boundary={list(p.boundary)}, bn={self.freeze_config.bn!r}"

    # -- giving the model back -----------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Gives the user's model back with its original ``requires_grad`` flags and BatchNorm modes."""
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg)
        for m, before in self._forced_bn.values():
            m.train(self._own_mode(before))
        self._forced_bn.clear()
        self._prefix.restore()
        self._prefix.segment = None
        self._unwrapped = True
        if _LIVE.get(self.model) is not None and _LIVE[self.model]() is self:
            del _LIVE[self.model]
        return self.model

    def _refuse_unfrozen(self) -> None:
        """A parameter freezert froze has ``requires_grad=True`` again (set by hand or by a trainer's own unfreeze):
        its block runs without autograd, so it would silently never train."""
        on = {id(p) for p in self._turned_off if p.requires_grad}
        name = next(n for n, p in self.model.named_parameters() if id(p) in on)
        block = next((b for b, m in self.blocks if any(id(p) in on for p in m.parameters())), None)
        where = f" (block {block!r})" if block is not None else ""
        raise FreezeError(
            f"{name!r}{where} was frozen by freezert and has requires_grad=True again, set after wrap() (by hand or "
            "by a trainer's unfreeze); freezert runs it without autograd, so it would never get a gradient: change "
            "the frozen set with fm.set_freeze(...) (freezert's trainer callbacks do), or set requires_grad back to "
            "False"
        )

    def _check_live(self) -> None:
        if self._unwrapped:
            raise FreezeError("this FrozenModel was unwrapped; call freezert.wrap(model, ...) again to freeze it")

    # -- transparency: trainers look for the user's model and its attributes ------------------------------
    @property
    def module(self) -> nn.Module:
        """The user's model, where trainers look for it (Ultralytics' and Lightning's ``unwrap_model`` follow
        ``.module``, as for DDP)."""
        return self.model

    def __getattr__(self, name: str):
        # nn.Module.__getattr__ finds parameters, buffers and submodules of the wrapper itself; anything else
        # (``criterion``, ``names``, ``config``, ``yaml``, ``stride``) falls through to the user's model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)

    def __setattr__(self, name: str, value) -> None:
        # An attribute the user's model has is set on it (``fm.has_been_used = True`` reaches the model, as the
        # plain model would have it); the wrapper's own attributes, modules and tensors stay the wrapper's.
        model = self.__dict__.get("_modules", {}).get("model")
        if (
            model is not None
            and not name.startswith("_")
            and name not in self.__dict__
            and not hasattr(type(self), name)
            and not isinstance(value, (nn.Module, torch.Tensor))
            and hasattr(model, name)
        ):
            setattr(model, name, value)
            return
        super().__setattr__(name, value)

    # containers index, measure and iterate as the model does (a Lightning backbone that is an nn.Sequential)
    def __getitem__(self, idx):
        return self.model[idx]

    def __len__(self) -> int:
        return len(self.model)

    def __iter__(self):
        return iter(self.model)

    def __bool__(self) -> bool:
        return True

    # -- state and copies --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """The wrapped model's own state_dict (same keys as the plain model)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads into the wrapped model; the segment notices the new weights and rebuilds."""
        self._prefix.restore()
        out = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        self._prefix.segment = None
        return out

    def _apply(self, fn, *args, **kwargs):
        if "_prefix" in self.__dict__:
            self._prefix.restore()
        out = super()._apply(fn, *args, **kwargs)
        self._prefix.segment = None  # built again, on the new device/dtype, at the next forward
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        prefix = state["_prefix"] = object.__new__(Prefix)  # rebuilt lazily after unpickling / deep-copying
        prefix.__dict__.update(self._prefix.__dict__, segment=None, on_reader=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._prefix.on_reader = weakref.WeakMethod(self._learn_reader)
        if not self._unwrapped:
            _LIVE[self.model] = weakref.ref(self)  # the copy owns the copied model

    def __reduce_ex__(self, protocol):
        model_cls = type(self).__dict__.get("_model_cls")
        if model_cls is None:
            return super().__reduce_ex__(protocol)
        return (_new_signed, (model_cls,), self.__getstate__())


def _check_wrappable(model: Any) -> None:
    if isinstance(model, FrozenModel):
        raise FreezeError("the model is already a FrozenModel; wrap the plain model (fm.unwrap()) instead")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise FreezeError(
            f"the model is wrapped in {type(model).__name__}; wrap the plain model first and then that: "
            f"{type(model).__name__}(freezert.wrap(model, ...))"
        )
    owner = _LIVE.get(model) if isinstance(model, nn.Module) else None
    if owner is not None and owner() is not None and not owner()._unwrapped:
        raise FreezeError(
            "this model is already wrapped by a live FrozenModel; use that one (fm.set_freeze(...) changes what is "
            "frozen) or call fm.unwrap() before wrapping it again"
        )


# A FrozenModel's class carries the wrapped model's forward signature: Hugging Face's Trainer reads label names
# (find_labels) and the columns to keep from ``type(model).forward``, so ``*args, **kwargs`` would cost it
# eval_loss and compute_metrics. One subclass per model class, named after it, picklable through _new_signed.
_SIGNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signed_class(model_cls: type) -> type:
    cls = _SIGNED.get(model_cls)
    if cls is not None:
        return cls
    try:
        sig = _inspect.signature(model_cls.forward)
    except (TypeError, ValueError):
        return FrozenModel
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    for extra in ("cache_aug", "cache_ids"):
        if extra not in sig.parameters:
            params.insert(at, _inspect.Parameter(extra, _inspect.Parameter.KEYWORD_ONLY, default=None))
    try:
        signature = sig.replace(parameters=params)
    except ValueError:  # a signature the extra parameter cannot join: keep the plain one
        return FrozenModel

    def forward(self, *args, **kwargs):
        return FrozenModel.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = model_cls.forward.__doc__
    name = f"Frozen{model_cls.__name__}"
    # transformers' Trainer saves with save_pretrained (config.json + weights) only when isinstance(model,
    # PreTrainedModel), else the state dict alone, which from_pretrained cannot load: a FrozenModel of a
    # PreTrainedModel is an instance of the model's class. FrozenModel comes first in the MRO, so its methods
    # (forward, state_dict, train, ...) win; the model class's own methods run on the wrapper, whose attributes
    # fall through to the model (save_pretrained unwraps .module and saves the user's model).
    bases = (FrozenModel, model_cls) if _is_pretrained(model_cls) else (FrozenModel,)
    cls = type(name, bases, {"forward": forward, "_model_cls": model_cls, "__module__": __name__})
    cls.__qualname__ = name
    _SIGNED[model_cls] = cls
    return cls


def _is_pretrained(model_cls: type) -> bool:
    """A transformers PreTrainedModel subclass (told by name: transformers is not imported for it)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in model_cls.__mro__)


def _new_signed(model_cls: type) -> FrozenModel:
    return nn.Module.__new__(_signed_class(model_cls))


def _plain_keys_in(fm: FrozenModel, state_dict, prefix, *_args) -> None:
    """A parent's ``load_state_dict`` hands a nested FrozenModel the plain keys its ``state_dict`` wrote
    (``backbone.x``); the wrapped model sits at ``.model``, so they move to ``backbone.model.x``. Keys are
    matched against the model's own (a YOLO model's plain keys start with ``model.`` themselves)."""
    own = set(fm.model.state_dict().keys())
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] in own]:
        state_dict[prefix + "model." + key[len(prefix) :]] = state_dict.pop(key)


def wrap(model: nn.Module, freeze: Any = 10, **options: Any) -> FrozenModel:
    """Returns ``model`` with blocks frozen per ``freeze=`` (int, list, name prefix(es), fraction, predicate,
    ``"all"``, a schedule, or a whole ``FreezeConfig``); ``options`` are ``freezert.FreezeConfig``'s fields:
    ``cache=`` keeps the frozen prefix's outputs across epochs, ``memory_budget=`` bounds what the trainable part
    saves for backward, ``also_freeze=`` names parameters outside the blocks to freeze too, and so on."""
    return FrozenModel(model, freeze, **options)


def inspect(model: nn.Module, freeze=None, *, blocks: str | None = None, example_inputs=None) -> str:
    """The block table of ``model``: each block, the stem and head modules around it, and for each whether it runs
    as inference, runs eagerly or trains, and why. A ``FrozenModel`` shows its own plan; for a plain model,
    ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword arguments) lets the record run."""
    if isinstance(model, FrozenModel):
        return describe(model)
    fm = wrap(model, freeze, blocks=blocks, kernels=False)
    try:
        if example_inputs is not None:
            if isinstance(example_inputs, dict):
                fm.plan(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                fm.plan(*example_inputs)
            else:
                fm.plan(example_inputs)
        return describe(fm)
    finally:
        fm.unwrap()
