"""Freezing schedules and optimizer surgery (freezert/schedule.py), on CPU."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import freezert
from freezert._errors import FreezeError
from freezert.schedule import (
    FreezeOut,
    GradientNorm,
    Linear,
    Unfreeze,
    apply_freeze,
    freeze_layers,
    freeze_layers_state_dict,
    linear_fraction,
    load_freeze_layers_state_dict,
    record_forward_order,
)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------
# helpers


def mlp(n_hidden: int = 3, width: int = 6) -> nn.Sequential:
    """Blocks: n_hidden x (Linear, ReLU) pairs, then a Linear head."""
    layers: list[nn.Module] = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n_hidden)]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def in_optimizer(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def train_step(model, opt, step, sched=None):
    g = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if sched is not None:
        sched.after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# Composer's functional arithmetic as Composer writes it (composer/algorithms/layer_freezing/layer_freezing.py),
# kept here as the oracle the drop-in must match bit for bit.
def composer_schedule(current_duration, freeze_start, freeze_level):
    if current_duration <= freeze_start:
        return 0.0
    total_freezing_time = 1.0 - freeze_start
    freezing_time_elapsed = current_duration - freeze_start
    freezing_time_elapsed_frac = freezing_time_elapsed / total_freezing_time
    return freeze_level * freezing_time_elapsed_frac


def composer_layers(module, out):
    if len(list(module.children())) == 0 and len(list(module.parameters())) > 0:
        out.append(module)
    else:
        for child in module.children():
            composer_layers(child, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Composer parity


def test_linear_fraction_matches_composer_bit_for_bit():
    grid = [i / 40 for i in range(41)] + [0.333, 0.6667, 0.999, 0.12345]
    for start in [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.999, 1.0]:
        for level in [0.0, 0.3, 0.5, 0.75, 1.0]:
            for t in grid:
                assert linear_fraction(t, start, level) == composer_schedule(t, start, level)
                for n in [1, 2, 3, 5, 12, 53]:
                    assert int(linear_fraction(t, start, level) * len(list(range(n))[0:-1])) == int(
                        composer_schedule(t, start, level) * (n - 1 if n else 0)
                    )
                    s = Linear(start, level)
                    assert len(s.frozen_blocks(t, n)) == int(composer_schedule(t, start, level) * (n - 1))


def test_freeze_layers_matches_composer_on_registration_ordered_model():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 2)
    )
    layers = composer_layers(model, [])
    assert len(layers) == 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3))  # nothing recorded yet: the first call installs the recorder
    for t in [0.0, 0.3, 0.5, 0.6, 0.8, 0.95]:
        model(torch.randn(2, 3))
        depth, pct = freeze_layers(model, opt, t, freeze_start=0.5, freeze_level=1.0)
        assert pct == composer_schedule(t, 0.5, 1.0)
        assert depth == int(composer_schedule(t, 0.5, 1.0) * (len(layers) - 1))
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                assert p.requires_grad == (i >= depth)
                assert (id(p) in in_optimizer(opt)) == (i >= depth)
    assert all(p.requires_grad for p in layers[-1].parameters())  # the last layer is never frozen


def test_freeze_layers_orders_layers_by_forward_execution():
    class Reversed(nn.Module):  # registers head first, runs it last
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.mid = nn.Linear(4, 4)
            self.stem = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))

    m = Reversed()
    record_forward_order(m)
    m(torch.randn(2, 3))
    depth, _ = freeze_layers(m, None, 1.0, freeze_start=0.0, freeze_level=1.0)
    assert depth == 2
    assert not any(p.requires_grad for p in m.stem.parameters())
    assert not any(p.requires_grad for p in m.mid.parameters())
    assert all(p.requires_grad for p in m.head.parameters())  # Composer would have frozen the head


def test_freeze_layers_purges_state_checkpoints_and_depth_only_grows(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    record_forward_order(model)
    train_step(model, opt, 0)
    assert len(opt.state) == 8
    depth, _ = freeze_layers(model, opt, 0.8, freeze_start=0.0, freeze_level=1.0)
    assert depth == 2  # 4 layers with parameters (ReLUs have none) -> int(0.8 * 3)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(frozen) == 4
    assert all(p not in opt.state for p in frozen)
    assert len(opt.state) == 4
    train_step(model, opt, 1)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")  # composer#1002: this crashed with stale state
    opt2 = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    depth2, pct2 = freeze_layers(model, opt, 0.2, freeze_start=0.0, freeze_level=1.0)
    assert depth2 == 2 and pct2 == composer_schedule(0.2, 0.0, 1.0)  # frozen set never shrinks


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(freeze_start=1.5), "freeze_start"),
        (dict(freeze_start=-0.1), "freeze_start"),
        (dict(freeze_level=2.0), "freeze_level"),
        (dict(freeze_level=float("nan")), "freeze_level"),
    ],
)
def test_freeze_layers_rejects_out_of_range_arguments(kwargs, name):
    with pytest.raises(FreezeError, match=name):
        freeze_layers(mlp(), None, 0.5, **kwargs)
    with pytest.raises(FreezeError, match=name):
        Linear(**kwargs)


def test_bad_progress_and_indices_raise_freeze_error():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = Linear().attach(m, opt, blocks=list(m.children()))
    with pytest.raises(FreezeError, match="progress"):
        s.step(1.2)
    with pytest.raises(FreezeError, match="outside 0..3"):
        apply_freeze(m, opt, [7], blocks=list(m.children()))
    with pytest.raises(FreezeError, match="nothing to train"):
        apply_freeze(m, opt, [0, 1, 2, 3], blocks=list(m.children()))
    with pytest.raises(FreezeError, match="not attached"):
        Linear().step(0.5)
    assert isinstance(FreezeError("x"), ValueError)


# ---------------------------------------------------------------------------------------------------------
# optimizer surgery


def test_apply_freeze_removes_params_purges_state_and_keeps_identity():
    m = mlp()
    blocks = list(m.children())
    ids_before = [id(p) for p in m.parameters()]
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in m.named_parameters() if n.endswith("weight")], "weight_decay": 0.01},
            {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    train_step(m, opt, 0)
    frozen = [p for b in blocks[:2] for p in b.parameters()]
    change = apply_freeze(m, opt, [0, 1], blocks=blocks)
    assert change.frozen == (0, 1) and change.unfrozen == () and change
    assert len(opt.param_groups) == 2  # groups keep their index (LR schedulers count them)
    assert all(id(p) not in in_optimizer(opt) for p in frozen)
    assert all(p not in opt.state for p in frozen)
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert len(opt.state) == 4
    assert [id(p) for p in m.parameters()] == ids_before
    train_step(m, opt, 1)  # training goes on with the rest
    assert not apply_freeze(m, opt, [0, 1], blocks=blocks)  # idempotent, reports no change


def test_unfreeze_returns_params_as_new_groups_with_the_right_lr():
    m = mlp()
    blocks = list(m.children())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in m.named_parameters() if n.endswith("weight")], "weight_decay": 0.05},
            {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    sched = Unfreeze(at=0.5, lr=3e-4, blocks=2).attach(m, opt, blocks=blocks)
    frozen = [p for b in blocks[:2] for p in b.parameters()]
    assert sched.frozen == [0, 1]
    assert all(id(p) not in in_optimizer(opt) for p in frozen)  # taken out at attach
    for step in range(4):
        train_step(m, opt, step)
        change = sched.step((step + 1) / 4)
        if step == 1:
            assert change.unfrozen == (0, 1)
    assert sched.frozen == []
    assert len(opt.param_groups) == 4
    new = opt.param_groups[2:]
    assert [g["lr"] for g in new] == [3e-4, 3e-4]
    assert [g["weight_decay"] for g in new] == [0.05, 0.0]  # hyperparameters of the group they left
    assert {id(p) for g in new for p in g["params"]} == {id(p) for p in frozen}
    assert all(p.requires_grad for p in frozen)
    assert [g["lr"] for g in opt.param_groups[:2]] == [1e-3, 1e-3]


def test_unfreeze_a_hand_frozen_backbone_like_lightning():
    m = mlp()
    blocks = list(m.children())
    for b in blocks[:3]:
        for p in b.parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD(blocks[3].parameters(), lr=0.1)  # only the head, as users do
    sched = Unfreeze(at=0.5, lr=0.01).attach(m, opt, blocks=blocks)
    assert sched.frozen == [0, 1, 2]
    sched.step(0.6)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    assert len(opt.param_groups[1]["params"]) == 6
    assert all(p.requires_grad for p in m.parameters())


def test_optimizer_can_be_attached_after_the_model():
    m = mlp()
    blocks = list(m.children())
    sched = Linear(0.0, 1.0).attach(m, blocks=blocks)  # model first (as wrap() does), optimizer later
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched.attach(optimizer=opt)
    sched.step(1.0)
    assert sched.frozen == [0, 1, 2]
    assert in_optimizer(opt) == {id(p) for p in blocks[3].parameters()}


def test_gradual_unfreezing_from_the_top():
    s = Unfreeze(at=[0.2, 0.4, 0.6], lr=[1e-3, 1e-4, 1e-5], blocks=[0, 1, 2, 3, 4])
    seq = [s.frozen_blocks(t, 8) for t in [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.9]]
    assert seq == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2], [0], [], []]
    assert s.unfreeze_lr() == 1e-5
    with pytest.raises(FreezeError, match="increasing"):
        Unfreeze(at=[0.5, 0.4])
    with pytest.raises(FreezeError, match="one per time"):
        Unfreeze(at=[0.2, 0.4], lr=[1e-3])


# ---------------------------------------------------------------------------------------------------------
# FreezeOut and GradientNorm


def test_freezeout_cutoffs_and_prefix():
    s = FreezeOut(t0=0.5, scale="linear")
    assert s.cutoffs(5) == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert s.frozen_blocks(0.49, 5) == []
    assert s.frozen_blocks(0.7, 5) == [0, 1]
    assert s.frozen_blocks(1.0, 5) == [0, 1, 2, 3]  # never the last
    c = FreezeOut(t0=0.8, scale="cubic").cutoffs(3)
    assert c == pytest.approx([0.512, 0.729, 1.0])
    assert FreezeOut(times=[0.3, 0.1]).frozen_blocks(0.2, 3) == [1]  # explicit, not necessarily a prefix
    with pytest.raises(FreezeError, match="cut-off times"):
        FreezeOut(times=[0.1]).frozen_blocks(0.5, 5)
    assert FreezeOut(t0=0.5, scale="linear").lr_factor(0, 0.25, 5) == pytest.approx(0.5)


def test_gradient_norm_freezes_the_right_prefix_on_a_constructed_history():
    s = GradientNorm(intervals=4, percentile=50)
    n = 5
    # Interval 1: the reference norms.
    for _ in range(3):
        s.observe([10.0, 10.0, 10.0, 10.0, 10.0])
    assert s.frozen_blocks(0.25, n) == []  # first boundary only records
    # Interval 2: blocks 0 and 1 have settled (rate 0.01, 0.02); 2..4 still move (0.5, 0.2, 0.7).
    for _ in range(3):
        s.observe([10.1, 10.2, 5.0, 8.0, 3.0])
    assert s.frozen_blocks(0.3, n) == []  # not at a boundary yet
    assert s.frozen_blocks(0.5, n) == [0, 1]  # median 0.2; first block with rate >= 0.2 is block 2
    assert s.rates == pytest.approx([0.01, 0.02, 0.5, 0.2, 0.7])
    # Interval 3: frozen blocks report None; block 2 settles, 3 and 4 move -> the prefix grows to 3.
    for _ in range(3):
        s.observe([None, None, 5.0, 4.0, 6.0])
    assert s.frozen_blocks(0.75, n) == [0, 1, 2]
    # A jump that would point at the last block never freezes it; depth never shrinks.
    for _ in range(3):
        s.observe([None, None, None, 4.0, 12.0])
    assert s.frozen_blocks(1.0, n) == [0, 1, 2, 3]
    s2 = GradientNorm(intervals=4)
    s2.load_state_dict({**s.state_dict(), "kind": "GradientNorm"})
    assert s2.frozen_blocks(1.0, n) == [0, 1, 2, 3]
    with pytest.raises(FreezeError, match="intervals"):
        GradientNorm(intervals=1)
    with pytest.raises(FreezeError, match="percentile"):
        GradientNorm(percentile=120)


def test_gradient_norm_reads_gradients_when_attached():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    s = GradientNorm(intervals=5, percentile=50).attach(m, opt, blocks=list(m.children()))
    for step in range(20):
        train_step(m, opt, step, sched=s)
        s.step((step + 1) / 20)
    assert s.frozen == list(range(len(s.frozen)))  # always a prefix
    assert len(s.frozen) <= 3
    assert s.rates is not None


# ---------------------------------------------------------------------------------------------------------
# checkpoint / resume


def _setup(opt_kind: str, seed: int):
    torch.manual_seed(seed)
    m = mlp()
    if opt_kind == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    sched = Unfreeze(at=0.75, lr=0.02, blocks=Linear(freeze_start=0.1, freeze_level=1.0))
    sched.attach(m, opt, blocks=list(m.children()))
    return m, opt, sched


TOTAL = 20


def _run(m, opt, sched, start, stop, trace=None):
    for step in range(start, stop):
        train_step(m, opt, step, sched)
        sched.step((step + 1) / TOTAL)
        if trace is not None:
            trace.append(sched.frozen)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("stop_at", [12, 17])  # between freezing and unfreezing; after unfreezing
def test_resume_mid_schedule_reproduces_the_uninterrupted_run_exactly(opt_kind, stop_at):
    m, opt, sched = _setup(opt_kind, seed=0)
    trace: list = []
    _run(m, opt, sched, 0, TOTAL, trace)
    assert [1] in [[len(t)] for t in trace] and trace[-1] == []  # it froze, then unfroze
    reference = [p.detach().clone() for p in m.parameters()]

    m1, opt1, sched1 = _setup(opt_kind, seed=0)
    _run(m1, opt1, sched1, 0, stop_at)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": opt1.state_dict(), "freeze": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    m2, opt2, sched2 = _setup(opt_kind, seed=123)  # fresh weights, fresh optimizer, fresh schedule
    m2.load_state_dict(ckpt["model"])
    sched2.load_state_dict(ckpt["freeze"])  # before the optimizer: rebuilds its groups
    opt2.load_state_dict(ckpt["opt"])
    assert sched2.frozen == sched1.frozen
    assert [len(g["params"]) for g in opt2.param_groups] == [len(g["params"]) for g in opt1.param_groups]
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt1.param_groups]
    _run(m2, opt2, sched2, stop_at, TOTAL)
    for a, b in zip(reference, m2.parameters()):
        assert torch.equal(a, b)


def test_state_loaded_before_attach_is_applied_at_attach():
    m1, opt1, sched1 = _setup("sgd", seed=0)
    _run(m1, opt1, sched1, 0, 12)
    state = sched1.state_dict()
    torch.manual_seed(1)
    m2 = mlp()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    s2 = Unfreeze(at=0.75, lr=0.02, blocks=Linear(freeze_start=0.1, freeze_level=1.0))
    s2.load_state_dict(state)
    s2.attach(m2, opt2, blocks=list(m2.children()))
    opt2.load_state_dict(opt1.state_dict())
    assert s2.frozen == sched1.frozen
    with pytest.raises(FreezeError, match="Linear"):
        Linear().load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# with the core's FrozenModel


def _wrap():
    return freezert.wrap


def test_schedule_drives_a_frozen_model():
    wrap = _wrap()
    torch.manual_seed(0)
    model = mlp(n_hidden=4)
    fm = wrap(model, freeze=None)
    opt = torch.optim.SGD(fm.parameters(), lr=0.05, momentum=0.9)
    sched = Unfreeze(at=0.8, lr=0.01, blocks=Linear(freeze_start=0.2, freeze_level=1.0)).attach(fm, opt)
    depths = []
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        F.mse_loss(fm(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step((step + 1) / 10)
        assert list(fm.frozen_indices) == sched.frozen
        frozen_ids = {id(p) for p in fm.frozen_parameters()}
        assert not frozen_ids & in_optimizer(opt)
        assert all(p not in opt.state for p in fm.frozen_parameters())
        depths.append(len(sched.frozen))
    assert max(depths) >= 2 and depths[-1] == 0
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    assert in_optimizer(opt) == {id(p) for p in model.parameters()}


def test_resume_a_frozen_model_mid_schedule_exactly():
    wrap = _wrap()

    def setup(seed):
        torch.manual_seed(seed)
        fm = wrap(mlp(n_hidden=4), freeze=None)
        opt = torch.optim.Adam(fm.parameters(), lr=1e-2)
        sched = Unfreeze(at=0.8, lr=3e-3, blocks=Linear(freeze_start=0.2, freeze_level=1.0)).attach(fm, opt)
        return fm, opt, sched

    def run(fm, opt, sched, start, stop):
        for step in range(start, stop):
            train_step(fm, opt, step)
            sched.step((step + 1) / 10)

    fm, opt, sched = setup(0)
    run(fm, opt, sched, 0, 10)
    fm1, opt1, sched1 = setup(0)
    run(fm1, opt1, sched1, 0, 6)
    assert sched1.frozen  # mid-schedule: something is frozen
    ckpt = {"model": fm1.state_dict(), "opt": opt1.state_dict(), "freeze": sched1.state_dict()}
    fm2, opt2, sched2 = setup(7)
    fm2.load_state_dict(ckpt["model"])
    sched2.load_state_dict(ckpt["freeze"])
    opt2.load_state_dict(ckpt["opt"])
    assert list(fm2.frozen_indices) == sched1.frozen
    run(fm2, opt2, sched2, 6, 10)
    for a, b in zip(fm.parameters(), fm2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_a_changing_frozen_set_matches_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    worker = os.path.join(HERE, "_ddp_schedule_worker.py")
    proc = subprocess.run(
        [sys.executable, worker, str(tmp_path), str(_free_port()), "rebuild"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_ddp_schedule_worker", worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref, ref_trace = mod.reference()
    assert [] in ref_trace and [0] in ref_trace and [0, 1] in ref_trace and ref_trace[-1] == []
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["error"] is None
        assert r["trace"] == ref_trace
        for k, v in ref.items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-6)
    for k in ref:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])  # ranks never drift apart


def test_lr_scheduler_learns_about_the_unfrozen_group():
    m = mlp()
    blocks = list(m.children())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    sched = Unfreeze(at=0.5, lr=0.02, blocks=1).attach(m, opt, blocks=blocks, lr_schedulers=lrs)
    for step in range(4):
        train_step(m, opt, step)
        lrs.step()
        sched.step((step + 1) / 4)
    # Unfrozen after step 1; the new group follows the same lambda on the scheduler's clock (4 steps).
    assert len(opt.param_groups) == 2
    assert lrs.base_lrs == [0.1, 0.02]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.02 * 0.5**4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def test_wrap_with_a_schedule_object_drives_the_segment():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(5)], nn.Linear(6, 2))
    fm = freezert.wrap(model, freeze=freezert.Linear(freeze_start=0.0, freeze_level=1.0))
    assert fm.schedule is not None and fm.frozen_indices == []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fm.schedule.attach(optimizer=opt)
    x = torch.randn(4, 6)
    fm(x).sum().backward()
    opt.step()
    change = fm.schedule.step(0.5)
    assert change and fm.frozen_indices == [0, 1]
    assert fm.prefix_length == 2
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in fm.frozen_parameters()}
    out = fm(x)  # the segment is rebuilt for the new depth
    assert torch.allclose(out, model(x), atol=1e-6)
    state = fm.freeze_state_dict()
    assert state["frozen"] == [0, 1] and "schedule" in state


# ---------------------------------------------------------------------------------------------------------
# the functional form: forward order by parameter use, first calls, checkpoints


class EncoderClassifier(nn.Module):
    """A real nn.TransformerEncoder (its out_proj runs without its forward) and a classifier head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_freeze_layers_orders_transformer_out_proj_by_use_and_keeps_the_head_trainable():
    m = EncoderClassifier()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    record_forward_order(m)
    m(torch.randn(2, 5, 8)).sum().backward()
    depth, _ = freeze_layers(m, opt, 1.0, freeze_start=0.0, freeze_level=1.0)
    assert depth == len(composer_layers(m, [])) - 1
    assert all(p.requires_grad for p in m.head.parameters())  # issue 9: the head was frozen, out_proj kept
    assert not any(p.requires_grad for p in m.encoder.layers[1].self_attn.out_proj.parameters())
    assert {id(p) for p in m.head.parameters()} <= in_optimizer(opt)


def test_freeze_layers_first_call_before_any_forward_freezes_now_in_composers_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.mid = nn.Linear(4, 4)
            self.stem = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))

    m = HeadFirst()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(freezert.FreezeWarning, match="registration order"):
        depth, _ = freeze_layers(m, opt, 0.6, freeze_start=0.0, freeze_level=1.0)
    assert depth == 1  # int(0.6 * 2): at the call, as Composer does, in Composer's order: the head first
    frozen = [not any(p.requires_grad for p in layer.parameters()) for layer in composer_layers(m, [])]
    assert frozen == [True, False, False]
    assert in_optimizer(opt) == {id(p) for p in [*m.mid.parameters(), *m.stem.parameters()]}
    m(torch.randn(2, 3))  # a forward: from now on layers count in forward order (stem, mid, head)
    depth, _ = freeze_layers(m, opt, 1.0, freeze_start=0.0, freeze_level=1.0)
    assert depth == 2
    assert not any(p.requires_grad for p in [*m.stem.parameters(), *m.mid.parameters()])
    assert not any(p.requires_grad for p in m.head.parameters())  # the frozen set never shrinks
    assert in_optimizer(opt) == set()


def test_freeze_layers_after_a_forward_freezes_at_the_call_in_forward_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.stem = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x)))

    m = HeadFirst()
    record_forward_order(m)
    m(torch.randn(2, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert freeze_layers(m, opt, 1.0, freeze_start=0.0)[0] == 1
    assert not m.stem.weight.requires_grad and m.head.weight.requires_grad
    assert in_optimizer(opt) == {id(p) for p in m.head.parameters()}


def test_freeze_layers_state_resumes_into_a_new_model_object():
    torch.manual_seed(1)
    a = EncoderClassifier()
    b = EncoderClassifier()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    x = torch.randn(2, 5, 8)
    record_forward_order(a)
    a(x)
    freeze_layers(a, opt_a, 0.7, freeze_start=0.5, freeze_level=1.0)
    state = freeze_layers_state_dict(a)
    opt_sd = opt_a.state_dict()
    # resume: a new model object and a new optimizer over all parameters
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    load_freeze_layers_state_dict(b, state, opt_b)
    # the resumed model has the saved layers frozen at once, before any forward or call
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    assert not all(p.requires_grad for p in b.parameters())
    opt_b.load_state_dict(opt_sd)  # group sizes match: frozen parameters already left opt_b
    for t in [0.8, 1.0]:
        da, _ = freeze_layers(a, opt_a, t, freeze_start=0.5, freeze_level=1.0)
        db, _ = freeze_layers(b, opt_b, t, freeze_start=0.5, freeze_level=1.0)
        assert da == db
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    assert all(p.requires_grad for p in b.head.parameters())
    with pytest.raises(FreezeError, match="freeze_layers_state_dict"):
        load_freeze_layers_state_dict(b, {"depth": 3})


# ---------------------------------------------------------------------------------------------------------
# trainer-facing gaps (issue 11): BatchNorm in frozen blocks, re-binding, thawing hand-frozen blocks


def bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU()),
        nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU()),
        nn.Linear(6, 2),
    )


@pytest.mark.parametrize("train_bn", [False, True])
def test_schedule_on_a_plain_model_fixes_frozen_batchnorm_unless_train_bn(train_bn):
    model = bn_net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Linear(0.0, 1.0).attach(model, opt, blocks=list(model), train_bn=train_bn)
    sched.step(0.6)  # int(0.6 * 2) = 1 block frozen
    bn0, bn1 = model[0][1], model[1][1]
    stats = bn0.running_mean.clone()
    model.train()  # what every trainer does at each epoch start
    train_step(model, opt, 0)
    assert torch.equal(bn0.running_mean, stats) != train_bn
    assert bn0.weight.requires_grad == train_bn and (id(bn0.weight) in in_optimizer(opt)) == train_bn
    assert not model[0][0].weight.requires_grad
    assert bn1.training and model[0][1].training == train_bn
    apply_freeze(model, opt, [], blocks=list(model))  # thawed: back to the model's mode, statistics move
    train_step(model, opt, 1)
    assert bn0.training and not torch.equal(bn0.running_mean, stats)


def test_a_schedule_rebinds_to_a_new_fits_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Linear(0.0, 1.0).attach(model, opt, blocks=list(model))
    sched.step(0.7)
    assert sched.frozen == [0, 1]
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)  # a new fit builds its optimizer over everything
    sched.attach(optimizer=opt2)
    frozen = {id(p) for i in (0, 1) for p in model[i].parameters()}
    assert not frozen & in_optimizer(opt2)
    sched.step(1.0)
    assert sched.frozen == [0, 1, 2] and not {id(p) for p in model[2].parameters()} & in_optimizer(opt2)


def test_apply_freeze_empty_thaws_blocks_frozen_by_hand():
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    change = apply_freeze(model, opt, [], blocks=list(model), lr=0.01)
    assert change.unfrozen == (0,)
    assert all(p.requires_grad for p in model.parameters())
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    assert {id(p) for p in model[0].parameters()} == {id(p) for p in opt.param_groups[1]["params"]}


def test_a_parameter_never_in_the_optimizer_joins_the_group_of_its_kind():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)) for _ in range(3)])
    model[0].requires_grad_(False)  # frozen before the optimizer was built, as a Trainer would see it
    decay = [m[0].weight for m in model[1:]]
    no_decay = [p for m in model[1:] for p in (m[0].bias, *m[1].parameters())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    apply_freeze(model, opt, [], blocks=list(model))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert opt.param_groups[2]["params"] == [model[0][0].weight]
    assert {id(p) for p in opt.param_groups[3]["params"]} == {id(model[0][0].bias), *map(id, model[0][1].parameters())}


def test_freeze_layers_in_a_resumed_process_without_state_freezes_composers_layers_at_the_first_call():
    """Composer's functional form has no state: a resumed run calls it again at the current duration. freezert
    freezes at that first call too, in Composer's order (a registration-ordered model gets Composer's layers)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(freezert.FreezeWarning):
        depth, pct = freeze_layers(model, opt, 0.9, freeze_start=0.5, freeze_level=1.0)
    layers = composer_layers(model, [])
    assert depth == int(composer_schedule(0.9, 0.5, 1.0) * (len(layers) - 1)) == 1
    assert [all(p.requires_grad for p in m.parameters()) for m in layers] == [False, True, True]
    assert in_optimizer(opt) == {id(p) for m in layers[1:] for p in m.parameters()}


# ---------------------------------------------------------------------------------------------------------
# the Freezable protocol and freezing every block


def test_a_frozen_model_is_freezable_and_a_plain_module_is_not():
    from freezert.schedule import Freezable

    model = mlp()
    assert not isinstance(model, Freezable)
    fm = freezert.wrap(model, freeze=1)
    assert isinstance(fm, Freezable)
    fm.unwrap()


def test_every_block_may_be_frozen_when_a_head_outside_the_blocks_trains():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.body(x))

    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    change = apply_freeze(model, opt, [0, 1], blocks=list(model.body))  # a linear probe, as wrap(freeze=N) allows
    assert change.frozen == (0, 1) and in_optimizer(opt) == {id(p) for p in model.head.parameters()}
    with pytest.raises(FreezeError, match="nothing to"):
        apply_freeze(model.body, None, [0, 1], blocks=list(model.body))  # the body alone: nothing left to train
    sched = Unfreeze(at=0.5, blocks=2).attach(model, opt, blocks=list(model.body))
    assert sched.frozen == [0, 1]
    sched.step(0.5)
    assert sched.frozen == [] and all(p.requires_grad for p in model.parameters())
    with pytest.raises(FreezeError, match="past the end"):
        Unfreeze(at=0.5, blocks=3).attach(model, opt, blocks=list(model.body))
