"""The frozen prefix of one wrapped model: its inference segment, the feature cache and the cache keys, asked
once per call (``Prefix(call)``) and answering with a ``Boundary``: what the trainable part reads.

Driven models (YOLO-style graphs, a root ``nn.Sequential``) get the boundary tensors themselves. Every other
model runs its own forward with the segment's runners in place of the frozen modules: the boundary then says
how they run (computing, or replaying rows the cache served) and stores what they computed.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ._errors import CacheError, FreezeError, FreezeWarning
from .call import Call, keys_of, sig_text
from .config import FreezeConfig
from .partition import Partition
from .planner import Plan, user_stacklevel
from .runner import PlaceholderRead, contains_placeholder, has_hooks, hooked_inside
from .segment import FrozenSegment, frozen_tensors, structure_of

__all__ = ["Boundary", "Call", "Prefix"]


class Boundary:
    """What the prefix hands the trainable part: the boundary tensors by block (driven), or ``run(fn)``, which
    calls the model's own forward ``fn`` with the frozen modules replaced as this call needs (swap)."""

    def __init__(self, tensors: dict[int, torch.Tensor] | None = None, run: Callable | None = None):
        self.tensors = tensors
        self._run = run

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn() if self._run is None else self._run(fn)


class Prefix:
    """The segment (built lazily, rebuilt when the frozen weights change), the cache's binding and keys, and the
    offloading of frozen weights while the cache serves whole batches."""

    def __init__(self, model: nn.Module, config: FreezeConfig, scheduled: bool):
        self.model, self.config, self.cache, self.scheduled = model, config, config.cache, scheduled
        self.plan: Plan | None = None
        self.segment: FrozenSegment | None = None
        self.offloads = 0
        self._weights_token = 0  # bumped whenever the segment is rebuilt from (possibly) new weights
        self._bound_token: int | None = None  # the weights token the cache is bound for
        self._layouts: dict[tuple, Any] = {}  # input signature -> the cache's layout handle (one store, many shapes)
        self._cache_part: Partition | None = None  # the cut whose boundary the cache's rows hold
        self._offloaded_from: torch.device | None = None  # where the frozen weights live when not offloaded
        self._warned: set[str] = set()
        self._places: list[tuple[nn.Module, str, nn.Module]] = []  # where each frozen module sits in the model
        self._mutable: list[torch.Tensor] = []  # buffers outside the frozen part: what a replay may have to undo
        self.on_reader: weakref.WeakMethod | None = None  # set by the wrapper: how to learn a new reader

    def reset(self, plan: Plan) -> None:
        """A new plan: the segment is built again at the next call, unless the cut and what it stores are the
        same (a recorded kind of call seen again)."""
        old = self.plan
        same = old is not None and old.part == plan.part and old.table.names == plan.table.names
        self.plan = plan
        if not same:
            self.segment = None
        frozen = {id(b) for _, m in plan.frozen_named() for b in m.buffers()}
        self._mutable = [b for b in self.model.buffers() if id(b) not in frozen]

    # -- one call ------------------------------------------------------------------------------------------
    def __call__(self, call: Call) -> Boundary:
        plan, cache = self.plan, self.cache
        if (call.cache_ids is not None or call.cache_aug is not None) and cache is None:
            which = "cache_ids=" if call.cache_ids is not None else "cache_aug="
            raise CacheError(f"{which} was given but this model has no cache; wrap it with cache='fp16' (or True)")
        if plan.part.k == 0:
            # Under a schedule the prefix may be empty for a while (Linear before freeze_start): nothing to cache
            # yet, so run plainly; a fixed freeze= without a prefix can never use the cache: say so.
            if cache is not None and not self.scheduled:
                raise CacheError("cache= needs frozen blocks from block 0 on (a frozen prefix); freeze=N with N >= 1")
            return Boundary()
        if call.grad_in:  # the input gets its gradient through the frozen blocks: no segment, no cache
            return Boundary()
        seg = self.segment_now()
        driven = plan.driven and call.single_tensor
        if driven:
            if cache is None or self._hooked(seg.block_runners, inside_only=False, call=call):
                y = seg.run(call.args[0])
            else:
                y = self._cached_driven(seg, call)
            aug = self.config.feature_aug
            return Boundary(tensors=y if aug is None or not self.model.training else aug(y))
        if cache is not None:
            if plan.part.cached_units and not (plan.rec and plan.rec.stochastic):
                return self._cached_swap(seg, call)
            self._warn_cache_unused()
        return Boundary(run=lambda fn: _within(fn, seg.preparing(), seg.installed()))

    def segment_now(self) -> FrozenSegment:
        """The segment for the current plan and weights (built now if needed)."""
        seg = self.segment
        for parent, key, m in self._places:
            if parent._modules.get(key) is not m:
                raise FreezeError(
                    f"the frozen module {key!r} of {type(parent).__name__} was replaced after wrap(); freezert plans "
                    "from the modules it was given: call fm.unwrap() and wrap the model again"
                )
        if seg is None or seg.is_stale():
            self._weights_token += 1
            plan = self.plan
            t, part = plan.table, plan.part
            if plan.driven:
                entries = [((i, 0), t.names[i], t.modules[i]) for i in range(part.k)]
                cached, readers = set(range(part.k)), {}
            else:
                n = len(t)
                stem = [((u, 0), t.candidates[u - n][0], t.candidates[u - n][1]) for u in part.stem_units]
                blocks = [((i, j), name, m) for i in part.segment for j, (name, m) in enumerate(t.members[i])]
                entries = stem + blocks
                cached = set(part.cached_units)
                readers = {(u, j): ctx for (u, j, idx), ctx in plan.rec.consumers.items() if idx == 0}
            seg = self.segment = FrozenSegment(t, part, entries, self.config, cached=cached, readers=readers)
            self._places = [_place(self.model, name, m) for _, name, m in entries]
        elif seg.prepared and self.config.weights and self.config.offload_frozen and seg.device is not None:
            if seg.device.type == "cuda":  # one-byte copies serve the segment: the float originals go to host
                seg.release_originals(torch.device("cpu"))
        return seg

    def restore(self) -> None:
        """The user's frozen weights back where they were (before the user's modules run whole: a record, unwrap,
        a move)."""
        if self.segment is not None:
            self.segment.restore_originals()

    def _warn_cache_unused(self) -> None:
        if "cache" in self._warned:
            return
        self._warned.add("cache")
        part, rec = self.plan.part, self.plan.rec
        if rec is not None and rec.stochastic:
            why = (
                f"{rec.stochastic[0]!r} runs before the frozen part and gives another output each time on the same "
                "input (random augmentation, dropout in train mode), so the frozen part's input is not a function of "
                "the call's inputs; in eval mode, or with that module deterministic, the cache is used"
            )
        elif 0 in part.eager:
            name = self.plan.table.names[0]
            why = f"block {name!r} runs eagerly ({part.eager[0]}), so nothing before it can be skipped"
        else:
            why = (
                f"{self.plan.unit_name(part.unbatched[0])!r} hands the rest of the model a tensor whose first "
                "dimension is not the batch size, so the frozen outputs cannot be stored per sample (a tensor shared "
                "by the whole batch such as a position bias, or inputs that are not batch-first tensors such as a "
                "list of images)"
            )
        warnings.warn(f"the feature cache is not used: {why}", FreezeWarning, stacklevel=user_stacklevel())

    # -- the feature cache: driven models ------------------------------------------------------------------
    def _cached_driven(self, seg: FrozenSegment, call: Call) -> dict[int, torch.Tensor]:
        cache, order, x = self.cache, self.plan.part.boundary, call.args[0]
        batch, sig, keys, content, _ = keys_of(call)

        def probe():
            self._restore_offloaded(seg)
            with torch.no_grad():
                y = seg.run(x[:1])  # learns the boundary layout (once per segment build)
            return [y[j] for j in order]

        layout = self._layout(seg, sig, probe, driven=True)
        hit, got = cache.fetch(keys, x.device, layout=layout, content=content)  # in the segment outputs' dtypes
        n_hit = int(hit.sum())
        if n_hit == len(keys):
            self._maybe_offload(seg)
            return dict(zip(order, got))
        self._restore_offloaded(seg)
        miss = (~hit).nonzero().squeeze(1)
        t0 = time.perf_counter()
        fresh = seg.run(x if n_hit == 0 else x[miss.to(x.device)])
        cache.note_segment_time(time.perf_counter() - t0, len(miss))
        rows = [fresh[j] for j in order]
        cache.put(keys[miss], rows, layout=layout, content=None if content is None else content[miss])
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

    # -- the feature cache: the model's own forward ------------------------------------------------------
    def _cached_swap(self, seg: FrozenSegment, call: Call) -> Boundary:
        """On a full hit the runners of the cached part replay the stored boundary (every output of theirs that
        anything else reads) and run nothing; otherwise the prefix runs in full and the misses are stored."""
        batch, sig, keys, content, _ = keys_of(call)
        order = self.plan.part.replay
        hooked = self._hooked(seg.cached_runners, inside_only=True, call=call)
        layout = self._layouts.get(sig) if self._bound_token == self._weights_token else None
        if layout is not None and seg.can_replay and not hooked:
            hit, rows = self.cache.fetch(keys, seg.cached_runners[-1].device, layout=layout, content=content)
            if bool(hit.all()):
                self._maybe_offload(seg)
                replay = dict(zip(order, rows))
                return Boundary(run=lambda fn: self._replay(fn, call, seg, batch, replay))
        else:
            hit = None
        self._restore_offloaded(seg)
        return Boundary(run=lambda fn: self._compute_and_store(fn, seg, batch, sig, keys, content, hit))

    def _replay(self, fn, call: Call, seg: FrozenSegment, batch: int, rows: dict) -> Any:
        """The model's forward with the cached part replayed. A read of an output the cache does not store (a
        branch no recorded call took, a hook) is undone: the RNG and the buffers outside the frozen part go
        back, the plan learns the reader, and the call runs again under it."""
        undo = _Undo(self._mutable)
        try:
            with seg.installed(), seg.replaying(batch, rows):
                out = fn()
            key = contains_placeholder(out)
            if key is None:
                return out
        except PlaceholderRead as e:
            key = e.key
        undo.restore()
        learn = self.on_reader() if self.on_reader is not None else None
        if learn is None:
            raise PlaceholderRead(key)
        learn(key)  # the wrapper re-plans (and resets this prefix)
        return self(call).run(fn)

    def _hooked(self, runners, inside_only: bool, call: Call) -> bool:
        """True when a cache hit would skip a hook: one on a submodule of a module a hit does not run (or, for a
        driven model, on the module itself). Such calls run the prefix; said once, naming the module. A
        transformers output-capturing hook for an output ``call`` does not ask for does nothing: no hook."""
        config = getattr(self.model, "config", None)

        def requested(flag: str) -> bool:
            v = call.kwargs.get(flag)
            return bool(getattr(config, flag, False) if v is None else v)

        for r in runners:
            o = r.__dict__["original"]
            inside = r.hooked_inside() and hooked_inside(o, requested) is not None
            if not inside and (inside_only or not has_hooks(o, requested)):
                continue
            if "hooked" not in self._warned:
                self._warned.add("hooked")
                m = hooked_inside(o, requested) if inside else o
                name = next((n for n, x in self.model.named_modules() if x is m), type(m).__name__)
                warnings.warn(
                    f"freezert runs the frozen prefix instead of serving it from the cache while {name!r} has a "
                    "forward hook: a cache hit would not run that module, so the hook would not fire",
                    FreezeWarning,
                    stacklevel=user_stacklevel(),
                )
            return True
        return False

    def _compute_and_store(self, fn, seg: FrozenSegment, batch: int, sig: tuple, keys, content, hit):
        cache, order = self.cache, self.plan.part.replay
        started: list[float] = []
        handle = seg.cached_runners[0].register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
        try:
            with seg.preparing(), seg.capturing() as got, seg.installed():
                out = fn()
        finally:
            handle.remove()
        if started:
            cache.note_segment_time(time.perf_counter() - started[0], batch)
        lost = next((u for u, j, n in order if n >= len(got.get((u, j), ()))), None)
        if lost is not None:  # it did not run as the record saw it (a branch on the data): nothing to store
            if "lost" not in self._warned:
                self._warned.add("lost")
                warnings.warn(
                    f"freezert did not store this batch in the feature cache: {self.plan.unit_name(lost)!r} did not "
                    "run as in the recorded call (a branch on the data skipped it, or its input needed autograd), so "
                    "its output cannot be stored; the call ran in full",
                    FreezeWarning,
                    stacklevel=user_stacklevel(),
                )
            return out
        produced = [got[(u, j)][n] for u, j, n in order]
        bad = [self.plan.unit_name(u) for (u, _, _), t in zip(order, produced) if t.dim() == 0 or t.shape[0] != batch]
        if not produced:
            last = self.plan.table.names[max(self.plan.part.frozen)]
            raise CacheError(
                f"the frozen part's output (from {last!r}) reaches the trainable part inside an object freezert cannot "
                "look into (not a tensor, tuple, list, dict, dataclass or ModelOutput), so it cannot be cached; return "
                "tensors or a dataclass from the frozen blocks, or drop cache="
            )
        if bad:
            raise CacheError(
                f"{bad[0]!r} hands the trainable part tensors without the batch "
                f"dimension ({batch}) first, so they cannot be cached per sample; cache a different cut (freeze=) or "
                "drop cache="
            )
        layout = self._layout(seg, sig, lambda: produced)
        if hit is None:  # nothing fetched (a hook, a new binding): what does the store already hold?
            hit = cache.stored(keys, layout=layout, content=content)
        if not bool(hit.all()):
            miss = (~hit).nonzero().squeeze(1)
            cache.put(
                keys[miss],
                [t.detach()[miss.to(t.device)] for t in produced],
                layout=layout,
                content=None if content is None else content[miss],
            )
        return out

    # -- keys and binding ----------------------------------------------------------------------------------
    def prefetch(self, call: Call) -> bool:
        """Starts reading the stored rows of ``call``'s samples (the next batch) in the background; True when the
        cache knows this input shape and there was something to start."""
        if self.cache is None or self.plan is None or not self.plan.part.k or self._bound_token != self._weights_token:
            return False
        k = keys_of(call)
        layout = self._layouts.get(k.sig)
        if layout is None:
            return False
        self.cache.prefetch(k.keys, k.device, layout=layout)
        return True

    def _fingerprint(self, k: int) -> str:
        """The cache fingerprint of the prefix ``0..k-1`` (stem included) as its weights and modules are now; the
        input shape is not part of it: rows of each shape are a layout of their own in the one store."""
        from .cache import fingerprint_of

        t, cfg = self.plan.table, self.config
        modules = [m for _, m in t.stem] + t.modules[:k]
        return fingerprint_of(
            frozen_tensors(modules),
            freeze=list(range(k)),
            bn=cfg.bn,
            dtype=str(cfg.weights or cfg.dtype),
            codec=self.cache.codec,
            structure=structure_of(modules),
        )

    def _layout(self, seg: FrozenSegment, sig: tuple, boundary_like, driven: bool = False):
        """The cache's layout handle for inputs of signature ``sig``, binding the cache first when the segment
        was built anew; ``boundary_like()`` gives example boundary rows of such inputs.

        When freezing moved deeper since the rows were stored (same weights of the old prefix) and freezert drives
        the block graph, the stored rows are carried to the new cut by running only the blocks between the two
        cuts on them (``FeatureCache.extend``); otherwise a new fingerprint drops them.
        """
        cache, part = self.cache, self.plan.part
        if self._bound_token == self._weights_token and sig in self._layouts:
            return self._layouts[sig]
        example = boundary_like()
        device = example[0].device
        if self._bound_token != self._weights_token:
            fp, old, depth = self._fingerprint(part.k), self._cache_part, part.k / len(self.plan.table)
            if driven and old is not None and 0 < old.k < part.k and len(cache):
                carry = cache.fingerprint == self._fingerprint(old.k)
            else:
                carry = False
            if carry:

                def convert(rows: list[torch.Tensor]) -> list[torch.Tensor]:
                    with torch.no_grad():
                        y = seg.run_from(dict(zip(old.boundary, rows)), old.k)
                    return [y[j] for j in part.boundary]

                cache.extend(fp, None, device, convert, depth=depth)
            else:
                cache.bind(fp, None, device, depth=depth)
            self._bound_token, self._cache_part, self._layouts = self._weights_token, part, {}
        boundary = [(tuple(t.shape[1:]), t.dtype) for t in example]
        self._layouts[sig] = cache.layout_for(boundary, sig_text(sig))
        return self._layouts[sig]

    # -- offloading frozen weights once the cache serves whole batches -----------------------------------------
    def _maybe_offload(self, seg: FrozenSegment) -> None:
        if not self.config.offload_frozen or self._offloaded_from is not None:
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


class _Undo:
    """The RNG and some buffers as they are now, to be put back."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = [(b, b.clone()) for b in buffers]
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _place(root: nn.Module, name: str, m: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent, _, key = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), key, m


def _within(fn: Callable[[], Any], *contexts) -> Any:
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        return fn()
