"""The trainable part of one call: the blocks after the prefix (driven models) or the model's own forward with
the prefix's runners in place, under the kernel substitutions (``freezert.ops``) and, with ``memory_budget=``,
recomputation of the blocks chosen by the first training step's measurement (``freezert.memory``)."""

from __future__ import annotations

import contextlib
import enum
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import _tree
from ._errors import FreezeWarning
from .call import _PRIMITIVES, Call
from .config import FreezeConfig
from .planner import Plan, user_stacklevel
from .prefix import Boundary
from .segment import run_blocks

__all__ = ["Tail"]

# besides call.py's plain values (what a cache key reads by value): what a block's call may receive that holds no
# state its forward could change
_STATELESS = (torch.Tensor, *_PRIMITIVES, torch.layout, slice, type(Ellipsis), enum.Enum)


def _is_state(v: Any) -> bool:
    """An argument that may hold state a forward changes (transformers' ``DynamicCache``): not a tensor, plain
    value or callable."""
    return not isinstance(v, _STATELESS) and not callable(v)


def _module_state(model: nn.Module) -> list:
    """Every module of ``model`` (by identity, in tree order) with its number of hooks: changes when a module is
    replaced, added or removed, or a hook registered or removed."""
    out: list = []
    stack = [model]
    pop, push, add = stack.pop, stack.extend, out.append
    while stack:  # on every call: kept to plain dict reads (hook_count's sum, inlined)
        m = pop()
        if m is None:  # a child slot set to None
            continue
        d = m.__dict__
        add(m)
        add(
            len(d["_forward_hooks"])
            + len(d["_forward_pre_hooks"])
            + len(d["_backward_hooks"])
            + len(d["_backward_pre_hooks"])
        )
        push(d["_modules"].values())
    return out


class Tail:
    """Runs what trains; holds the kernel plan and the recomputation plan of the current freeze."""

    def __init__(self, model: nn.Module, config: FreezeConfig):
        self.model, self.config = model, config
        self.plan: Plan | None = None
        self._kernel_plan: list | None = None
        self._kernel_state: list = []  # the module tree and its hooks when the kernel plan was made
        self.recompute: list[str] | None = None  # trainable blocks run under checkpoint (None: not planned yet)
        self.recompute_plan: dict | None = None  # what the budget's plan measured and chose
        self._verify = 0

    def reset(self, plan: Plan) -> None:
        """A new plan: kernels and recomputation are planned again."""
        self.plan, self._kernel_plan, self.recompute = plan, None, None
        self._verify = 0  # training steps left that measure whether the plan fits the budget

    def __call__(self, call: Call, boundary: Boundary, training: bool) -> Any:
        with contextlib.ExitStack() as stack:
            subs = self.kernels_for(call.tensors)
            if subs:
                from .ops.substitute import swapped

                stack.enter_context(swapped(self.model, subs))
            if self.config.memory_budget is not None and training and torch.is_grad_enabled():
                if self.recompute is None:  # this step measures what each trainable block saves, then plans
                    return self._measure_and_plan(call, boundary)
                if self.recompute:
                    from .memory import checkpointed

                    stack.enter_context(checkpointed(self.model, self.recompute))
                if self._verify:
                    return self._measure_and_check(call, boundary)
            return self._run(call, boundary)

    def _run(self, call: Call, boundary: Boundary) -> Any:
        if boundary.tensors is None:
            return boundary.run(lambda: call.run(call.target or self.model))
        return self.blocks_after(boundary.tensors)

    def blocks_after(self, y: dict[int, torch.Tensor]) -> Any:
        """Runs blocks k.. of a driven model on the boundary tensors ``y`` (its ``.f`` routing, else a chain)."""
        t, k = self.plan.table, self.plan.part.k
        container = self.model.get_submodule(t.path) if t.path else self.model
        # Looked up at call time: kernel substitution may have swapped a block.
        return run_blocks(t, lambda i: container._modules[t.keys[i]], k, len(t), y, keep=t.save)

    # -- kernels -------------------------------------------------------------------------------------------
    def kernels_for(self, inputs: list[torch.Tensor]) -> list:
        """The trainable part's substitutions by freezert.ops. ``"auto"`` and ``"lean"``: the lean path on every
        device, bit-identical to eager (values, gradients, BatchNorm statistics, random draws) with fewer bytes
        saved for backward (``"auto"`` on tensors of ``ops.lean.MIN_ELEMENTS`` elements or more); the Triton
        kernels (close to eager, not bit-identical, not yet measured faster on a GPU) only with ``kernels=True``."""
        kernels = self.config.kernels
        if kernels is False:
            return []
        state = _module_state(self.model)
        if self._kernel_plan is None or state != self._kernel_state:
            # first call, or a module replaced or a hook added since the plan: a swap would run a stale module
            # or skip the hook, so plan again (a hooked module is not swapped)
            self._kernel_plan = self.substitutions(kernels)
            self._kernel_state = state
            # modules that checkpoint themselves (transformers' gradient_checkpointing, torch's CheckpointWrapper)
            self._self_checkpointing = [
                m
                for m in self.model.modules()
                if hasattr(m, "gradient_checkpointing") or type(m).__name__ == "CheckpointWrapper"
            ]
        if any(
            type(m).__name__ == "CheckpointWrapper" or m.gradient_checkpointing is True
            for m in self._self_checkpointing
        ):
            # the model recomputes those layers in backward by itself, after this call's substitutions are gone:
            # the recompute would save other tensors than the forward did (torch.utils.checkpoint refuses that)
            return []
        return self._kernel_plan

    def substitutions(self, kernels: Any) -> list:
        """The trainable part's replacements by ``freezert.ops`` for a ``kernels=`` value (frozen modules skipped):
        True, the Triton modules; ``"auto"``, the lean path on tensors of ``ops.lean.MIN_ELEMENTS`` elements or more
        (smaller ones cost more time lean than their bytes are worth); ``"lean"``, the lean path at every size."""
        from .ops.lean import MIN_ELEMENTS
        from .ops.substitute import plan_substitutions

        impl = "triton" if kernels is True else "lean"
        min_elements = MIN_ELEMENTS if kernels == "auto" else 0

        frozen = [n for n, _ in self.plan.frozen_named()]

        def skip(name: str) -> bool:
            return any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in frozen)

        return plan_substitutions(self.model, skip=skip, impl=impl, min_elements=min_elements)

    # -- memory_budget ---------------------------------------------------------------------------------------
    def trainable_blocks(self) -> dict[str, nn.Module]:
        """The trainable blocks' modules and the head's, by dotted name: what recomputation may checkpoint.
        Looked up in the model now, so a kernel substitution in place is what gets measured and checkpointed."""
        t, fs = self.plan.table, set(self.plan.part.frozen)
        names = [name for i in range(len(t)) if i not in fs for name, _ in t.members[i]]
        stem = {name for name, _ in t.stem}
        names += [name for name, m in t.candidates if name not in stem and any(True for _ in m.parameters())]
        return {name: self.model.get_submodule(name) for name in names}

    def _measure_and_plan(self, call: Call, boundary: Boundary) -> Any:
        """Runs this step while measuring each trainable block's saved bytes; picks the blocks to checkpoint so
        later steps fit ``memory_budget`` at the least recomputation."""
        from .memory import SavedMeter

        blocks = self.trainable_blocks()
        stateful: dict[str, str] = {}

        def look(name: str):
            def hook(m, args, kwargs):
                obj = next((v for v in _tree.flatten((args, kwargs))[0] if _is_state(v)), None)
                if obj is not None:
                    stateful.setdefault(name, type(obj).__name__)

            return hook

        handles = [m.register_forward_pre_hook(look(n), with_kwargs=True) for n, m in blocks.items()]
        try:
            with SavedMeter(blocks, exclude=[*self.model.parameters(), *self.model.buffers()]) as meter:
                out = self._run(call, boundary)
        finally:
            for h in handles:
                h.remove()
        per = meter.per_block
        saved = {name: per.get(name, 0) for name in blocks}
        fixed = sum(n for name, n in per.items() if name not in blocks)
        budget = self.config.memory_budget
        self._measured = (saved, meter.inputs, meter.outputs, fixed)
        self._choose(budget)
        if set(self.recompute) & set(stateful):
            # A block handed an object its forward changes (transformers' key/value cache: each layer appends its
            # keys) would see it changed when recomputed (keys twice: a crash, or a wrong result): never recomputed.
            name = next(n for n in self.recompute if n in stateful)
            warnings.warn(
                f"freezert does not recompute {name!r} under memory_budget: its call receives a "
                f"{stateful[name]}, state its forward may change, so a recompute would see another state; pass "
                "use_cache=False (or call it without that object) to let it be recomputed",
                FreezeWarning,
                stacklevel=user_stacklevel(),
            )
            fixed += sum(saved.pop(n) for n in stateful if n in saved)
            self._measured = (saved, meter.inputs, meter.outputs, fixed)
            self._choose(budget)
        self.recompute_plan = {
            "budget": budget,
            "saved": saved,
            "outside_blocks": fixed,
            "checkpointed": list(self.recompute),
            "covers": "the wrapped call's forward (a loss computed outside it is not counted)",
        }
        self._verify = 3 if self.recompute else 0
        return out

    def _choose(self, budget: int) -> None:
        from .memory import plan_recompute

        saved, inputs, outputs, fixed = self._measured
        chosen = plan_recompute(saved, budget, inputs=inputs, outputs=outputs, fixed=fixed)
        self.recompute = [name for name in saved if name in chosen]  # forward order

    def _measure_and_check(self, call: Call, boundary: Boundary) -> Any:
        """A step under the plan, measured: the plan's arithmetic is an estimate (a checkpointed block's outputs
        may be saved by what follows in another form), so a plan that overshoots the budget is tightened by its
        overshoot and planned again (at most three times; each step measured is exact, never a guess)."""
        from .memory import SavedMeter

        # the blocks, as the model holds them now (checkpointed wrappers): their kept inputs count too
        with SavedMeter(self.trainable_blocks(), exclude=[*self.model.parameters(), *self.model.buffers()]) as meter:
            out = self._run(call, boundary)
        budget, self._verify = self.config.memory_budget, self._verify - 1
        over = meter.total - budget
        if over > 0:
            target = self.recompute_plan.get("planned_for", budget) - over
            self._choose(max(target, 0))
            self.recompute_plan.update(checkpointed=list(self.recompute), planned_for=target)
        else:
            self._verify = 0
        self.recompute_plan["measured"] = meter.total
        return out
