"""plan_substitutions / swapped: same parameters, buffers and keys; same outputs; restored after."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from freezert.ops import FusedConvBNAct, FusedLayerNorm, backend, plan_substitutions, swapped
from freezert.ops import _registry as reg

from ._ops_util import _poison, needs_interpreter  # noqa: F401 (_poison is an autouse fixture)


class ConvBlock(nn.Module):
    """The YOLOv5 ``Conv`` block: act(bn(conv(x)))."""

    def __init__(self, c1, c2, act, k=3, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, momentum=momentum)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Tiny(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.stem = ConvBlock(3, 5, nn.SiLU(), momentum=momentum)
        self.body = nn.Sequential(nn.Conv2d(5, 19, 3, padding=1, bias=False), nn.BatchNorm2d(19), nn.ReLU())
        self.mid = ConvBlock(19, 7, nn.Identity(), k=1)
        self.leaky = ConvBlock(7, 7, nn.LeakyReLU(0.1), k=1)  # not fusable: stays as is
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        x = self.leaky(self.mid(self.body(self.stem(x))))
        return self.head(self.norm(x.mean((2, 3))))


def perturb_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def test_plan_finds_blocks_and_leaves_module_alone():
    model = Tiny()
    before = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict())
    plan = plan_substitutions(model)
    names = [n for n, _ in plan]
    assert names == ["stem", "body", "mid", "norm"]
    kinds = dict(plan)
    assert isinstance(kinds["stem"], FusedConvBNAct) and isinstance(kinds["body"], FusedConvBNAct)
    assert isinstance(kinds["norm"], FusedLayerNorm)
    assert {n: m for n, m in model.named_modules()} == before
    assert list(model.state_dict()) == keys
    assert [n for n, _ in plan_substitutions(model, skip=lambda n: n in ("stem", "norm"))] == ["body", "mid"]


def test_plan_skips_hooked_and_odd_modules():
    model = Tiny()
    model.stem.register_forward_hook(lambda *a: None)  # a replacement would drop the hook
    model.body = nn.Sequential(nn.Conv2d(5, 19, 3, padding=1), nn.BatchNorm2d(19), nn.Identity())
    assert [n for n, _ in plan_substitutions(model)] == ["mid", "norm"]


def test_swapped_keeps_identity_and_matches_eager():
    needs_interpreter()
    model = Tiny()
    perturb_bn(model)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    originals = {n: model.get_submodule(n) for n in ("stem", "body", "mid", "norm")}
    x = torch.randn(3, 3, 7, 9)
    plan = plan_substitutions(model)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        eager.train(mode == "train")
        with swapped(model, plan) as m:
            assert m is model and type(model.stem) is FusedConvBNAct and type(model.norm) is FusedLayerNorm
            assert list(model.state_dict()) == keys
            assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(
                list(model.parameters())
            )
            assert all(b is buffers[n] for n, b in model.named_buffers())
            y = model(x)
            assert backend()["batch_norm_act"] == reg.INTERPRETER
            assert backend()["layer_norm"] == reg.INTERPRETER
        y_ref = eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
        for (n, b), c in zip(model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert list(model.state_dict()) == keys


def test_swapped_restores_on_error():
    model = Tiny()
    stem = model.stem
    with pytest.raises(RuntimeError, match="boom"):
        with swapped(model, plan_substitutions(model)):
            raise RuntimeError("boom")
    assert model.stem is stem


def test_cumulative_average_momentum_none():
    needs_interpreter()
    model = Tiny(momentum=None)
    eager = copy.deepcopy(model)
    plan = plan_substitutions(model)
    for _ in range(2):
        x = torch.randn(3, 3, 7, 9)
        with swapped(model, plan):
            model(x)
        eager(x)
    torch.testing.assert_close(model.stem.bn.running_mean, eager.stem.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.stem.bn.running_var, eager.stem.bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(model.stem.bn.num_batches_tracked) == 2


def test_yolo_layers_keep_their_tags():
    """Replacing a top-level YOLO layer keeps the .f / .i attributes the model's forward reads."""
    yolo = pytest.importorskip("freezert.models.yolo")
    model = yolo.yolov5("n", nc=3).eval()
    plan = plan_substitutions(model.model, skip=lambda n: int(n.split(".")[0]) < 21)
    assert plan and all(int(n.split(".")[0]) >= 21 for n, _ in plan)
    top = [rep for n, rep in plan if "." not in n]
    assert top and all(hasattr(rep, "f") and hasattr(rep, "i") for rep in top)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with swapped(model.model, plan):
            out = model(x)
    for a, b in zip(out if isinstance(out, (list, tuple)) else [out], ref if isinstance(ref, (list, tuple)) else [ref]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class Stack(nn.Module):
    """A small YOLO-like stack of Conv blocks with a 1x1 prediction conv."""

    def __init__(self):
        super().__init__()
        chans = [3, 16, 32, 32, 48]
        self.blocks = nn.Sequential(*[ConvBlock(a, b, nn.SiLU()) for a, b in zip(chans, chans[1:])])
        self.pred = nn.Conv2d(48, 7, 1)

    def forward(self, x):
        return self.pred(self.blocks(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_curve_matches_eager_cuda(dtype):
    if reg.interpreting():
        pytest.skip("the Triton interpreter is on: run CUDA tests with TRITON_INTERPRET=0")
    torch.manual_seed(0)
    base = Stack().cuda().to(memory_format=torch.channels_last)
    curves = []
    for substitute in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        plan = plan_substitutions(model) if substitute else []
        gen = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        for _ in range(30):
            x = torch.randn(8, 3, 33, 31, device="cuda", generator=gen).to(memory_format=torch.channels_last)
            target = torch.randn(8, 7, 33, 31, device="cuda", generator=gen)
            with swapped(model, plan), torch.autocast("cuda", dtype=dtype):
                loss = (model(x).float() - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if substitute:
            assert backend()["batch_norm_act"] == reg.TRITON
        curves.append(torch.tensor(losses))
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(curves[1], curves[0], rtol=tol, atol=tol)


def test_triton_path_stores_activations_as_recipes():
    """The next conv's saved input becomes a recipe over the fused block's own saved input: fewer bytes,
    gradients as eager's (the recipe reruns the same kernel, so the recomputed input is bit-identical)."""
    needs_interpreter()
    from freezert.memory import saved_bytes

    torch.manual_seed(0)
    model = Stack()
    eager = copy.deepcopy(model)
    plan = plan_substitutions(model)
    x = torch.randn(2, 3, 9, 11)
    params = [*model.parameters(), *model.buffers(), *eager.parameters(), *eager.buffers()]

    def fused():
        with swapped(model, plan):
            model(x).square().mean().backward()

    ours = saved_bytes(fused, exclude=params)
    assert backend()["batch_norm_act"] == reg.INTERPRETER
    base = saved_bytes(lambda: eager(x).square().mean().backward(), exclude=params)
    assert ours <= 0.5 * base, (ours, base)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
