"""``FrozenModel`` and ``wrap()``: a model with its first blocks frozen and run as an inference segment."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import spec as _spec
from ._errors import CacheError, FreezeError
from .blocks import BlockTable, block_table
from .partition import Partition, partition
from .segment import FrozenSegment, flatten_tensors


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
        bn: str = "frozen",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        graphs: bool = False,
        cache=None,
        offload_frozen: bool = False,
        kernels="auto",
    ):
        super().__init__()
        if isinstance(model, FrozenModel):
            raise FreezeError("the model is already a FrozenModel; wrap the plain model (fm.unwrap()) instead")
        _spec.check_options(bn, dtype, channels_last, graphs)
        if kernels not in ("auto", True, False):
            raise FreezeError(f"kernels={kernels!r} is not understood; pass 'auto' (CUDA only), True or False")
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
        self._table: BlockTable = table
        self._params = list(model.parameters())
        self._requires_grad = [p.requires_grad for p in self._params]
        self._save = table.save
        self._segment: FrozenSegment | None = None
        self._unwrapped = False
        self._cache = _make_cache(cache, bn)
        self._cache_sig = None  # (weights token, input signature) the cache is bound for
        self._cache_part: Partition | None = None  # the cut whose boundary the cache's rows hold
        self._weights_token = 0  # bumped whenever the segment is rebuilt from (possibly) new weights
        self.offload_frozen = bool(offload_frozen)
        self._offloaded_from: torch.device | None = None  # where the frozen weights live when not offloaded
        self.offloads = 0
        self._set_frozen(frozen)
        if self.schedule is not None:
            # The schedule changes the frozen set through set_freeze(); bind the optimizer later with
            # fm.schedule.attach(optimizer=opt) and advance it with fm.schedule.step(progress).
            self.schedule.attach(self)

    # -- the frozen set --------------------------------------------------------------------------------
    def _frozen_named(self) -> list[tuple[str, nn.Module]]:
        """Frozen blocks, plus the stem when block 0 is frozen, as (dotted name, module)."""
        t = self._table
        named = [(t.names[i], t.modules[i]) for i in self._part.frozen]
        return named + (list(t.stem) if 0 in self._part.frozen else [])

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for _, m in self._frozen_named()]

    def _set_frozen(self, frozen: list[int]) -> None:
        k = _spec.prefix_length(frozen)
        self._part: Partition = partition(self._table, frozen, k)
        frozen_ids = {id(p) for m in self._frozen_modules() for p in m.parameters()}
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg and id(p) not in frozen_ids)
        self._segment = None
        self._kernel_plan = None
        self._enforce_bn_modes()

    def set_freeze(self, freeze) -> None:
        """Changes the frozen set (anything ``freeze=`` accepts); parameters keep their identity."""
        self._check_live()
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

    def _enforce_bn_modes(self) -> None:
        training = self.model.training
        frozen = set(map(id, _bn_modules(self._frozen_modules()))) if self.bn == "frozen" else set()
        for m in _bn_modules([self.model]):
            m.train(training and id(m) not in frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self._unwrapped:
            self._enforce_bn_modes()  # .train() must not undo frozen BatchNorm (pytorch#66073)
        return self

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
        """Prefix blocks whose outputs the trainable part reads."""
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
        """Parameters of the frozen blocks (and of the stem when block 0 is frozen)."""
        ids: set[int] = set()
        out = []
        for m in self._frozen_modules():
            for p in m.parameters():
                if id(p) not in ids:
                    ids.add(id(p))
                    out.append(p)
        return out

    def unwrap(self) -> nn.Module:
        """Gives the user's model back with its original ``requires_grad`` flags and BatchNorm modes."""
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg)
        for m in _bn_modules([self.model]):
            m.train(self.model.training)
        self._segment = None
        self._unwrapped = True
        return self.model

    def _check_live(self) -> None:
        if self._unwrapped:
            raise FreezeError("this FrozenModel was unwrapped; call freezert.wrap(model, ...) again to freeze it")

    # -- forward -----------------------------------------------------------------------------------------
    def _ensure_segment(self) -> FrozenSegment:
        seg = self._segment
        if seg is None or seg.is_stale():
            self._weights_token += 1
            seg = self._segment = FrozenSegment(
                self._table,
                self._part,
                bn=self.bn,
                dtype=self.dtype,
                channels_last=self.channels_last,
                graphs=self.graphs,
            )
        return seg

    def forward(self, *args, cache_ids=None, **kwargs):
        self._check_live()
        inputs = flatten_tensors((args, kwargs))  # once per call: kernels, grad check and cache keys read it
        plan = self._kernels_for(inputs)
        if not plan:
            return self._forward(args, kwargs, cache_ids, inputs)
        from .ops.substitute import swapped

        with swapped(self.model, plan):
            return self._forward(args, kwargs, cache_ids, inputs)

    def _kernels_for(self, inputs: list[torch.Tensor]) -> list:
        """The trainable part's Conv-BN-act blocks and LayerNorms to run through freezert.ops (CUDA, or forced)."""
        if self.kernels is False:
            return []
        if self.kernels == "auto":
            if not inputs or not inputs[0].is_cuda:
                return []
        if self._kernel_plan is None:
            from .ops.substitute import plan_substitutions

            frozen = [n for n, _ in self._frozen_named()]

            def skip(name: str) -> bool:
                return any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in frozen)

            self._kernel_plan = plan_substitutions(self.model, skip=skip)
        return self._kernel_plan

    def _forward(self, args, kwargs, cache_ids, inputs: list[torch.Tensor]):
        if cache_ids is not None and self._cache is None:
            raise CacheError("cache_ids= was given but this model has no cache; wrap it with cache='fp16' (or True)")
        if self._part.k == 0:
            # Under a schedule the prefix may be empty for a while (Linear before freeze_start): nothing to cache
            # yet, so run plainly; a fixed freeze= without a prefix can never use the cache: say so.
            if self._cache is not None and self.schedule is None:
                raise CacheError("cache= needs frozen blocks from block 0 on (a frozen prefix); freeze=N with N >= 1")
            return self.model(*args, **kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            # An input that needs a gradient (saliency, adversarial examples) must get it through the frozen
            # blocks too, as with naive freezing: no inference segment, no cache for this call.
            return self.model(*args, **kwargs)
        seg = self._ensure_segment()
        driven = self._table.kind in ("yolo", "sequential") and len(args) == 1 and not kwargs
        driven = driven and isinstance(args[0], torch.Tensor)
        if self._cache is not None:
            return self._forward_cached(seg, driven, args, kwargs, cache_ids, inputs)
        if driven:
            return self._run_tail(seg.run(args[0]))
        with seg.swapped(self.model):
            return self.model(*args, **kwargs)

    # -- the feature cache ---------------------------------------------------------------------------------
    def _batch_tensors(self, inputs: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        tensors = [t for t in inputs if t.dim() > 0]
        if not tensors:
            raise CacheError("the cache keys samples by their input tensors, but this call passed none")
        batch = tensors[0].shape[0]
        return batch, [t for t in tensors if t.shape[0] == batch]

    def _keys(self, batch: int, tensors: list[torch.Tensor], cache_ids) -> torch.Tensor:
        if cache_ids is not None:
            ids = torch.as_tensor(cache_ids).reshape(-1)
            if ids.is_floating_point() or ids.dtype == torch.bool or ids.numel() != batch:
                raise CacheError(
                    f"cache_ids must hold one integer id per sample ({batch}), got {ids.numel()} of {ids.dtype}; "
                    "pass the dataset indices of the batch"
                )
            return ids.to(torch.int64).cpu()
        from ._native import hash_rows

        key = None
        for t in tensors:
            h = hash_rows(t).cpu()
            key = h if key is None else key * 1099511628211 + h  # int64 arithmetic wraps: a 64-bit mix
        return key

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
        batch, tensors = self._batch_tensors(inputs)
        keys = self._keys(batch, tensors, cache_ids)
        ids_mode = cache_ids is not None
        if driven:
            return self._run_tail(self._cached_boundary(seg, args[0], keys, tensors, ids_mode))
        # swap mode: the model's own forward runs; on a full hit the runners replay the cached boundary.
        if self._cache_bound(tensors) and seg.can_replay and bool(self._cache.lookup(keys).all()):
            boundary = self._get_or_none(keys, seg.runners[-1].device)  # decoded to the layout's dtypes
            if boundary is not None:
                self._maybe_offload(seg)
                with seg.swapped(self.model), seg.replaying(batch, boundary):
                    return self.model(*args, **kwargs)
        self._restore_offloaded(seg)
        captured: list = []
        started: list[float] = []
        handles = [
            seg.runners[0].register_forward_pre_hook(lambda m, a: started.append(time.perf_counter())),
            seg.runners[-1].register_forward_hook(lambda m, a, out: captured.append((time.perf_counter(), out))),
        ]
        try:
            with seg.swapped(self.model):
                out = self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self._cache.note_segment_time(captured[-1][0] - started[0], batch)
        produced = flatten_tensors(captured[-1][1])
        if any(t.dim() == 0 or t.shape[0] != batch for t in produced):
            raise CacheError(
                f"block {seg.names[-1]!r} returns tensors without the batch dimension ({batch}) first, so its "
                "outputs cannot be cached per sample; cache a different cut (freeze=) or drop cache="
            )
        self._bind_cache(seg, tensors, ids_mode, lambda: produced)
        hit = self._cache.lookup(keys)
        if not bool(hit.all()):
            miss = (~hit).nonzero().squeeze(1)
            self._cache.put(keys[miss], [t[miss.to(t.device)] for t in produced])
        return out

    def _get_or_none(self, keys, device) -> list[torch.Tensor] | None:
        """Cached rows for ``keys``, or None when a disk record failed its checksum (it is dropped: recompute)."""
        from .cache import _Recompute

        try:
            return self._cache.get(keys, device)
        except _Recompute:
            return None

    def _cached_boundary(self, seg: FrozenSegment, x: torch.Tensor, keys, tensors, ids_mode: bool):
        cache, order = self._cache, self._part.boundary

        def probe():
            self._restore_offloaded(seg)
            with torch.no_grad():
                y = seg.run(x[:1])  # learns the boundary layout (once per segment build)
            return [y[j] for j in order]

        self._bind_cache(seg, tensors, ids_mode, probe, driven=True)
        hit = cache.lookup(keys)
        n_hit = int(hit.sum())
        if n_hit == len(keys):
            got = self._get_or_none(keys, x.device)  # decoded to the layout's dtypes: the segment's outputs'
            if got is not None:
                self._maybe_offload(seg)
                return dict(zip(order, got))
            hit = cache.lookup(keys)  # the records that failed verification are gone now: misses
            n_hit = int(hit.sum())
        self._restore_offloaded(seg)
        miss = (~hit).nonzero().squeeze(1)
        t0 = time.perf_counter()
        fresh = seg.run(x if n_hit == 0 else x[miss.to(x.device)])
        cache.note_segment_time(time.perf_counter() - t0, len(miss))
        cache.put(keys[miss], [fresh[j] for j in order])
        if n_hit == 0:
            return fresh
        hits = hit.nonzero().squeeze(1)
        got = self._get_or_none(keys[hits], x.device)
        if got is None:  # a stored record went bad after the lookup verified it: compute the whole batch
            return seg.run(x)
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
        x = y.get(k - 1)
        for i in range(k, len(t)):
            m = container._modules[t.keys[i]]  # looked up now: kernel substitution may have swapped it
            if t.kind == "yolo" and m.f != -1:
                x = y[m.f % i] if isinstance(m.f, int) else [x if j == -1 else y[j % i] for j in m.f]
            x = m(x)
            if i in self._save:
                y[i] = x
        return x

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

    def extra_repr(self) -> str:
        p = self._part
        return f"frozen={list(p.frozen)}, prefix={p.k}, boundary={list(p.boundary)}, bn={self.bn!r}"


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
    bn: str = "frozen",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    graphs: bool = False,
    cache=None,
    offload_frozen: bool = False,
    kernels="auto",
) -> FrozenModel:
    """Returns ``model`` with blocks frozen per ``freeze=`` (int, list, name prefix(es), fraction or predicate).

    ``cache=`` (True, a codec name or a ``FeatureCache``) keeps the frozen prefix's outputs across epochs.
    """
    return FrozenModel(
        model, freeze, blocks=blocks, bn=bn, dtype=dtype, channels_last=channels_last, graphs=graphs,
        cache=cache, offload_frozen=offload_frozen, kernels=kernels,
    )


def inspect(model: nn.Module, freeze=None, *, blocks: str | None = None) -> str:
    """The block table of ``model``: index, dotted name, type, parameters, and where the cut falls."""
    t = block_table(model, blocks)
    frozen = _spec.resolve(freeze, t)
    k = _spec.prefix_length(frozen)
    part = partition(t, frozen, k)
    where = f"at {t.path!r}" if t.path else "at the root"
    lines = [f"{type(model).__name__}: {len(t)} blocks {where} ({t.kind})"]
    lines.append(f"{'idx':>4}  {'name':<32} {'type':<22} {'params':>12}  state")

    def row(idx, name, m, state):
        n = sum(p.numel() for p in m.parameters())
        lines.append(f"{idx:>4}  {name:<32} {type(m).__name__:<22} {n:>12,}  {state}")

    for name, m in t.stem:
        row("stem", name, m, "frozen (with block 0)" if 0 in frozen else "train")
    fs = set(frozen)
    for i, (name, m) in enumerate(zip(t.names, t.modules)):
        if k and i == k:
            b = ", ".join(map(str, part.boundary))
            lines.append(f"{'':>4}  ---- cut: blocks 0..{k - 1} run as the inference segment; boundary: {b} ----")
        state = "frozen" if i in fs else "train"
        if i in fs and i >= k:
            state = "frozen (eager: after a trainable block)"
        row(i, name, m, state)
    total = sum(p.numel() for p in model.parameters())
    fz = sum(p.numel() for i in frozen for p in t.modules[i].parameters())
    if 0 in fs:
        fz += sum(p.numel() for _, m in t.stem for p in m.parameters())
    lines.append(f"frozen {fz:,} of {total:,} parameters ({100 * fz / max(total, 1):.1f}%)")
    return "\n".join(lines)
