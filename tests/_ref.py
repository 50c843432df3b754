"""Reference helpers: naive (YOLOv5-style) freezing of a deep copy, and comparisons against it."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from freezert.models import calibrate_batchnorm


def pretrained_like(model: nn.Module, sample: torch.Tensor | None = None, seed: int = 1) -> nn.Module:
    """Gives BatchNorm the state of a trained net: running statistics that match the activations it sees
    (measured on ``sample``, then jittered) and non-trivial affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if sample is None:
        sample = torch.randn(4, 3, 64, 64, generator=g)
    with torch.no_grad():
        for m in bns:
            n = m.running_mean.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    calibrate_batchnorm(model, sample)
    with torch.no_grad():
        for m in bns:
            n = m.running_mean.numel()
            m.running_mean.add_(0.1 * (torch.rand(n, generator=g) - 0.5) * m.running_var.sqrt())
            m.running_var.mul_(0.9 + 0.2 * torch.rand(n, generator=g))
    return model


def naive_reference(model: nn.Module, fm, *, bn: str = "frozen") -> nn.Module:
    """A deep copy of ``model`` (a copy of ``fm.model`` taken before wrapping) frozen the naive way, by name."""
    ref = copy.deepcopy(model)
    frozen_params = {id(p) for p in fm.frozen_parameters()}
    frozen_names = {n for n, p in fm.model.named_parameters() if id(p) in frozen_params}
    for n, p in ref.named_parameters():
        if n in frozen_names:
            p.requires_grad_(False)
    ref.train(fm.training)
    if bn == "frozen":
        frozen_mods = {id(sub) for _, block in fm._plan.frozen_named() for sub in block.modules()}
        names = {n for n, m in fm.model.named_modules() if id(m) in frozen_mods}
        for n, m in ref.named_modules():
            if n in names and isinstance(m, _BatchNorm):
                m.eval()
    return ref


def flat(out) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list, dict or HF ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = list(out.values()) if isinstance(out, dict) else list(out.to_tuple())
    return [t for o in out for t in flat(o)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        (a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-12)
    ).item()


def assert_outputs_close(a, b, tol: float) -> None:
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        assert rel_err(x, y) < tol, rel_err(x, y)


def assert_grads_match(model: nn.Module, ref: nn.Module, tol: float) -> None:
    """Trainable gradients equal the reference's; frozen parameters have no gradient in either."""
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.requires_grad == q.requires_grad, n
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} got a gradient"
            continue
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None and q.grad.abs().max() > 0:
            assert rel_err(p.grad, q.grad) < tol, (n, rel_err(p.grad, q.grad))


def loss_of(out) -> torch.Tensor:
    """A loss that touches every output element with a position-dependent weight."""
    total = 0.0
    for t in flat(out):
        if t.is_floating_point() and t.requires_grad:
            w = torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype, device=t.device).view_as(t)
            total = total + (t * w).sum() + t.pow(2).mean()
    return total


def _storages(ts) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if isinstance(t, torch.Tensor)}


def independent_total(fm, opt, args: tuple, kwargs: dict | None = None) -> int:
    """What one training step of ``fm`` holds, counted without the report's code: the user's parameters and
    buffers, a gradient per trainable parameter, ``opt``'s state, the activations one forward saves for backward
    (saved-tensor hooks, each storage once), freezert's own copies of the frozen weights (folded, cast) and the
    cache's rows by tier."""
    model = fm.model
    params, buffers = list(model.parameters()), list(model.buffers())
    held = {}
    for part in (params, buffers, [p for p in params if p.requires_grad]):  # gradients: one per trainable parameter
        held.update({(id(part), k): v for k, v in _storages(part).items()})
    total = sum(held.values())
    total += sum(_storages([t for s in opt.state.values() for t in s.values()]).values())
    saved: dict[int, int] = {}
    exclude = set(_storages(params + buffers))

    def pack(t):
        k = t.untyped_storage().data_ptr()
        if k not in exclude:
            saved.setdefault(k, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fm(*args, **(kwargs or {}))
    total += sum(saved.values())
    del out
    if fm.segment is not None:
        own = {
            k: v
            for r in fm.segment.runners
            for k, v in _storages([*r.target.parameters(), *r.target.buffers()]).items()
            if k not in exclude
        }
        own.update(_storages(fm.segment._buffer_values.values()))
        total += sum(own.values())
    if fm.cache is not None:
        total += sum(t["bytes"] for t in fm.cache.stats()["tiers"].values())
    return total
