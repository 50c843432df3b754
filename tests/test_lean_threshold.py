"""kernels="auto" leaves small tensors to eager's ops (``ops.lean.MIN_ELEMENTS``); kernels="lean" takes every size.

A lean op costs a fixed amount of Python per call and saves bytes in proportion to its tensor, so the defaults run
it only where the tensor is large. Both paths are eager's arithmetic: mixing them changes no value, gradient or
running statistic, and ``torch.utils.checkpoint``'s recompute (``memory_budget``) must take the same side of the
threshold as the forward did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import freezert
import freezert.ops.lean_modules as lean_modules
from freezert.memory import saved_bytes
from freezert.ops import lean


def _cbs(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _Residual(nn.Module):
    """A torchvision-style block: separate BN and ReLU modules, a residual sum in its own forward."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


def _net() -> nn.Sequential:
    # for a (2, 3, 32, 32) input: the stem and block 1's first layer make 16384-element maps, the rest 8192-element
    # ones (block 1 holds both sizes: a checkpoint of it recomputes both)
    torch.manual_seed(0)
    net = nn.Sequential(
        _cbs(3, 8),
        nn.Sequential(_cbs(8, 8), _cbs(8, 16, 2), _Residual(16), _cbs(16, 16)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.double().train()


X = torch.randn(2, 3, 32, 32, dtype=torch.float64)


def _step(m: nn.Module) -> torch.Tensor:
    out = m(X)
    out.square().mean().backward()
    return out


def _run(kernels, budget=None) -> dict:
    """Two training steps of ``wrap(_net(), freeze=1, kernels=...)`` beside the plain path (``kernels=False``,
    eager's ops: the same prefix, so any difference is the trainable part's): the second step's saved bytes, the
    lean BN+act calls in it, and whether everything equals the plain path bit for bit."""
    model = _net()
    ref_model = copy.deepcopy(model)
    ref = freezert.wrap(ref_model, freeze=1, kernels=False).train()
    opts = {"kernels": kernels}
    if budget is not None:
        opts["memory_budget"] = budget
    fm = freezert.wrap(model, freeze=1, **opts).train()
    calls = [0]
    real = lean_modules.bn_act

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    exact = True
    for step in range(2):
        if step == 1:
            lean_modules.bn_act = counted
        try:
            out = _step(fm)
        finally:
            lean_modules.bn_act = real
        ref_out = _step(ref)
        exact &= torch.equal(out, ref_out)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            exact &= p.grad is None or torch.equal(p.grad, q.grad)
            p.grad = q.grad = None
        exact &= all(torch.equal(a, b) for a, b in zip(model.buffers(), ref_model.buffers()))
    saved = saved_bytes(lambda: _step(fm), exclude=[*model.parameters(), *model.buffers()])
    naive = saved_bytes(lambda: _step(ref), exclude=[*ref_model.parameters(), *ref_model.buffers()])
    fm.unwrap()
    return {"saved": saved, "naive": naive, "lean_calls": calls[0], "exact": exact, "fm": fm}


def test_the_default_threshold_is_the_documented_one():
    assert lean.MIN_ELEMENTS == 2**17
    assert lean._MIN == [0]  # outside a region: every size (a lean op called directly is always lean)


def test_auto_runs_the_large_tensors_lean_and_the_small_ones_eagerly(monkeypatch):
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 10_000)  # the 32x32 maps (16384 elements) above, the rest below
    auto = _run("auto")
    every = _run("lean")
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 10**9)
    none = _run("auto")
    assert auto["exact"] and every["exact"] and none["exact"]
    assert (auto["lean_calls"], every["lean_calls"], none["lean_calls"]) == (1, 3, 0)  # the large one, every one
    assert none["saved"] == none["naive"]  # every op eager: naive freezing's bytes
    assert every["saved"] < auto["saved"] < auto["naive"]
    assert lean._MIN == [0]  # every region's threshold was taken off again


def test_auto_with_a_memory_budget_recomputes_on_the_same_side_of_the_threshold(monkeypatch):
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 10_000)
    plain = _run("auto")
    res = _run("auto", budget=plain["saved"] * 9 // 10)  # the planner must checkpoint some trainable block
    assert res["fm"].recompute == ["1"]  # the block that holds both sizes
    assert res["exact"]  # a recompute on the other side would save other tensors: CheckpointError, or wrong bits
    assert res["saved"] < plain["saved"]


def test_the_report_measures_the_defaults_with_their_threshold(monkeypatch):
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 10**9)
    fm = freezert.wrap(_net(), freeze=1, kernels=False).train()
    fm(X)
    opts = fm.memory_report(X).options
    # every tensor below the threshold: the lean option the report offers is eager's bytes, as the defaults are
    assert opts["lean ops (kernels='auto')"] == opts["naive freezing (no segment)"]
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 0)
    opts = fm.memory_report(X).options
    assert opts["lean ops (kernels='auto')"] < opts["naive freezing (no segment)"]


@pytest.mark.parametrize("kernels", ["auto", "lean"])
def test_an_inplace_edit_of_a_small_eager_output_raises_as_eager_does(monkeypatch, kernels):
    monkeypatch.setattr(lean, "MIN_ELEMENTS", 10_000)

    class Edits(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbs(8, 8), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)  # 8192 elements: eager under "auto", lean under "lean"
            z = self.b(y)  # saves y
            y.mul_(2)  # invalid: eager autograd raises in backward
            return z

    model = nn.Sequential(_cbs(3, 8, 2), Edits()).double().train()
    fm = freezert.wrap(model, freeze=1, kernels=kernels).train()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fm(X).sum().backward()


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(8, 16, 3, 2, 1), (2, 8, 32, 32)),  # strided
        (nn.Conv2d(8, 16, 3, 2, 1), (8, 32, 32)),  # unbatched
        (nn.Conv2d(8, 8, 3, 1, 1, groups=8), (2, 8, 7, 7)),  # depthwise
        (nn.ConvTranspose2d(8, 4, 2, 2), (2, 8, 16, 16)),  # transposed: the strides multiply
        (nn.Conv1d(4, 6, 3, 1, 1), (3, 4, 10)),
        (nn.Conv3d(2, 4, 3, (1, 2, 2), 1), (1, 2, 4, 8, 8)),
    ],
)
def test_a_conv_bn_act_layer_knows_its_output_size_before_its_convolution_runs(conv, shape):
    x = torch.randn(shape)
    assert lean_modules._conv_out_elements(conv, x) == conv(x).numel()
