"""Composer's functional form: ``freeze_layers`` over leaf layers in forward order, checkpointable.

Composer's ``freeze_layers`` freezes the first ``int(pct * (num_layers - 1))`` "layers" (modules without
children that own parameters) in registration order. Here the layers are ordered by forward use once one
forward of the model has been seen (``record_forward_order``), the frozen parameters' optimizer state is purged
(composer#1002), and the order, depth and frozen layers checkpoint by name.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._errors import FreezeError, FreezeWarning
from .base import STATE_VERSION
from .decide import linear_fraction
from .optim import as_optimizers, remove_params

__all__ = ["freeze_layers", "freeze_layers_state_dict", "load_freeze_layers_state_dict", "record_forward_order"]


def _leaf_param_layers(model: nn.Module) -> list[nn.Module]:
    """Composer's layers: modules without children that own parameters, depth-first in registration order."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen:  # a module registered twice is one layer (Composer would count it twice)
            return
        seen.add(id(m))
        kids = list(m.children())
        if not kids:
            if next(m.parameters(), None) is not None:
                out.append(m)
            return
        for k in kids:
            visit(k)

    visit(model)
    return out


class _UseRecorder(TorchFunctionMode):
    """Sees every torch function call of one forward and reports the tensors it reads (parameters included).

    Module hooks miss parameters used without their module's ``forward``: ``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly (issue 9), so a hook-based order put ``out_proj`` last.
    """

    def __init__(self, see: Callable[[Any], None]):
        super().__init__()
        self._see = see

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf)
        return func(*args, **kwargs)


class _OrderRecorder:
    """Orders layers by the first use of their parameters (or first call) in one forward of the root.

    It holds no reference to the root module, so the weak per-model registry below does not keep models alive.
    """

    def __init__(self, root: nn.Module, layers: list[nn.Module]):
        self._layers = list(layers)
        self._owner: dict[int, int] = {}
        for i, m in enumerate(self._layers):
            for p in m.parameters():
                self._owner.setdefault(id(p), i)  # a shared parameter belongs to the first layer that owns it
        self._seen: list[int] = []
        self._seen_set: set[int] = set()
        self._depth = 0
        self._mode: _UseRecorder | None = None
        self.order: list[nn.Module] | None = None
        self._handles = [m.register_forward_pre_hook(self._layer_called) for m in self._layers]
        self._idx = {id(m): i for i, m in enumerate(self._layers)}
        self._handles.append(root.register_forward_pre_hook(self._start))
        self._handles.append(root.register_forward_hook(self._done, always_call=True))

    def _mark(self, i: int) -> None:
        if i not in self._seen_set:
            self._seen_set.add(i)
            self._seen.append(i)

    def _layer_called(self, module: nn.Module, args: Any) -> None:
        self._mark(self._idx[id(module)])

    def _tensor_used(self, t: torch.Tensor) -> None:
        i = self._owner.get(id(t))
        if i is not None:
            self._mark(i)

    def _start(self, module: nn.Module, args: Any) -> None:
        self._depth += 1
        if self._depth == 1 and self.order is None:
            self._mode = _UseRecorder(self._tensor_used)
            self._mode.__enter__()

    def _done(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth > 0 or self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        # Layers that did not run keep their registration order, after the ones that did.
        self._set_order(self._seen + [i for i in range(len(self._layers)) if i not in self._seen_set])

    def _set_order(self, idx: list[int]) -> None:
        self.order = [self._layers[i] for i in idx]
        for h in self._handles:
            h.remove()
        self._handles, self._seen, self._seen_set = [], [], set()

    def set_order(self, layers: list[nn.Module]) -> None:
        """Takes a known order (a checkpoint's) instead of recording one; ``layers`` are this recorder's."""
        idx = {id(m): i for i, m in enumerate(self._layers)}
        self._set_order([idx[id(m)] for m in layers])


@dataclass
class _FunctionalState:
    recorder: _OrderRecorder
    registration: list[nn.Module]  # Composer's order: depth-first, registration order
    frozen_ids: set[int] = field(default_factory=set)  # the frozen set only grows
    depth: int = 0
    warned: bool = False

    def layers(self) -> list[nn.Module]:
        """Forward order once a forward was seen (or a checkpoint gave it), else Composer's registration order."""
        return self.recorder.order if self.recorder.order is not None else self.registration

    def apply(self, optimizers: list[Optimizer]) -> None:
        """Freezes the first ``depth`` layers (never the last) and takes every frozen layer out of the optimizers."""
        layers = self.layers()
        self.frozen_ids.update(id(m) for m in layers[: min(self.depth, max(len(layers) - 1, 0))])
        params: dict[int, nn.Parameter] = {}
        for layer in layers:
            if id(layer) in self.frozen_ids:
                for p in layer.parameters():
                    params[id(p)] = p
        remove_params(optimizers, params)
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


# Registry (needed: ``freeze_layers(model, ...)`` is Composer's stateless signature, yet the forward order and
# the depth reached must outlive each call). Weak keys: the model's state goes with the model.
_FUNCTIONAL: weakref.WeakKeyDictionary[nn.Module, _FunctionalState] = weakref.WeakKeyDictionary()


def _functional_state(model: nn.Module) -> _FunctionalState:
    st = _FUNCTIONAL.get(model)
    if st is None:
        layers = _leaf_param_layers(model)
        st = _FUNCTIONAL[model] = _FunctionalState(_OrderRecorder(model, layers), layers)
    return st


def record_forward_order(model: nn.Module) -> None:
    """Watches the next forward pass of ``model`` to order its layers by first use (done once per model).

    Call it before training starts (the Composer algorithm does, at ``Event.INIT``): until a forward has been
    seen, ``freeze_layers`` counts layers in Composer's registration order.
    """
    _functional_state(model)


def freeze_layers(
    model: nn.Module,
    optimizers: Optimizer | Sequence[Optimizer] | None,
    current_duration: float,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
) -> tuple[int, float]:
    """Drop-in for Composer's ``freeze_layers``: freezes the first ``int(pct * (num_layers - 1))`` layers now.

    Layers are Composer's (modules without children that own parameters), in forward order (the first use of
    each layer's parameters in one recorded forward) once a forward has been seen, else in Composer's
    registration order, with a FreezeWarning. Frozen parameters leave the optimizers *and* their optimizer state
    is purged (composer#1002); the frozen set never shrinks. Returns ``(freeze_depth, freeze_percentage)`` like
    Composer. Checkpoint the functional state with ``freeze_layers_state_dict``.
    """
    freeze_percentage = linear_fraction(current_duration, freeze_start, freeze_level)
    st = _functional_state(model)
    depth = max(int(freeze_percentage * len(st.registration[0:-1])), st.depth)  # the last layer is never frozen
    grew = depth > st.depth
    st.depth = depth
    if grew and st.recorder.order is None and not st.warned:
        st.warned = True
        warnings.warn(
            f"freeze_layers froze {depth} layer(s) of {type(model).__name__} in registration order (Composer's), "
            "because no forward of it has been seen; call freezert.schedule.record_forward_order(model) before "
            "training (the LayerFreezing algorithm does at Event.INIT), or restore freeze_layers_state_dict() on "
            "resume, to freeze in forward order",
            FreezeWarning,
            stacklevel=2,
        )
    st.apply(as_optimizers(optimizers))
    return depth, freeze_percentage


def freeze_layers_state_dict(model: nn.Module) -> dict:
    """The functional form's memory for ``model``, by layer name: forward order, depth, frozen layers."""
    st = _functional_state(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    order = None if st.recorder.order is None else [names[id(m)] for m in st.recorder.order]
    frozen = [names[id(m)] for m in st.registration if id(m) in st.frozen_ids]
    return {"version": STATE_VERSION, "kind": "freeze_layers", "order": order, "depth": st.depth, "frozen": frozen}


def load_freeze_layers_state_dict(
    model: nn.Module, state: dict, optimizers: Optimizer | Sequence[Optimizer] | None = None
) -> None:
    """Restores ``freeze_layers_state_dict`` into ``model`` (a new object after resuming) and re-applies it now.

    Call it before ``optimizer.load_state_dict``: frozen parameters leave ``optimizers`` as they had when saved.
    """
    if not isinstance(state, dict) or state.get("kind") != "freeze_layers" or state.get("version") != STATE_VERSION:
        raise FreezeError(
            f"freeze_layers state {state!r:.80} is not understood; pass what freeze_layers_state_dict() returned"
        )
    st = _functional_state(model)
    by_name = dict(model.named_modules(remove_duplicate=False))
    named = list(state["order"] or []) + list(state.get("frozen") or [])
    missing = [n for n in named if n not in by_name]
    if missing:
        raise FreezeError(
            f"the checkpoint's freeze_layers state names layer {missing[0]!r}, which this model does not have; "
            "resume into the same architecture"
        )
    if state["order"] is not None:
        st.recorder.set_order([by_name[n] for n in state["order"]])
    st.frozen_ids.update(id(by_name[n]) for n in state.get("frozen") or [])
    st.depth = max(st.depth, int(state["depth"]))
    st.apply(as_optimizers(optimizers))
