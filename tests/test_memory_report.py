"""``fm.memory_report()``: one training step's memory by kind and block, and what each option would save."""

from __future__ import annotations

import torch

import freezert
from freezert.models import yolov5

from ._ref import pretrained_like


def test_the_report_counts_the_step_and_leaves_the_model_as_it_was(tmp_path):
    model = pretrained_like(yolov5("n", nc=3))
    fm = freezert.wrap(model, freeze=10, cache="fp32").train()
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
    assert opts["freezert (as configured)"] == opts["naive freezing (no segment)"]  # eager PyTorch saves no more
    assert opts["every trainable block recomputed"] < opts["freezert (as configured)"] / 2
    assert opts["lean ops (kernels='lean')"] <= 0.7 * opts["freezert (as configured)"]
    w = report.weights
    assert w["as stored now"] == frozen and w["float16 / bfloat16 (dtype=)"] == frozen // 2
    assert frozen // 4 < w["one byte + scales (weights='int8' or 'fp8')"] < frozen // 3
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
