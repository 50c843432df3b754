"""The zoo's conformance harness: a wrapped model against naive freezing of a deep copy, in float64.

One function, ``conform``, checks everything the issue asks of one (model, freeze, inputs, mode): outputs and
every trainable gradient equal naive freezing (relative error <= 1e-9 against a floor relative to the norm),
frozen parameters get no gradient, running statistics and the state_dict match after optimizer steps, a
second epoch on the same inputs is served from the cache and is still exact, and ``unwrap()`` gives back
every ``requires_grad`` flag and every module's ``training`` flag as they were before ``wrap``.

The frozen set is read from the wrapped model *after* its first forward (the planner may freeze the stem
then); the reference is built from that set only, so anything the planner gets wrong about which parameters
are frozen or which modules run in eval mode shows up as a difference, not as a matching mistake.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import freezert
from freezert.bench.zoo import naive_freeze, no_dropout, output_tensors

TOL = 1e-9  # float64: folding and no-grad replay differ from eager by rounding only
# The cache's exact codec stores float32 rows: a float64 model served from it is off by float32 rounding,
# amplified by the trainable part (measured: resnet50 gradients 2e-6, timm efficientnet_b0 and yolo11n's
# Detect head 1.6e-5, one BatchNorm bias of timm efficientnet_b0 1e-4). A stale or zeroed boundary is off by
# 1e-2 to 1.
CACHE_TOL = 1e-3
FLOOR = 1e-6  # a tensor's error is measured against max(its own max, FLOOR * the largest one's max)
DTYPE = torch.float64


# What each wrap decided, by pytest node id, for the table in docs/ZOO.md (tests/zoo/conftest.py writes it
# when FREEZERT_ZOO_TABLE names that file).
TABLE: dict[str, dict] = {}


def note(**facts) -> None:
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if node:
        TABLE.setdefault(node, {}).update(facts)


# ---------------------------------------------------------------------------------------------------------
# optional packages: skip locally, fail in CI


def need(module: str):
    """Imports a zoo package; without it the test skips, or fails when ``FREEZERT_ZOO=require`` (CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is not importable ({e}); install the zoo extra: pip install -e '.[test,zoo]'"
        if os.environ.get("FREEZERT_ZOO") == "require":
            pytest.fail(f"FREEZERT_ZOO=require: {msg}", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


# ---------------------------------------------------------------------------------------------------------
# building models: float64, no randomness in the forward, BatchNorm statistics of a trained net


def settle_batchnorm(model: nn.Module, args: tuple = (), kwargs: dict | None = None, seed: int = 1) -> nn.Module:
    """Gives every BatchNorm non-trivial affine parameters and running statistics: those of the activations it
    sees on ``model(*args, **kwargs)`` (cumulative average over two train-mode forwards), then jittered, so a
    fold that used the wrong statistics, or a frozen BN left in train mode, changes the output."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    g = torch.Generator().manual_seed(seed)
    was = {m: m.training for m in model.modules()}
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g, dtype=m.bias.dtype) - 0.5)
            m.reset_running_stats()
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = None  # cumulative average
        model.train()
        for _ in range(2):
            model(*args, **(kwargs or {}))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            n = m.num_features
            m.running_mean.add_(
                0.1 * (torch.rand(n, generator=g, dtype=m.running_mean.dtype) - 0.5) * m.running_var.sqrt()
            )
            m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=g, dtype=m.running_var.dtype))
            m.num_batches_tracked.fill_(100)
    for m, t in was.items():
        m.training = t
    return model


def wake_zero_params(model: nn.Module, seed: int = 2) -> nn.Module:
    """Parameters initialised to zero or near it (torchvision ViT's head, biases, ConvNeXt's layer scale of
    1e-6) get small random values: a zero head makes every gradient zero, a 1e-6 layer scale hides the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and p.abs().max() < 1e-3:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def prepare(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> nn.Module:
    """A freshly built model made ready for the zoo: float64, no dropout, no all-zero parameters, settled
    BatchNorm; its modes as built."""
    model = wake_zero_params(no_dropout(model.to(DTYPE)))
    return settle_batchnorm(model, args, kwargs)


class Bases:
    """Prepared models built once per test file (seed 0) and handed out as deep copies; ``build(name)`` gives
    ``(model, args, kwargs)``. The zoo's conftest clears every one at the end of its file: float64 models are
    large (vit_b_16 alone is 0.7 GB), so they go before the next file builds its own."""

    live: list[Bases] = []

    def __init__(self, build: Callable[[str], tuple[nn.Module, tuple, dict]]):
        self.build, self.models = build, {}
        Bases.live.append(self)

    def __call__(self, name: str) -> nn.Module:
        if name not in self.models:
            torch.manual_seed(0)
            model, args, kwargs = self.build(name)
            self.models[name] = prepare(model, args, kwargs)
        return copy.deepcopy(self.models[name])


# ---------------------------------------------------------------------------------------------------------
# comparisons


flat = output_tensors


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max|a - b| / max(max|b|, scale); 0 for two empty tensors."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    denom = max(b.abs().max().item(), scale or 0.0, 1e-300)
    return (a - b).abs().max().item() / denom


def assert_same_outputs(out, ref_out, tol: float = TOL, what: str = "output") -> None:
    fo, fr = flat(out), flat(ref_out)
    assert len(fo) == len(fr), f"{what}: {len(fo)} tensors, naive freezing gives {len(fr)}"
    assert all(torch.isfinite(t).all() for t in fr if t.is_floating_point()), f"{what}: naive freezing is not finite"
    floor = FLOOR * max(
        (t.detach().double().abs().max().item() for t in fr if t.is_floating_point() and t.numel()), default=0.0
    )
    for i, (a, b) in enumerate(zip(fo, fr)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)}, naive freezing gives {tuple(b.shape)}"
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what}[{i}] differs from naive freezing"
            continue
        e = rel_err(a, b, floor)
        assert e <= tol, f"{what}[{i}]: relative error {e:.3g} against naive freezing (tolerance {tol:g})"


def weighted_loss(out, seed: int = 7) -> torch.Tensor:
    """sum over every floating output tensor of (out * fixed random weights): the same for both models."""
    g = torch.Generator().manual_seed(seed)
    total = None
    for t in flat(out):
        if not t.is_floating_point():
            continue
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        if t.requires_grad:
            term = (t * w).sum()
            total = term if total is None else total + term
    assert total is not None, "no output requires grad: nothing trains"
    return total


def assert_same_grads(model: nn.Module, ref: nn.Module, frozen: set[str], tol: float = TOL) -> None:
    """Trainable gradients equal the reference's; frozen parameters get none."""
    ref_params = dict(ref.named_parameters())
    big = max(
        (q.grad.abs().max().item() for q in ref_params.values() if q.grad is not None and q.grad.numel()), default=0.0
    )
    bad = []
    for n, p in model.named_parameters():
        q = ref_params[n]
        if n in frozen:
            if p.grad is not None:
                bad.append(f"frozen {n} got a gradient")
            continue
        if q.grad is None:
            if p.grad is not None and p.grad.abs().max() > 0:
                bad.append(f"{n} got a gradient; naive freezing gives none")
            continue
        if p.grad is None:
            bad.append(f"{n} got no gradient; naive freezing gives one (max {q.grad.abs().max().item():.3g})")
            continue
        e = rel_err(p.grad, q.grad, FLOOR * big)
        if e > tol:
            bad.append(f"{n}: gradient relative error {e:.3g}")
    assert not bad, f"{len(bad)} gradient(s) differ from naive freezing: " + "; ".join(bad[:6])


def assert_same_state(model: nn.Module, ref: nn.Module, tol: float = TOL) -> None:
    """Same state_dict keys; parameters and buffers (running statistics included) equal, each against a floor
    relative to the largest entry (BERT's zero-initialised key bias gets a gradient of pure rounding)."""
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b), f"state_dict keys differ: {sorted(set(a) ^ set(b))[:6]}"
    big = max((y.abs().max().item() for y in b.values() if y.is_floating_point() and y.numel()), default=0.0)
    bad = []
    for k in b:
        x, y = a[k], b[k]
        if not y.is_floating_point():
            if not torch.equal(x, y):
                bad.append(f"{k}: {x.flatten()[:4].tolist()} vs {y.flatten()[:4].tolist()}")
        elif rel_err(x, y, FLOOR * big) > tol:
            bad.append(f"{k}: relative error {rel_err(x, y, FLOOR * big):.3g}")
    assert not bad, f"{len(bad)} state_dict entries differ from naive freezing: " + "; ".join(bad[:6])


# ---------------------------------------------------------------------------------------------------------
# naive freezing


def naive(pristine: nn.Module, frozen: set[str], modes: dict[str, bool]) -> nn.Module:
    """``pristine`` (a copy of the model taken before wrapping) frozen the naive way (``naive_freeze``), every
    module not frozen in the mode ``modes`` gives (as before wrap)."""
    return naive_freeze(pristine, frozen, modes)


def grad_max(params: Iterable[nn.Parameter]) -> float:
    return max((p.grad.abs().max().item() for p in params if p.grad is not None and p.grad.numel()), default=0.0)


def sgd_step(params: Iterable[nn.Parameter], lr: float) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
            p.grad = None


STEP = 1e-2  # the largest parameter change of one step: visible, never blowing a random-weight model up


# ---------------------------------------------------------------------------------------------------------
# the check


def frozen_names(model: nn.Module, before: dict[str, bool]) -> set[str]:
    return {n for n, p in model.named_parameters() if before[n] and not p.requires_grad}


class Twin:
    """A wrapped model beside naive freezing of a copy, fed the same calls and stepped together.

    ``train=None`` leaves every module's mode as the user set it before wrapping. The first call goes through
    the wrapped model first: the frozen set is read after it, and the reference is frozen by that set. With a
    cache the tolerance is ``CACHE_TOL`` (float32 rows), unless ``tol`` says otherwise. Each call on either model
    starts from the same RNG state (detection heads sample anchors and proposals at random in train mode), so
    random ops match between the two while any extra draw on freezert's side still shows.
    """

    def __init__(
        self,
        model: nn.Module,
        freeze,
        *,
        train: bool | None = True,
        cache=None,
        expect_frozen: Callable[[str], bool] | None = None,
        tol: float = TOL,
        cache_ids: torch.Tensor | None = None,
        **opts,
    ):
        if train is not None:
            model.train(train)
        if cache is not None and tol == TOL:
            tol = CACHE_TOL
        self.model, self.freeze, self.cache, self.tol, self.opts = model, freeze, cache, tol, opts
        self.expect_frozen = expect_frozen
        self.extra = {} if cache_ids is None else {"cache_ids": cache_ids}  # for the wrapped model only
        self.rg_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self.mode_before = {n: m.training for n, m in model.named_modules()}
        self.pristine = copy.deepcopy(model)
        note(model=type(model).__name__, freeze=freeze, train=model.training, cache=cache, opts=opts, first=None)
        self.fm = freezert.wrap(model, freeze, cache=cache, **opts)
        self.ref: nn.Module | None = None
        self.frozen: set[str] = set()
        self.eager: dict = {}
        self.calls = 0

    def _plan_reference(self) -> None:
        model, freeze = self.model, self.freeze
        frozen = self.frozen = frozen_names(model, self.rg_before)
        assert frozen, f"freeze={freeze!r} froze no parameter"
        assert len(frozen) < sum(self.rg_before.values()), f"freeze={freeze!r} froze every trainable parameter"
        if self.expect_frozen is not None:
            want = {n for n, rg in self.rg_before.items() if rg and self.expect_frozen(n)}
            assert frozen == want, (
                f"freeze={freeze!r} froze the wrong parameters: unexpected "
                f"{sorted(frozen - want)[:5]}, missing {sorted(want - frozen)[:5]}"
            )
        assert list(self.fm.state_dict()) == list(self.pristine.state_dict()), "the wrapped state_dict keys differ"
        self.eager = dict(getattr(self.fm, "eager_blocks", None) or {})
        total = sum(p.numel() for p in model.parameters())
        share = sum(p.numel() for n, p in model.named_parameters() if n in frozen) / max(total, 1)
        note(frozen=share, eager=self.eager)
        self.ref = naive(self.pristine, frozen, self.mode_before)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.ref_trainable = [p for p in self.ref.parameters() if p.requires_grad]
        assert len(self.trainable) == len(self.ref_trainable)

    def _both(self, args, kwargs, ctx: Callable | None = None) -> tuple[Any, Any]:
        """The same call on the wrapped model and on the reference, each from the same RNG state, inside ``ctx()``
        (the reference is built outside it: a copy made under ``inference_mode`` could never train)."""
        seed = 1000 + self.calls
        torch.manual_seed(seed)
        with ctx() if ctx else contextlib.nullcontext():
            out = self.fm(*args, **kwargs, **self.extra)
        if self.ref is None:
            self._plan_reference()
            if ctx is not None:  # a first call in eval mode
                self.ref.eval()
        torch.manual_seed(seed)
        with ctx() if ctx else contextlib.nullcontext():
            return out, self.ref(*args, **kwargs)

    def first_call(self, how: str, *args, **kwargs) -> None:
        """A call before training, as validation before the first epoch does: both models in eval mode, under
        ``torch.no_grad()`` (``how="eval"``) or ``torch.inference_mode()`` (``how="inference"``); the outputs
        compared; then both back in the modes they trained in (naive freezing: frozen modules in eval mode).
        ``how="plan-one"``: ``fm.plan(...)`` on the first sample of the inputs instead."""
        note(first=how)
        if how == "plan-one":  # fm.plan(...) on one sample: the plan must hold for the batches that follow
            self.fm.plan(*one_sample(args), **one_sample(kwargs))
            return
        ctx = {"eval": torch.no_grad, "inference": torch.inference_mode}[how]
        self.fm.eval()
        if self.ref is not None:
            self.ref.eval()
        out, ref_out = self._both(args, kwargs, ctx)
        assert_same_outputs(out, ref_out, self.tol, f"call {self.calls} ({how} mode) output")
        self.calls += 1
        self.fm.train(self.mode_before[""])
        naive_freeze(self.ref, self.frozen, self.mode_before)

    def step(self, *args, **kwargs) -> dict:
        """One call on both, the loss's backward, the comparisons, an SGD step on both; returns the cache's
        counter deltas for this call (lookups, hits, misses) when there is a cache."""
        before = dict(self.fm.cache.stats()) if self.cache is not None else None
        out, ref_out = self._both(args, kwargs)
        what = f"call {self.calls}"
        assert_same_outputs(out, ref_out, self.tol, f"{what} output")
        weighted_loss(out).backward()
        weighted_loss(ref_out).backward()
        assert_same_grads(self.model, self.ref, self.frozen, self.tol)
        lr = STEP / max(grad_max(self.ref_trainable), 1e-300)  # one scalar for both models
        sgd_step(self.trainable, lr)
        sgd_step(self.ref_trainable, lr)
        assert_same_state(self.model, self.ref, self.tol)
        if self.cache is not None:
            # Cached rows are float32: the wrapped model trains on a boundary rounded to float32, and a model whose
            # train-mode BatchNorms see a few values per channel amplifies that rounding step after step (1e-5 on
            # the first hit, 1e-3 two steps later: DeepLabV3, LeViT). Each call is checked from the same state.
            with torch.no_grad():
                self.ref.load_state_dict(self.model.state_dict())
        self.calls += 1
        if before is None:
            return {}
        st = self.fm.cache.stats()
        return {k: st[k] - before[k] for k in ("lookups", "hits", "misses")}

    def unwrap(self) -> None:
        """``unwrap()`` gives back the model, every requires_grad and training flag as before wrap, and the
        same state as naive freezing's."""
        back = self.fm.unwrap()
        assert back is self.model
        rg = {n: p.requires_grad for n, p in self.model.named_parameters()}
        changed = sorted(k for k in self.rg_before if rg[k] != self.rg_before[k])
        assert not changed, f"unwrap() left requires_grad changed on {changed[:5]}"
        modes = {n: m.training for n, m in self.model.named_modules()}
        changed = sorted(k for k in self.mode_before if modes.get(k) != self.mode_before[k])
        assert not changed, f"unwrap() left the training flag changed on {[n or '<root>' for n in changed[:5]]}"
        if self.ref is not None:
            assert_same_state(self.model, self.ref, self.tol)


def all_hits(d: dict) -> bool:
    return d["hits"] > 0 and d["misses"] == 0 and d["hits"] == d["lookups"]


@dataclass
class Result:
    fm: Any
    frozen: set[str]  # parameter names frozen by the wrap (read after the first forward)
    eager: dict = field(default_factory=dict)  # fm.eager_blocks after the first forward, where it exists
    hits: int = 0  # cache hits in the last epoch


def conform(
    model: nn.Module,
    freeze,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    train: bool | None = True,
    cache=None,
    expect_frozen: Callable[[str], bool] | None = None,
    epochs: int = 2,
    hits: bool = True,
    tol: float = TOL,
    first: str | None = None,
    cache_ids: torch.Tensor | None = None,
    **opts,
) -> Result:
    """Wraps ``model`` (float64, in ``train`` mode) with ``freeze``; runs ``epochs`` optimizer steps on the same
    inputs beside naive freezing of a copy, checking outputs, gradients, frozen gradients, state and, with
    ``cache``, that every later epoch is all hits; then checks ``unwrap()``. Returns what the wrap decided.
    ``first="eval"`` (or ``"inference"``): one eval-mode call under ``torch.no_grad()`` (``torch.inference_mode()``)
    through both models before the training calls, as a validation pass before the first epoch. ``cache_ids``: passed
    to the wrapped model only (inputs that are not batch-first tensors: a detector's list of images)."""
    kwargs = kwargs or {}
    twin = Twin(
        model, freeze, train=train, cache=cache, expect_frozen=expect_frozen, tol=tol, cache_ids=cache_ids, **opts
    )
    res = Result(twin.fm, set())
    if first is not None:
        twin.first_call(first, *args, **kwargs)
    for epoch in range(epochs):
        d = twin.step(*args, **kwargs)
        if cache is not None and epoch and hits:
            assert all_hits(d), f"epoch {epoch} on the same inputs was not all cache hits: {d}"
            res.hits = d["hits"]
    res.frozen, res.eager = twin.frozen, twin.eager
    twin.unwrap()
    return res


# ---------------------------------------------------------------------------------------------------------
# the scenarios: how a fine-tuning run starts, with and without the cache

# Issue 16: training from the first call; training a model kept in eval mode; a validation pass (eval mode,
# torch.no_grad()) before the first epoch; the same under torch.inference_mode(); fm.plan(...) on one sample. The
# planner records the first call it sees, so a first call of another kind is where plans went wrong.
SCENARIOS: dict[str, dict] = {
    "train": dict(train=True),
    "eval": dict(train=False),
    "eval-first": dict(train=True, first="eval"),
    "inference-first": dict(train=True, first="inference"),
    "plan-one": dict(train=True, first="plan-one"),
}


def one_sample(tree):
    """The first sample of a call's inputs: every tensor (and every list, a detector's images and targets) of the
    batch's length (the first tensor's rows, or the first list's length) cut to one."""

    def size(x):
        if isinstance(x, torch.Tensor):
            return x.shape[0] if x.dim() else None
        if isinstance(x, list) and x and all(isinstance(y, torch.Tensor) for y in x):
            return len(x)
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
        return next((n for n in map(size, items) if n is not None), None)

    batch = size(tree)

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[:1] if x.dim() and x.shape[0] == batch else x
        if isinstance(x, list) and len(x) == batch:
            return x[:1]
        if isinstance(x, (list, tuple)):
            return type(x)(cut(y) for y in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(tree)


@dataclass
class Case:
    """One zoo model: its builder (random weights, float32; the ``Bases`` make it float64), its inputs, the depth
    to freeze and, where the test knows it, the parameters that depth must freeze. ``cached``: extra ``wrap``
    options with the cache (``also_freeze`` for what would make the frozen blocks run eagerly), and ``cache_ids``
    for inputs that are not batch-first tensors. ``skip``: scenario -> why it is left out (naive freezing itself
    cannot run it, or CI time)."""

    build: Callable[[], nn.Module]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    freeze: Any = 2
    expect: Callable[[str], bool] | None = None
    cached: dict = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)

    def check(self, model: nn.Module, scenario: str, cache) -> Result:
        """``conform`` in ``scenario`` (a key of ``SCENARIOS``), with ``cache`` or without."""
        note(scenario=scenario)
        opts = dict(self.cached) if cache else {}
        expect, also = self.expect, opts.get("also_freeze", ())
        if expect is not None and also:
            expect = lambda n, inner=expect: inner(n) or n in also  # noqa: E731
        return conform(
            model,
            self.freeze,
            self.args,
            dict(self.kwargs),
            cache=cache,
            expect_frozen=expect,
            **SCENARIOS[scenario],
            **opts,
        )


def scenarios(cases: dict[str, Case], xfail: dict[tuple[str, str, str], str] | None = None) -> list:
    """pytest parameters ``(name, scenario, cache)``: every case x scenario x (no cache, ``"fp32"``), minus each case's
    ``skip``. ``xfail`` maps ``(name, scenario, cache)`` (``"*"`` matches any scenario or cache; cache ``""`` is
    none) to the cause found: those are marked ``xfail(strict=True)``, so a fix shows as XPASS."""
    out = []
    for name, case in cases.items():
        for scenario in SCENARIOS:
            if scenario in case.skip:
                continue
            for cache in (None, "fp32"):
                c = cache or ""
                why = next(
                    (
                        v
                        for (n, s, k), v in (xfail or {}).items()
                        if n == name and s in ("*", scenario) and k in ("*", c)
                    ),
                    None,
                )
                marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
                tid = f"{name}-{scenario}" + (f"-{c}" if c else "")
                out.append(pytest.param(name, scenario, cache, marks=marks, id=tid))
    return out


# ---------------------------------------------------------------------------------------------------------
# expected frozen sets


def under(*prefixes: str) -> Callable[[str], bool]:
    """Parameter names under any of ``prefixes`` (whole dotted components)."""
    return lambda n: any(n == p or n.startswith(p + ".") for p in prefixes)


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ---------------------------------------------------------------------------------------------------------
# the defaults' saved bytes at a training size


@dataclass
class DefaultsBytes:
    """One training step of ``wrap(model, freeze)`` beside ``kernels=False`` and naive freezing (float32, the
    benchmark's input): bytes saved for backward by each, and whether the defaults' gradients and buffers equal
    ``kernels=False``'s bit for bit (the same frozen segment, so any difference is the trainable part's)."""

    ours: int
    eager: int
    naive: int
    exact: bool


def defaults_bytes(model: nn.Module, freeze: Any, x: torch.Tensor) -> DefaultsBytes:
    from freezert.bench import loss_of
    from freezert.memory import saved_bytes
    from freezert.models import calibrate_batchnorm

    model = calibrate_batchnorm(model, x).train()
    plain_model = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=freeze)
    plain = freezert.wrap(plain_model, freeze=freeze, kernels=False)
    fm(x), plain(x)  # the record
    naive = naive_freeze(copy.deepcopy(plain_model), {n for n, p in model.named_parameters() if not p.requires_grad})

    def step(m: nn.Module, owner: nn.Module) -> int:
        return saved_bytes(lambda: loss_of(m(x)).backward(), exclude=[*owner.parameters(), *owner.buffers()])

    res = DefaultsBytes(step(fm, model), step(plain, plain_model), step(naive, naive), True)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        res.exact &= (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
    res.exact &= all(torch.equal(a, b) for a, b in zip(model.buffers(), plain_model.buffers()))
    return res
