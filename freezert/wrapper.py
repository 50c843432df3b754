"""``FrozenModel`` and ``wrap()``: a model with its first blocks frozen and run as an inference segment."""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import spec as _spec
from ._errors import CacheError, FreezeError, FreezeWarning
from .blocks import BlockTable, block_table
from .partition import Partition, partition, plan
from .record import record
from .segment import FrozenSegment, flatten_tensors, run_blocks

# Models wrapped by a live FrozenModel: a second wrap of the same model would fight the first over
# requires_grad flags and BatchNorm modes, and unwrapping both would leave parameters frozen.
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bn_modules(modules) -> Iterator[_BatchNorm]:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                yield sub


class FrozenModel(nn.Module):
    """Behaves like ``model`` with some blocks frozen; the frozen prefix runs as a no-grad inference segment.

    ``state_dict()``/``load_state_dict()`` are the wrapped model's own (same keys), so checkpoints move freely
    between the wrapped and the plain model.
    """

    def __init__(
        self,
        model: nn.Module,
        freeze=10,
        *,
        blocks: str | None = None,
        also_freeze=None,
        bn: str = "frozen",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        graphs: bool = False,
        cache=None,
        offload_frozen: bool = False,
        kernels="auto",
        memory_budget=None,
    ):
        super().__init__()
        if isinstance(model, FrozenModel):
            raise FreezeError("the model is already a FrozenModel; wrap the plain model (fm.unwrap()) instead")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise FreezeError(
                f"the model is wrapped in {type(model).__name__}; wrap the plain model first and then that: "
                f"{type(model).__name__}(freezert.wrap(model, ...))"
            )
        owner = _LIVE.get(model)
        if owner is not None and owner() is not None and not owner()._unwrapped:
            raise FreezeError(
                "this model is already wrapped by a live FrozenModel; use that one (fm.set_freeze(...) changes what is "
                "frozen) or call fm.unwrap() before wrapping it again"
            )
        _spec.check_options(bn, dtype, channels_last, graphs)
        if kernels not in ("auto", "lean", True, False):
            raise FreezeError(
                f"kernels={kernels!r} is not understood; pass 'auto' (Triton on CUDA), 'lean' (the plain-torch lean "
                "ops on every device), True (Triton everywhere, the interpreter off CUDA) or False"
            )
        self.kernels = kernels
        self._kernel_plan: list | None = None
        table = block_table(model, blocks)
        from .schedule import Schedule

        self.schedule: Schedule | None = freeze if isinstance(freeze, Schedule) else None
        if self.schedule is not None:
            freeze = self.schedule.frozen_blocks(0.0, len(table))
        frozen = _spec.resolve(freeze, table)
        self.model = model
        self.bn, self.dtype, self.channels_last, self.graphs = bn, dtype, channels_last, graphs
        self._registered: BlockTable = table  # registration order; the record may reorder it (forward order)
        self._table: BlockTable = table
        self._freeze_arg = freeze
        self._also = _spec.resolve_params(also_freeze, model, table)
        self._params = list(model.parameters())
        self._requires_grad = [p.requires_grad for p in self._params]
        self._root_training = model.training
        self._forced_bn: dict[int, tuple[nn.Module, bool]] = {}  # BatchNorms set to eval by freezert: their own mode
        self._save = table.save
        self._segment: FrozenSegment | None = None
        self._plan_sig = None  # swap mode: the input structure the current plan was recorded for
        self._rec = None  # swap mode: the record the current plan came from
        self._warned: set = set()
        self._unwrapped = False
        self._cache = _make_cache(cache, bn)
        self._cache_sig = None  # (weights token, input signature) the cache is bound for
        self._cache_part: Partition | None = None  # the cut whose boundary the cache's rows hold
        self._weights_token = 0  # bumped whenever the segment is rebuilt from (possibly) new weights
        self.offload_frozen = bool(offload_frozen)
        self._offloaded_from: torch.device | None = None  # where the frozen weights live when not offloaded
        self.offloads = 0
        from ._units import parse_bytes

        self._budget = None if memory_budget is None else parse_bytes("memory_budget", memory_budget)
        self._recompute: list[str] | None = None  # trainable blocks run under checkpoint (None: not planned yet)
        self.recompute_plan: dict | None = None  # what the budget's plan measured and chose
        self._set_frozen(frozen)
        _LIVE[model] = weakref.ref(self)
        self._register_load_state_dict_pre_hook(_plain_keys_in, with_module=True)
        if self.schedule is not None:
            # The schedule changes the frozen set through set_freeze(); bind the optimizer later with
            # fm.schedule.attach(optimizer=opt) and advance it with fm.schedule.step(progress).
            self.schedule.attach(self)

    # -- the frozen set --------------------------------------------------------------------------------
    @property
    def _driven(self) -> bool:
        """YOLO-style graphs and root ``nn.Sequential``s: freezert runs the block graph itself (no record)."""
        return self._table.kind in ("yolo", "sequential")

    def _frozen_named(self) -> list[tuple[str, nn.Module]]:
        """Modules of the frozen blocks, plus the stem when block 0 is frozen, as (dotted name, module)."""
        t = self._table
        named = [nm for i in self._part.frozen for nm in t.members[i]]
        return named + (list(t.stem) if 0 in self._part.frozen else [])

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for _, m in self._frozen_named()]

    def _set_frozen(self, frozen: list[int], part: Partition | None = None) -> None:
        k = _spec.prefix_length(frozen)
        self._part: Partition = part if part is not None else partition(self._table, frozen, k)
        frozen_ids = {id(p) for m in self._frozen_modules() for p in m.parameters()} | {id(p) for p in self._also}
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg and id(p) not in frozen_ids)
        self._segment = None
        self._kernel_plan = None
        self._recompute = None
        self._enforce_bn_modes()

    def set_freeze(self, freeze) -> None:
        """Changes the frozen set (anything ``freeze=`` accepts); parameters keep their identity."""
        self._check_live()
        self._freeze_arg = freeze
        self._plan_sig = None  # swap mode: recorded again at the next forward
        self._set_frozen(_spec.resolve(freeze, self._table))

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

    def _own_mode(self, before: bool) -> bool:
        """The mode a BatchNorm freezert no longer forces goes back to: its own from before the wrap while the
        model's mode is unchanged since then, else the model's current mode."""
        return before if self.model.training == self._root_training else self.model.training

    def _enforce_bn_modes(self) -> None:
        # Only frozen BatchNorms are touched (eval: fixed statistics); trainable ones keep the user's modes.
        frozen = {id(m): m for m in _bn_modules(self._frozen_modules())} if self.bn == "frozen" else {}
        for key in [k for k in self._forced_bn if k not in frozen]:
            m, before = self._forced_bn.pop(key)
            m.train(self._own_mode(before))
        for key, m in frozen.items():
            if key not in self._forced_bn:
                self._forced_bn[key] = (m, m.training)
            m.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self._unwrapped:
            self._enforce_bn_modes()  # .train() must not undo frozen BatchNorm (pytorch#66073)
        return self

    # -- the plan: recorded from one forward (swap mode) -----------------------------------------------------
    def _replan(self, args, kwargs) -> None:
        """Records one forward and plans from it: forward order, the stem, eager blocks, the boundary."""
        table = self._registered
        frozen = _spec.resolve(self._freeze_arg, table)
        rec = self._record(table, frozen, args, kwargs)
        seen = [min((rec.first_call.get(n, 1 << 30) for n, _ in ms), default=1 << 30) for ms in table.members]
        order = sorted(range(len(table)), key=lambda i: (seen[i], i))
        if order != list(range(len(table))):  # forward order differs from registration order
            table = table.reordered(order)
            frozen = _spec.resolve(self._freeze_arg, table)
            rec = self._record(table, frozen, args, kwargs)
        n = len(table)
        stem_units = sorted(
            (n + c for c, (name, _) in enumerate(table.candidates) if name in rec.before_first_block),
            key=lambda u: rec.first_call.get(table.candidates[u - n][0], 0),
        )
        table.stem = [table.candidates[u - n] for u in stem_units]
        also = {id(p) for p in self._also}
        direct = [name for name, p in table.direct_parameters(self.model) if p.requires_grad and id(p) not in also]
        # Direct parameters only feed what runs after them; which ones reach the frozen blocks is in the record.
        k = _spec.prefix_length(frozen)
        part = plan(table, rec, frozen, k, stem_units if k else [], direct)
        self._table, self._save = table, table.save
        self._rec = rec
        self._set_frozen(frozen, part)
        self._warn_eager(part, direct)

    def plan(self, *args, **kwargs) -> FrozenModel:
        """Records one forward on these example inputs and plans from it now (else the first call does): the
        stem is frozen, forward order and eager blocks are known. Nothing the model holds changes. Returns self."""
        self._check_live()
        if self._part.frozen and not self._driven:
            self._replan(args, kwargs)
            self._plan_sig = _structure(args, kwargs)
        return self

    def _record(self, table: BlockTable, frozen: list[int], args, kwargs):
        """One observed forward with only the parameters that will train requiring grad."""
        frozen_modules = [m for i in frozen for _, m in table.members[i]] + [m for _, m in table.candidates]
        off = {id(p) for m in frozen_modules for p in m.parameters()} | {id(p) for p in self._also}
        keep = {id(p) for p, rg in zip(self._params, self._requires_grad) if rg and id(p) not in off}
        frozen_bn = [
            m for i in frozen for _, mod in table.members[i] for m in mod.modules() if isinstance(m, _BatchNorm)
        ]
        modes = [(m, m.training) for m in frozen_bn]
        try:
            if self.bn == "frozen":
                for m in frozen_bn:
                    m.train(False)
            with torch.enable_grad():
                rec, _ = record(self.model, table, set(frozen), args, kwargs, keep)
        finally:
            for m, mode in modes:
                m.train(mode)
        return rec

    def _warn_eager(self, part: Partition, direct: list[str]) -> None:
        eager = [i for i in part.eager if i < part.k]
        if not eager or tuple(eager) in self._warned:
            return
        self._warned.add(tuple(eager))
        names = [self._table.names[i] for i in eager]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        reason = part.eager[eager[0]]
        fix = (
            f"freeze those too to run them as inference: wrap(model, freeze=..., also_freeze={direct!r})"
            if direct and "parameters that still train" in reason
            else "freeze what feeds them, or accept the eager run"
        )
        warnings.warn(
            f"freezert runs frozen block(s) {shown} eagerly, with autograd, because {reason}; {fix}.",
            FreezeWarning,
            stacklevel=_user_stacklevel(),
        )

    @property
    def eager_blocks(self) -> dict[str, str]:
        """Frozen blocks that run eagerly (autograd through them, no segment, no cache), each with why."""
        out = {self._table.names[i]: why for i, why in self._part.eager.items()}
        for i in self._part.tail_frozen:
            out.setdefault(self._table.names[i], "it runs after a trainable block, so its input needs a gradient")
        return out

    # -- introspection -----------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The block sequence, as (dotted name, module) pairs."""
        return list(zip(self._table.names, self._table.modules))

    @property
    def frozen_indices(self) -> list[int]:
        """Sorted indices of the frozen blocks."""
        return list(self._part.frozen)

    @property
    def boundary(self) -> list[int]:
        """Prefix blocks whose outputs the trainable part reads (with a recorded plan: the blocks whose outputs
        a cache stores)."""
        if self._part.replay:
            return sorted({u for u, _, _ in self._part.replay if u < len(self._table)})
        return list(self._part.boundary)

    @property
    def prefix_length(self) -> int:
        """Number of blocks (from block 0) that run as the inference segment."""
        return self._part.k

    @property
    def segment(self) -> FrozenSegment | None:
        """The inference segment, built at the first forward (None before, or when nothing is frozen)."""
        return self._segment

    @property
    def cache(self):
        """The ``FeatureCache`` holding frozen-segment outputs (None without ``cache=``)."""
        return self._cache

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: hand these to the optimizer."""
        return [p for p in self._params if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters freezert froze: the frozen blocks', the stem's when block 0 is frozen, and ``also_freeze``."""
        ids: set[int] = set()
        out = []
        for p in [p for m in self._frozen_modules() for p in m.parameters()] + list(self._also):
            if id(p) not in ids:
                ids.add(id(p))
                out.append(p)
        return out

    def unwrap(self) -> nn.Module:
        """Gives the user's model back with its original ``requires_grad`` flags and BatchNorm modes."""
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg)
        for m, before in self._forced_bn.values():
            m.train(self._own_mode(before))
        self._forced_bn.clear()
        self._segment = None
        self._unwrapped = True
        if _LIVE.get(self.model) is not None and _LIVE[self.model]() is self:
            del _LIVE[self.model]
        return self.model

    def _check_live(self) -> None:
        if self._unwrapped:
            raise FreezeError("this FrozenModel was unwrapped; call freezert.wrap(model, ...) again to freeze it")

    # -- forward -----------------------------------------------------------------------------------------
    def _ensure_segment(self) -> FrozenSegment:
        seg = self._segment
        if seg is None or seg.is_stale():
            self._weights_token += 1
            t, part = self._table, self._part
            if self._driven:
                entries = [((i, 0), t.names[i], t.modules[i]) for i in range(part.k)]
                cached, readers = set(range(part.k)), {}
            else:
                n = len(t)
                stem = [((u, 0), t.candidates[u - n][0], t.candidates[u - n][1]) for u in part.stem_units]
                blocks = [((i, j), name, m) for i in part.segment for j, (name, m) in enumerate(t.members[i])]
                entries = stem + blocks
                cached = set(part.cached_units)
                readers = {(u, j): ctx for (u, j, idx), ctx in self._rec.consumers.items() if idx == 0}
            seg = self._segment = FrozenSegment(
                t,
                part,
                entries,
                bn=self.bn,
                dtype=self.dtype,
                channels_last=self.channels_last,
                graphs=self.graphs,
                cached=cached,
                readers=readers,
            )
        return seg

    def forward(self, *args, cache_ids=None, **kwargs):
        self._check_live()
        inputs = flatten_tensors((args, kwargs))  # once per call: kernels, grad check and cache keys read it
        # An input that needs a gradient (saliency, adversarial examples) runs the model as naive freezing would.
        grad_in = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if self._part.frozen and not self._is_driven_call(args, kwargs):
            if not grad_in:
                sig = _structure(args, kwargs)
                if self._plan_sig != sig:  # first call, a new kind of call, or a new freeze: record and plan
                    self._replan(args, kwargs)
                    self._plan_sig = sig
        plan = self._kernels_for(inputs)
        with contextlib.ExitStack() as stack:
            if plan:
                from .ops.substitute import swapped

                stack.enter_context(swapped(self.model, plan))
            if self._budget is not None and self.training and torch.is_grad_enabled():
                if self._recompute is None:  # this step measures what each trainable block saves, then plans
                    return self._plan_recompute(args, kwargs, cache_ids, inputs, grad_in)
                if self._recompute:
                    from .memory import checkpointed

                    stack.enter_context(checkpointed(self.model, self._recompute))
            return self._forward(args, kwargs, cache_ids, inputs, grad_in)

    def _trainable_blocks(self) -> dict[str, nn.Module]:
        """The trainable blocks' modules and the head's, by dotted name: what recomputation may checkpoint.
        Looked up in the model now, so a kernel substitution in place is what gets measured and checkpointed."""
        t, fs = self._table, set(self._part.frozen)
        names = [name for i in range(len(t)) if i not in fs for name, _ in t.members[i]]
        stem = {name for name, _ in t.stem}
        names += [name for name, m in t.candidates if name not in stem and any(True for _ in m.parameters())]
        return {name: self.model.get_submodule(name) for name in names}

    def _plan_recompute(self, args, kwargs, cache_ids, inputs, grad_in: bool):
        """Runs this step while measuring each trainable block's saved bytes; picks the blocks to checkpoint so
        later steps fit ``memory_budget`` at the least recomputation (``fm.recompute``)."""
        from .memory import SavedMeter, plan_recompute

        blocks = self._trainable_blocks()
        with SavedMeter(blocks, exclude=[*self.model.parameters(), *self.model.buffers()]) as meter:
            out = self._forward(args, kwargs, cache_ids, inputs, grad_in)
        per = meter.per_block
        saved = {name: per.get(name, 0) for name in blocks}
        fixed = sum(n for name, n in per.items() if name not in blocks)
        chosen = plan_recompute(saved, self._budget, inputs=meter.inputs, outputs=meter.outputs, fixed=fixed)
        self._recompute = [name for name in blocks if name in chosen]  # forward order
        self.recompute_plan = {
            "budget": self._budget,
            "saved": saved,
            "outside_blocks": fixed,
            "checkpointed": list(self._recompute),
        }
        return out

    def memory_report(self, *args, loss=None, optimizer=None, plot: str | None = None, **kwargs):
        """Where one training step's memory goes, on these inputs: frozen and trainable parameters, gradients,
        optimizer state, activations saved for backward per block, the cache by tier (counted on the CPU,
        measured with the CUDA allocator on a GPU), and what each option would save: naive freezing for
        reference, recomputation, one-byte frozen weights. ``loss(output)`` defaults to the sum of the floating
        outputs; ``plot`` writes a PNG. The model's gradients, buffers and RNG are as before the report."""
        from .memory import checkpointed, memory_report

        def default_loss(out):
            ts = [t.float().sum() for t in flatten_tensors(out) if t.is_floating_point() and t.requires_grad]
            return torch.stack(ts).sum() if ts else None

        def step(run=lambda: self(*args, **kwargs)):
            value = (loss or default_loss)(run())
            if value is not None and value.requires_grad:
                value.backward()

        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        trainable = self._trainable_blocks()

        def recomputed():
            with checkpointed(self.model, list(trainable)):
                step()

        options = {
            "freezert (as configured)": step,
            "naive freezing (no segment)": lambda: step(lambda: self.model(*args, **kwargs)),
        }
        if self.kernels != "lean":
            from .ops.substitute import swapped

            def lean():
                with swapped(self.model, self._substitutions("lean")):
                    step()

            options["lean ops (kernels='lean')"] = lean
        if trainable:
            options["every trainable block recomputed"] = recomputed
        cache = None
        if self._cache is not None:
            tiers = self._cache.stats()["tiers"]
            cache = {name: t["bytes"] for name, t in tiers.items() if t["bytes"]}
        try:
            with torch.random.fork_rng(devices=sorted({p.device.index for p in params if p.is_cuda})):
                report = memory_report(
                    self.model,
                    step,
                    blocks=trainable,
                    optimizer=optimizer,
                    frozen=self.frozen_parameters(),
                    cache_bytes=cache,
                    options=options,
                )
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
        frozen = self.frozen_parameters()
        as_is = sum(p.numel() * p.element_size() for p in frozen)
        layers = [
            m for m in self._frozen_modules() for m in m.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
        ]
        w = {id(m.weight) for m in layers}
        one_byte = sum(p.numel() * (1 if id(p) in w else p.element_size()) for p in frozen)
        one_byte += sum(m.weight.shape[0] * 4 for m in layers)  # a float32 scale per output channel
        report.weights = {
            "as stored now": as_is,
            "float16 / bfloat16 (dtype=)": sum(p.numel() * min(2, p.element_size()) for p in frozen),
            "one byte + scales (dtype='int8' or 'fp8')": one_byte,
        }
        if plot is not None:
            report.plot(plot)
        return report

    @property
    def recompute(self) -> list[str] | None:
        """Trainable blocks recomputed in backward to fit ``memory_budget`` (None until the first training step)."""
        return None if self._recompute is None else list(self._recompute)

    def _is_driven_call(self, args, kwargs) -> bool:
        return self._driven and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)

    def _kernels_for(self, inputs: list[torch.Tensor]) -> list:
        """The trainable part's Conv-BN-act blocks and LayerNorms to run through freezert.ops (CUDA, or forced)."""
        if self.kernels is False:
            return []
        if self.kernels == "auto":
            if not inputs or not inputs[0].is_cuda:
                return []
        if self._kernel_plan is None:
            self._kernel_plan = self._substitutions("lean" if self.kernels == "lean" else "triton")
        return self._kernel_plan

    def _substitutions(self, impl: str) -> list:
        """The trainable part's replacements by ``freezert.ops`` (frozen modules skipped)."""
        from .ops.substitute import plan_substitutions

        frozen = [n for n, _ in self._frozen_named()]

        def skip(name: str) -> bool:
            return any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in frozen)

        return plan_substitutions(self.model, skip=skip, impl=impl)

    def _forward(self, args, kwargs, cache_ids, inputs: list[torch.Tensor], grad_in: bool):
        if cache_ids is not None and self._cache is None:
            raise CacheError("cache_ids= was given but this model has no cache; wrap it with cache='fp16' (or True)")
        if self._part.k == 0:
            # Under a schedule the prefix may be empty for a while (Linear before freeze_start): nothing to cache
            # yet, so run plainly; a fixed freeze= without a prefix can never use the cache: say so.
            if self._cache is not None and self.schedule is None:
                raise CacheError("cache= needs frozen blocks from block 0 on (a frozen prefix); freeze=N with N >= 1")
            return self.model(*args, **kwargs)
        if grad_in:  # the input gets its gradient through the frozen blocks: no segment, no cache for this call
            return self.model(*args, **kwargs)
        driven = self._is_driven_call(args, kwargs)
        seg = self._ensure_segment()
        if self._cache is not None:
            if driven or self._part.cached_units:
                return self._forward_cached(seg, driven, args, kwargs, cache_ids, inputs)
            if "cache" not in self._warned:
                self._warned.add("cache")
                why = (
                    f"block {self._table.names[0]!r} runs eagerly ({self._part.eager[0]}), so nothing before it can "
                    "be skipped"
                    if 0 in self._part.eager
                    else f"{self._unit_name(self._part.unbatched[0])!r} hands the rest of the model a tensor without "
                    "the batch dimension first (shared by the whole batch, e.g. a position bias), so no sample's "
                    "frozen outputs can be stored on their own"
                )
                warnings.warn(
                    f"the feature cache is not used: {why}",
                    FreezeWarning,
                    stacklevel=_user_stacklevel(),
                )
        if driven:
            return self._run_tail(seg.run(args[0]))
        with seg.preparing(), seg.swapped(self.model):
            return self.model(*args, **kwargs)

    # -- the feature cache ---------------------------------------------------------------------------------
    def _keys(self, args, kwargs, inputs: list[torch.Tensor], cache_ids):
        """(batch size, the batch-first input tensors, one int64 key per sample, content hashes or None).

        A key covers every input of the call: batch-first tensors row by row, everything else (tensors of another
        size, scalars, strings, the call's structure) by value, mixed into every row's key. An input that cannot be
        keyed by value is refused: a cache must never serve rows computed from other inputs. With ``cache_ids``
        the ids are the keys and the content hash goes beside each row, so a changed input (augmentation) is seen.
        """
        tensors = [t for t in inputs if t.dim() > 0]
        if not tensors:
            raise CacheError("the cache keys samples by their input tensors, but this call passed none")
        batch = tensors[0].shape[0]
        rows = [t for t in tensors if t.shape[0] == batch]
        from ._native import hash_rows

        h = hashlib.blake2b(digest_size=8)
        others = [t for t in inputs if t.dim() == 0 or t.shape[0] != batch]
        _digest_structure(h, (args, kwargs))
        for t in others:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(int(hash_rows(t.reshape(1, -1)).cpu()[0]).to_bytes(8, "little", signed=True))
        glob = int.from_bytes(h.digest(), "little", signed=True)
        plain = not others and _plain_structure(args, kwargs)
        content = None
        for t in rows:
            r = hash_rows(t).cpu()
            content = r if content is None else content * 1099511628211 + r  # int64 arithmetic wraps: a 64-bit mix
        if not plain:  # other inputs reach the model: they are part of every sample's key
            content = content * 1099511628211 + glob
        if cache_ids is None:
            return batch, rows, content, None
        from .cache import ids_to_keys

        ids = ids_to_keys(cache_ids, "cache_ids")
        if ids.numel() != batch:
            raise CacheError(
                f"cache_ids hold {ids.numel()} id(s) for a batch of {batch}; pass one integer id per sample "
                "(the dataset indices of the batch)"
            )
        key = ids.to(torch.int64).cpu()
        if not plain:
            key = key * 1099511628211 + glob
        return batch, rows, key, content

    def _prefix_fingerprint(self, k: int, sig) -> str:
        """The cache fingerprint of the prefix ``0..k-1`` (stem included) as its weights are now."""
        from .cache import fingerprint_of
        from .segment import frozen_tensors

        t = self._table
        modules = [m for _, m in t.stem] + t.modules[:k]
        return fingerprint_of(
            frozen_tensors(modules),
            freeze=list(range(k)),
            bn=self.bn,
            dtype=str(self.dtype),
            codec=self._cache.codec,
            inputs=_sig_text(sig),
        )

    def _bind_cache(self, seg: FrozenSegment, tensors, ids_mode: bool, boundary_like, driven: bool = False) -> None:
        """Binds the cache to this segment's fingerprint; ``boundary_like()`` gives example boundary rows.

        When freezing moved deeper since the rows were stored (same input signature, same weights of the old
        prefix) and freezert drives the block graph, the stored rows are carried to the new cut by running only
        the blocks between the two cuts on them (``FeatureCache.extend``); otherwise a new fingerprint drops them.
        """
        sig = _input_sig(tensors)
        bound = self._cache_sig
        if bound is not None and bound == (self._weights_token, sig):
            return
        if bound is not None and ids_mode and bound[1] != sig and len(self._cache):
            raise CacheError(
                f"cache_ids refer to samples stored for inputs {_sig_text(bound[1])}, but this batch has "
                f"{_sig_text(sig)}; use new ids for new inputs or call fm.cache.clear()"
            )
        fp = self._prefix_fingerprint(self._part.k, sig)
        example = boundary_like()
        layout = [(tuple(t.shape[1:]), t.dtype) for t in example]
        old = self._cache_part
        if (
            driven
            and old is not None
            and bound is not None
            and bound[1] == sig
            and 0 < old.k < self._part.k
            and len(self._cache)
            and self._cache.fingerprint == self._prefix_fingerprint(old.k, sig)
        ):
            new_order = self._part.boundary

            def convert(rows: list[torch.Tensor]) -> list[torch.Tensor]:
                with torch.no_grad():
                    y = seg.run_from(dict(zip(old.boundary, rows)), old.k)
                return [y[j] for j in new_order]

            self._cache.extend(fp, layout, example[0].device, convert)
        else:
            self._cache.bind(fp, layout, example[0].device)
        self._cache_sig = (self._weights_token, sig)
        self._cache_part = self._part

    def _cache_bound(self, tensors) -> bool:
        return self._cache_sig == (self._weights_token, _input_sig(tensors))

    def _forward_cached(self, seg: FrozenSegment, driven: bool, args, kwargs, cache_ids, inputs):
        batch, tensors, keys, content = self._keys(args, kwargs, inputs, cache_ids)
        if driven:
            return self._run_tail(self._cached_boundary(seg, args[0], keys, tensors, content))
        # swap mode: the model's own forward runs; on a full hit the runners of the cached part replay the stored
        # boundary (every output of theirs that anything else reads) and run nothing.
        order = self._part.replay
        hit = None
        if self._cache_bound(tensors) and seg.can_replay:
            hit, rows = self._cache.fetch(keys, seg.cached_runners[-1].device, content=content)
            if bool(hit.all()):
                self._maybe_offload(seg)
                with seg.swapped(self.model), seg.replaying(batch, dict(zip(order, rows))):
                    return self.model(*args, **kwargs)
        self._restore_offloaded(seg)
        first = seg.cached_runners[0]
        started: list[float] = []
        handle = first.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
        try:
            with seg.preparing(), seg.capturing() as got, seg.swapped(self.model):
                out = self.model(*args, **kwargs)
        finally:
            handle.remove()
        if started:
            self._cache.note_segment_time(time.perf_counter() - started[0], batch)
        produced = [got[(u, j)][n] for u, j, n in order]
        bad = [self._unit_name(u) for (u, _, _), t in zip(order, produced) if t.dim() == 0 or t.shape[0] != batch]
        if not produced or bad:
            raise CacheError(
                f"{(bad or [self._table.names[0]])[0]!r} hands the trainable part tensors without the batch dimension "
                f"({batch}) first, so they cannot be cached per sample; cache a different cut (freeze=) or drop cache="
            )
        if hit is None:  # first call since the binding changed: which samples does the store already hold?
            self._bind_cache(seg, tensors, content is not None, lambda: produced)
            hit, _ = self._cache.fetch(keys, produced[0].device, content=content)
        if not bool(hit.all()):
            miss = (~hit).nonzero().squeeze(1)
            self._cache.put(
                keys[miss],
                [t.detach()[miss.to(t.device)] for t in produced],
                content=None if content is None else content[miss],
            )
        return out

    def _unit_name(self, u: int) -> str:
        n = len(self._table)
        return self._table.names[u] if u < n else self._table.candidates[u - n][0]

    def _cached_boundary(self, seg: FrozenSegment, x: torch.Tensor, keys, tensors, content):
        cache, order = self._cache, self._part.boundary

        def probe():
            self._restore_offloaded(seg)
            with torch.no_grad():
                y = seg.run(x[:1])  # learns the boundary layout (once per segment build)
            return [y[j] for j in order]

        self._bind_cache(seg, tensors, content is not None, probe, driven=True)
        hit, got = cache.fetch(keys, x.device, content=content)  # decoded to the segment outputs' dtypes
        n_hit = int(hit.sum())
        if n_hit == len(keys):
            self._maybe_offload(seg)
            return dict(zip(order, got))
        self._restore_offloaded(seg)
        miss = (~hit).nonzero().squeeze(1)
        t0 = time.perf_counter()
        fresh = seg.run(x if n_hit == 0 else x[miss.to(x.device)])
        cache.note_segment_time(time.perf_counter() - t0, len(miss))
        cache.put(keys[miss], [fresh[j] for j in order], content=None if content is None else content[miss])
        if n_hit == 0:
            return fresh
        hits = hit.nonzero().squeeze(1)
        out = {}
        for j, g in zip(order, got):
            f = fresh[j]
            full = f.new_empty((len(keys), *f.shape[1:]))
            full[miss.to(f.device)] = f
            full[hits.to(f.device)] = g.to(f.dtype)
            out[j] = full
        return out

    # -- offloading frozen weights once the cache serves whole batches ---------------------------------------
    def _maybe_offload(self, seg: FrozenSegment) -> None:
        if not self.offload_frozen or self._offloaded_from is not None:
            return
        device = seg.device
        if device is None or device.type == "cpu":
            return  # already in host memory: nothing to gain
        seg.move(torch.device("cpu"))
        self._offloaded_from = device
        self.offloads += 1

    def _restore_offloaded(self, seg: FrozenSegment) -> None:
        if self._offloaded_from is not None:
            seg.move(self._offloaded_from)
            self._offloaded_from = None

    def _run_tail(self, y: dict[int, torch.Tensor]):
        """Runs blocks k.. on the boundary tensors, following ``.f`` for YOLO-style graphs."""
        t, k = self._table, self._part.k
        container = self.model.get_submodule(t.path) if t.path else self.model
        # Looked up at call time: kernel substitution may have swapped a block.
        return run_blocks(t, lambda i: container._modules[t.keys[i]], k, len(t), y, keep=self._save)

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

    # -- state and copies --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """The wrapped model's own state_dict (same keys as the plain model)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads into the wrapped model; the segment notices the new weights and rebuilds."""
        out = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        self._segment = None
        return out

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._segment = None  # built again, on the new device/dtype, at the next forward
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_segment"] = None  # rebuilt lazily after unpickling / deep-copying
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if not self._unwrapped:
            _LIVE[self.model] = weakref.ref(self)  # the copy owns the copied model

    def inspect(self) -> str:
        """This model's block table and plan (``freezert.inspect``)."""
        return _describe(self)

    def _describe(self) -> str:
        return _describe(self)

    def extra_repr(self) -> str:
        p = self._part
        return f"frozen={list(p.frozen)}, prefix={p.k}, boundary={list(p.boundary)}, bn={self.bn!r}"


def _plain_keys_in(fm: FrozenModel, state_dict, prefix, *_args) -> None:
    """A parent's ``load_state_dict`` hands a nested FrozenModel the plain keys its ``state_dict`` wrote
    (``backbone.x``); the wrapped model sits at ``.model``, so they move to ``backbone.model.x``. Keys are
    matched against the model's own (a YOLO model's plain keys start with ``model.`` themselves)."""
    own = set(fm.model.state_dict().keys())
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] in own]:
        state_dict[prefix + "model." + key[len(prefix) :]] = state_dict.pop(key)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (past freezert's and torch.nn's frames)."""
    import os
    import sys

    skip = (os.path.dirname(__file__), os.path.dirname(nn.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level


_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format)


def _structure(args, kwargs) -> tuple:
    """What a plan depends on in a call: positions, keyword names, each tensor's rank and dtype, other types."""

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            return ("T", obj.dim(), obj.dtype)
        if isinstance(obj, dict):
            return ("D", tuple((k, walk(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))))
        if isinstance(obj, (list, tuple)):
            return ("L", tuple(walk(v) for v in obj))
        return type(obj).__name__

    return walk((args, kwargs))


def _digest_structure(h, obj, path: str = "input") -> None:
    """Feeds the call's structure and every non-tensor value into ``h``; refuses values it cannot key."""
    if isinstance(obj, torch.Tensor):
        h.update(b"T")
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest_structure(h, obj[k], f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for i, v in enumerate(obj):
            _digest_structure(h, v, f"{path}[{i}]")
    elif isinstance(obj, _PRIMITIVES):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise CacheError(
            f"the cache cannot key {path} of type {type(obj).__name__}: every input reaching the model is part of "
            "a sample's key; pass it as a tensor or a plain value (number, string), or drop cache="
        )


def _plain_structure(args, kwargs) -> bool:
    """True for calls with tensors only, no keywords: keys are then the rows' hashes (or the ids) alone."""
    return not kwargs and all(isinstance(a, torch.Tensor) for a in args)


def _input_sig(tensors: list[torch.Tensor]) -> tuple:
    """Per-sample shape and dtype of each batch input: what the cache's layout and fingerprint depend on."""
    return tuple((tuple(t.shape[1:]), t.dtype) for t in tensors)


def _sig_text(sig) -> str:
    return ", ".join(f"{list(shape)} {str(dt).replace('torch.', '')}" for shape, dt in sig)


def _make_cache(cache, bn: str):
    if cache is None or cache is False:
        return None
    from .cache import FeatureCache

    if cache is True:
        cache = FeatureCache()
    elif isinstance(cache, str):
        cache = FeatureCache(codec=cache)
    elif not isinstance(cache, FeatureCache):
        raise CacheError(
            f"cache={cache!r} is not understood; pass True, a codec name ('fp16', 'bf16', 'fp8', 'fp32') "
            "or a freezert.FeatureCache"
        )
    if bn == "train":
        raise CacheError(
            "cache= cannot be combined with bn='train': batch statistics make each sample's frozen output depend "
            "on the rest of its batch; use bn='frozen' or drop cache="
        )
    return cache


def wrap(
    model: nn.Module,
    freeze=10,
    *,
    blocks: str | None = None,
    also_freeze=None,
    bn: str = "frozen",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    graphs: bool = False,
    cache=None,
    offload_frozen: bool = False,
    kernels="auto",
    memory_budget=None,
) -> FrozenModel:
    """Returns ``model`` with blocks frozen per ``freeze=`` (int, list, name prefix(es), fraction or predicate).

    ``also_freeze=`` names parameters outside the blocks to freeze too (ViT's ``cls_token``); ``cache=`` (True, a
    codec name or a ``FeatureCache``) keeps the frozen prefix's outputs across epochs; ``memory_budget=`` ("4GiB" or
    bytes) bounds what the trainable part saves for backward by recomputing the blocks that cost least to redo.
    """
    return FrozenModel(
        model,
        freeze,
        blocks=blocks,
        also_freeze=also_freeze,
        bn=bn,
        dtype=dtype,
        channels_last=channels_last,
        graphs=graphs,
        cache=cache,
        offload_frozen=offload_frozen,
        kernels=kernels,
        memory_budget=memory_budget,
    )


def inspect(model: nn.Module, freeze=None, *, blocks: str | None = None, example_inputs=None) -> str:
    """The block table of ``model``: each block, the stem and head modules around it, and for each whether it runs
    as inference, runs eagerly or trains, and why. A ``FrozenModel`` shows its own plan; for a plain model,
    ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword arguments) lets the record run."""
    if isinstance(model, FrozenModel):
        return model._describe()
    fm = FrozenModel(model, freeze, blocks=blocks, kernels=False)
    try:
        if example_inputs is not None:
            if isinstance(example_inputs, dict):
                fm.plan(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                fm.plan(*example_inputs)
            else:
                fm.plan(example_inputs)
        return fm._describe()
    finally:
        fm.unwrap()


def _describe(fm: FrozenModel) -> str:
    t, part, model = fm._table, fm._part, fm.model
    planned = fm._driven or fm._plan_sig is not None
    where = f"at {t.path!r}" if t.path else "at the root"
    lines = [f"{type(model).__name__}: {len(t)} blocks {where} ({t.kind})"]
    lines.append(f"{'idx':>4}  {'name':<32} {'type':<22} {'params':>12}  state")

    def row(idx, name, m, state, kind=None):
        n = sum(p.numel() for p in m.parameters())
        lines.append(f"{idx:>4}  {name:<32} {(kind or type(m).__name__)[:22]:<22} {n:>12,}  {state}")

    fs = set(part.frozen)
    for name, m in t.stem:
        row("stem", name, m, "frozen with block 0 (inference)" if 0 in fs else "train (runs before block 0)")
    k = part.k
    for i, (name, m) in enumerate(zip(t.names, t.modules)):
        if k and i == k:
            b = ", ".join(map(str, fm.boundary)) or "none"
            inference = [j for j in range(k) if j not in part.eager]
            if len(inference) == k:
                lines.append(f"{'':>4}  ---- cut: blocks 0..{k - 1} run as the inference segment; boundary: {b} ----")
            else:
                lines.append(
                    f"{'':>4}  ---- cut: blocks 0..{k - 1} frozen; {len(inference)} run as inference, "
                    f"{k - len(inference)} eagerly; cached boundary: {b} ----"
                )
        if i not in fs:
            state = "train"
        elif i in part.eager:
            state = f"frozen (eager: {part.eager[i]})"
        elif i >= k:
            state = "frozen (eager: after a trainable block)"
        else:
            state = "frozen (inference)"
        members = t.members[i]
        row(i, name, m, state, "+".join(n for n, _ in members) if len(members) > 1 else None)
    stem = {n for n, _ in t.stem}
    for name, m in t.candidates:
        if name not in stem:
            row("head" if planned else "?", name, m, "train" if planned else "stem or head: the first forward decides")
    direct = [(n, p) for n, p in t.direct_parameters(model)]
    if direct:
        shown = ", ".join(f"{n} ({'train' if p.requires_grad else 'frozen'})" for n, p in direct)
        lines.append(f"parameters outside every module: {shown}")
    total = sum(p.numel() for p in model.parameters())
    fz = sum(p.numel() for p in fm.frozen_parameters())
    lines.append(f"frozen {fz:,} of {total:,} parameters ({100 * fz / max(total, 1):.1f}%)")
    if not planned and fs:
        lines.append(
            "not recorded yet: pass example_inputs= (or call fm.plan(...)) to see the stem, head and eager blocks"
        )
    return "\n".join(lines)
