"""freezert.memory: the saved-bytes meter, the recompute planner under a budget, checkpointed blocks, the report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from freezert import FreezeError
from freezert.memory import (
    SavedMeter,
    checkpointed,
    forward_flops,
    memory_report,
    plan_recompute,
    saved_bytes,
)
from freezert.models import detection_loss, detection_targets_like, yolov5


def _naive_yolo(dtype=torch.float64):
    torch.manual_seed(0)
    model = yolov5("n").to(dtype)
    for block in model.model[:10]:
        block.requires_grad_(False)
    return model


def _step(model, x):
    def step():
        out = model(x)
        detection_loss(out, detection_targets_like(out, torch.Generator().manual_seed(1))).backward()

    return step


def _head(model):
    return {str(i): model.model[i] for i in range(10, len(model.model))}


def _exclude(*models):
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


def test_meter_per_block_sums_to_total_and_counts_unique_storages():
    x = torch.randn(4, 8, requires_grad=True)
    lin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    with SavedMeter(dict(lin.named_children()), exclude=lin.parameters()) as meter:
        lin(x).sum().backward()
    per = meter.per_block
    assert sum(per.values()) == meter.total
    # Linear 0 saves x; tanh saves its output; Linear 2 saves the same output (one storage)
    assert per["0"] == x.numel() * 4 and per["1"] == 4 * 16 * 4 and per["2"] == 0
    assert meter.inputs["2"] == 4 * 16 * 4 and meter.outputs["2"] == 4 * 2 * 4


def test_checkpointed_blocks_give_the_same_gradients_and_running_stats():
    naive = _naive_yolo()
    ckpt = copy.deepcopy(naive)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    keys = list(ckpt.state_dict())
    _step(naive, x)()
    with checkpointed(ckpt, ["model.13", "model.17", "model.20", "model.23"]) as m:
        assert list(m.state_dict()) == keys and type(m.model[13]).__name__ == "_Checkpointed"
        assert m.model[13].f == naive.model[13].f  # YOLO's tags survive for the driver
        _step(m, x)()
    assert type(ckpt.model[13]).__name__ == "C3"  # restored
    for a, b in zip(ckpt.parameters(), naive.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    for a, b in zip(ckpt.buffers(), naive.buffers()):  # BatchNorm statistics updated once, not twice
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_planned_budget_is_met_and_least_recompute_chosen():
    naive = _naive_yolo(torch.float32)
    x = torch.rand(2, 3, 64, 64)
    blocks = _head(naive)
    with SavedMeter(blocks, _exclude(naive)) as meter:
        _step(naive, x)()
    per = meter.per_block
    fixed, saved = per.pop(None, 0), per
    total = fixed + sum(saved.values())
    budget = int(total * 0.6)
    flops = forward_flops(lambda: naive(x), blocks)
    chosen = plan_recompute(saved, budget, cost=flops, inputs=meter.inputs, outputs=meter.outputs, fixed=fixed)
    assert chosen and chosen <= set(saved)
    with checkpointed(naive, [f"model.{k}" for k in chosen]) as m:
        measured = saved_bytes(_step(m, x), exclude=_exclude(naive), blocks=_head(naive))
    assert sum(measured.values()) <= budget, (sum(measured.values()), budget, chosen)
    assert plan_recompute(saved, total, fixed=fixed) == set()  # within budget: nothing recomputed


def test_planner_prefers_cheap_blocks():
    saved = {"a": 100, "b": 100, "c": 100}
    assert plan_recompute(saved, 200, cost={"a": 5.0, "b": 1.0, "c": 9.0}) == {"b"}
    assert plan_recompute(saved, 100, cost={"a": 5.0, "b": 1.0, "c": 9.0}) == {"a", "b"}
    assert plan_recompute(saved, "250", inputs={"a": 10, "b": 10, "c": 10}, cost={"a": 1, "b": 2, "c": 3}) == {"a"}


def test_infeasible_budget_names_the_minimum():
    saved = {"a": 1000, "b": 3000}
    with pytest.raises(FreezeError, match=r"minimum of .*\(1400 bytes\)"):
        plan_recompute(saved, 1000, inputs={"a": 200, "b": 200}, fixed=1000)


def test_checkpointed_refuses_unknown_names():
    with pytest.raises(FreezeError, match="'nope'"):
        with checkpointed(nn.Sequential(nn.Linear(2, 2)), ["nope"]):
            pass


def test_memory_report_table_and_plot(tmp_path):
    naive = _naive_yolo(torch.float32)
    x = torch.rand(2, 3, 64, 64)
    opt = torch.optim.Adam([p for p in naive.parameters() if p.requires_grad])

    def step():
        _step(naive, x)()
        opt.step()

    report = memory_report(
        naive,
        step,
        blocks=[f"model.{i}" for i in range(10, 25)],
        optimizer=opt,
        cache_bytes={"pinned host": 1234},
        options={"naive": _step(naive, x), "checkpoint 13": lambda: _run_ckpt(naive, x, ["model.13"])},
    )
    rows = dict(report.rows)
    n_frozen = sum(p.numel() * 4 for p in naive.model[:10].parameters())
    assert rows["frozen parameters"] == n_frozen
    assert rows["optimizer state"] >= 2 * rows["trainable parameters"]
    assert rows["gradients"] == rows["trainable parameters"]
    assert rows["cache (pinned host)"] == 1234
    assert rows["saved activations"] == sum(report.saved.values()) > 0
    assert report.options["checkpoint 13"] < report.options["naive"]
    text = str(report)
    assert "saved activations" in text and "model.13" in text and "total" in text
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "mem.png"))
    assert (tmp_path / "mem.png").stat().st_size > 0


def _run_ckpt(model, x, names):
    with checkpointed(model, names) as m:
        _step(m, x)()
