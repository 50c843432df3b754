"""``FrozenModel.memory_report``: one training step's memory on the user's inputs, with the alternatives beside
it (naive freezing, lean ops, every trainable block recomputed, one-byte frozen weights). Model state untouched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from . import _tree
from .memory import MemoryReport, checkpointed, memory_report

if TYPE_CHECKING:
    from .wrapper import FrozenModel


def _default_loss(out: Any) -> torch.Tensor | None:
    ts = [t.float().sum() for t in _tree.tensors(out) if t.is_floating_point() and t.requires_grad]
    return torch.stack(ts).sum() if ts else None


def report(fm: FrozenModel, args: tuple, kwargs: dict, loss=None, optimizer=None, plot: str | None = None):
    """See ``FrozenModel.memory_report``."""
    model, tail = fm.model, fm._tail

    def step(run=lambda: fm(*args, **kwargs)):
        value = (loss or _default_loss)(run())
        if value is not None and value.requires_grad:
            value.backward()

    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    trainable = tail.trainable_blocks()

    def recomputed():
        with checkpointed(model, list(trainable)):
            step()

    options = {
        "freezert (as configured)": step,
        "naive freezing (no segment)": lambda: step(lambda: model(*args, **kwargs)),
    }
    if fm.kernels != "lean":
        from .ops.substitute import swapped

        def lean():
            with swapped(model, tail.substitutions("lean")):
                step()

        options["lean ops (kernels='lean')"] = lean
    if trainable:
        options["every trainable block recomputed"] = recomputed
    cache = None
    if fm.cache is not None:
        tiers = fm.cache.stats()["tiers"]
        cache = {name: t["bytes"] for name, t in tiers.items() if t["bytes"]}
    frozen = fm.frozen_parameters()
    try:
        with torch.random.fork_rng(devices=sorted({p.device.index for p in params if p.is_cuda})):
            rep = memory_report(
                model,
                step,
                blocks=trainable,
                optimizer=optimizer,
                frozen=frozen,
                cache_bytes=cache,
                options=options,
            )
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
    rep.weights = _weight_options(fm, frozen)
    if plot is not None:
        rep.plot(plot)
    return rep


def _weight_options(fm: FrozenModel, frozen: list[nn.Parameter]) -> dict[str, int]:
    """Bytes of the frozen weights as stored now, pre-cast to 16 bits, and at one byte with their scales."""
    as_is = sum(p.numel() * p.element_size() for p in frozen)
    layers = [
        m
        for _, mod in fm._plan.frozen_named()
        for m in mod.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    w = {id(m.weight) for m in layers}
    one_byte = sum(p.numel() * (1 if id(p) in w else p.element_size()) for p in frozen)
    one_byte += sum(m.weight.shape[0] * 4 for m in layers)  # a float32 scale per output channel
    return {
        "as stored now": as_is,
        "float16 / bfloat16 (dtype=)": sum(p.numel() * min(2, p.element_size()) for p in frozen),
        "one byte + scales (weights='int8' or 'fp8')": one_byte,
    }


__all__ = ["MemoryReport", "report"]
