"""``fm.memory_report()``: one training step's memory by kind and block, and what each option would save."""

from __future__ import annotations

import torch

import freezert
from freezert.models import yolov5

from ._ref import independent_total, pretrained_like


def test_the_report_counts_the_step_and_leaves_the_model_as_it_was(tmp_path):
    model = pretrained_like(yolov5("n", nc=3))
    # kernels="lean": at this size every tensor is below the defaults' threshold (ops.lean.MIN_ELEMENTS)
    fm = freezert.wrap(model, freeze=10, cache="fp32", kernels="lean").train()
    x = torch.randn(2, 3, 64, 64)
    fm(x)  # the cache now holds these rows
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fm.memory_report(x, plot=str(tmp_path / "memory.png") if _has_matplotlib() else None)
    rows = dict(report.rows)
    frozen = sum(p.numel() * 4 for p in fm.frozen_parameters())
    assert rows["frozen parameters"] == frozen
    assert rows["gradients"] == rows["trainable parameters"] > 0
    assert rows["saved activations"] == sum(report.saved.values()) > 0
    assert rows["cache (device)"] > 0  # the rows the call above stored
    assert set(report.saved) >= {"model.10", "model.24"} and "model.3" not in report.saved  # trainable blocks only
    opts = report.options
    # the lean ops keep less than naive freezing; recomputing every block less still
    assert opts["freezert (as configured)"] == rows["saved activations"]
    assert opts["freezert (as configured)"] <= 0.75 * opts["naive freezing (no segment)"]
    assert opts["every trainable block recomputed"] < opts["freezert (as configured)"]
    assert rows["freezert's weight copies (folded, cast, one-byte)"] > 0  # the folded convolutions' new weights
    w = report.weights
    assert w["as stored now"] == frozen and w["float16 / bfloat16 (dtype=)"] == frozen // 2
    assert frozen // 4 < w["one byte + scales (weights='int8' or 'fp8')"] < frozen // 2
    assert "saved activations with" in str(report) and "frozen weights held as" in str(report)
    assert all(p.grad is None for p in model.parameters())  # gradients, buffers as before the report
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if _has_matplotlib():
        assert (tmp_path / "memory.png").stat().st_size > 1000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_total_is_every_byte_counted_independently():
    """parameters + buffers + gradients + optimizer state + saved activations + freezert's own copies + cache, each
    taken here without the report's code, equal the report's total within 1%."""
    torch.manual_seed(0)
    model = pretrained_like(yolov5("n", nc=3))
    # kernels="lean": at this size every tensor is below the defaults' threshold (ops.lean.MIN_ELEMENTS)
    fm = freezert.wrap(model, freeze=10, cache="fp32", kernels="lean").train()
    opt = torch.optim.Adam(fm.trainable_parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # the cache holds the rows, the optimizer its state
        sum(t.float().sum() for t in fm(x)).backward()
        opt.step()
        opt.zero_grad()
    report = fm.memory_report(x)  # the optimizer is found by itself

    expected = independent_total(fm, opt, (x,))
    assert abs(report.total - expected) <= 0.01 * expected, (report.total, expected, report.rows)


def test_optimizers_are_found_beside_dead_weak_proxies():
    """The report finds the optimizer among every live object; a weak proxy whose object is gone (isinstance on it
    raises ReferenceError) is passed over, not raised."""
    import weakref

    from freezert.report import optimizers_of

    class Thing:
        pass

    thing = Thing()
    proxies = [weakref.proxy(thing)]
    del thing  # the proxy stays in gc's list, dead
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    assert optimizers_of(list(lin.parameters())) == [opt]
    assert optimizers_of([torch.nn.Parameter(torch.zeros(1))]) == []
    assert proxies
