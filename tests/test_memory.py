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
    plan_recompute,
    saved_bytes,
)
from freezert.models import detection_loss, detection_targets_like, yolov5
from freezert.report import memory_report


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


class _Branches(nn.Module):
    """HRNet's multi-branch module: it writes each branch's output into its input list, x[i] = branch(x[i])."""

    def __init__(self, n: int = 2, d: int = 6):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)])

    def forward(self, x: list) -> list:
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return x


class _ListNet(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.stem = nn.Linear(d, d)
        self.stages = nn.Sequential(*[_Branches(d=d) for _ in range(4)])
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.stem(x)
        ys = [h, h * 2]
        for stage in self.stages:
            ys = stage(ys)
        return self.head(ys[0] * ys[1])


def test_a_checkpointed_block_that_edits_its_input_list_recomputes_from_the_list_it_was_given():
    """The recompute once ran on the list as the forward left it (the branches' outputs): no error, gradients 80-110%
    off (timm HRNet under memory_budget). The caller still sees the forward's edit, as without checkpoint."""
    torch.manual_seed(0)
    naive = _ListNet().double()
    ckpt = copy.deepcopy(naive)
    x = torch.randn(5, 6, dtype=torch.float64)
    naive(x).sum().backward()
    with checkpointed(ckpt, ["stages.1", "stages.2"]) as m:
        ys = [x, x + 1]
        out = m.stages[1](ys)
        assert out is ys and ys[0] is not x  # the edit reaches the caller's list
        m(x).sum().backward()
    for (n, a), b in zip(ckpt.named_parameters(), naive.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=n)


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


# --- lean ops x checkpoint x autocast (issue 15 item 3) -----------------------------------------------------------


def _bert_tiny():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    model = t.BertForSequenceClassification(cfg)
    ids, labels = torch.randint(0, 64, (2, 9)), torch.tensor([0, 1])
    frozen = ["bert.embeddings", "bert.encoder.layer.0"]
    blocks = ["bert.encoder.layer.1", "bert.encoder.layer.2", "bert.pooler", "classifier"]
    return model, frozen, blocks, lambda m: m(input_ids=ids, labels=labels).loss


def _yolo_tiny():
    torch.manual_seed(0)
    model = yolov5("n")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        targets = detection_targets_like(model(x), torch.Generator().manual_seed(1))
    return (
        model,
        [f"model.{i}" for i in range(10)],
        [f"model.{i}" for i in range(10, 24)],
        lambda m: detection_loss(m(x.to(next(m.parameters()).dtype)), targets),
    )


@pytest.mark.parametrize("build", [_yolo_tiny, _bert_tiny], ids=["yolov5n", "bert"])
@pytest.mark.parametrize("precision", ["float64", "bf16-autocast"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["lean", "lean+checkpoint"])
def test_lean_composes_with_checkpoint_and_autocast(build, precision, ckpt):
    """Two training steps of the lean plan (under non-reentrant checkpoint of every trainable block, and CPU bf16
    autocast) against naive freezing: gradients and BatchNorm statistics bit for bit, no CheckpointError."""
    import contextlib

    from freezert.ops import _exact, lean_plan, swapped

    model, frozen, blocks, loss = build()
    if precision == "float64":
        model = model.double()
    model.train()
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    lean = copy.deepcopy(model)
    plan = lean_plan(lean, skip=lambda n: any(n == f or n.startswith(f + ".") or f.startswith(n + ".") for f in frozen))

    def amp():
        return torch.autocast("cpu", torch.bfloat16) if precision != "float64" else contextlib.nullcontext()

    for step in range(2):
        torch.manual_seed(step)
        with amp():
            value = loss(model)
        value.backward()
        torch.manual_seed(step)
        with amp(), swapped(lean, plan), checkpointed(lean, blocks if ckpt else []):
            got = loss(lean)
        got.backward()
        assert _exact.same_bits(got.detach(), value.detach()), step
    for (name, a), b in zip(lean.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            assert _exact.same_bits(a.grad, b.grad), name
    for (name, a), b in zip(lean.named_buffers(), model.buffers()):
        assert _exact.same_bits(a, b), name


def test_saved_meter_counts_each_storage_once_by_the_op_that_made_it():
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16)
    with SavedMeter(exclude=list(lin.parameters())) as meter:
        y = torch.relu(lin(x))
        z = (y * y).sum()  # mul saves y twice: one storage
    per = meter.per_op
    assert per == {"input / frozen part": x.numel() * 4, "Relu": y.numel() * 4}
    assert sum(per.values()) == meter.total
    z.backward()


def test_meters_nest_and_hand_every_save_on_to_the_hooks_around_them():
    """A meter inside a meter (memory_budget measures its steps inside a benchmark's meter) or inside save_on_cpu:
    both meters count every save, and the enclosing hooks still get (and give back) each tensor."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    lin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    packed: list = []

    def pack(t):
        packed.append(t.shape)
        return ("outer", t)

    def unpack(p):
        assert p[0] == "outer"
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), SavedMeter(exclude=lin.parameters()) as outer:
        with SavedMeter(exclude=lin.parameters()) as inner:
            out = lin(x).sum()
    out.backward()
    assert inner.total == outer.total == (4 * 8 + 4 * 16) * 4
    assert len(packed) >= 4  # x, the weights, tanh's output: through both meters to the outermost hooks
    ref = copy.deepcopy(lin)
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).sum().backward()
    assert torch.equal(x.grad, xr.grad)
