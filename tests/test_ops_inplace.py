"""In-place edits of lean outputs: a program eager rejects is rejected with eager's error; a program eager runs gives
eager's gradients bit for bit. PyTorch skips its own in-place check for tensors that pass through saved-tensor
hooks; the lean hooks check instead (and a recipe rebuilt from its inputs never hides an edit)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from freezert.ops import _exact, lean_plan, swapped

INPLACE = "modified by an inplace operation"

OPS = {
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "layer_norm": lambda: nn.LayerNorm(8),
    "layer_norm+silu": lambda: nn.Sequential(nn.LayerNorm(8), nn.SiLU()),
    "bn+relu": lambda: nn.Sequential(nn.BatchNorm1d(8), nn.ReLU()),
    "bn+relu_inplace": lambda: nn.Sequential(nn.BatchNorm1d(8), nn.ReLU(inplace=True)),
    "bn+silu": lambda: nn.Sequential(nn.BatchNorm1d(8), nn.SiLU()),
}
EDITS = ["whole", "view", "setitem"]


class Net(nn.Module):
    """``a = op(lin0(x))``, edited in place before or after ``lin`` saves it."""

    def __init__(self, op: nn.Module, edit: str, when: str):
        super().__init__()
        self.lin0, self.op, self.lin = nn.Linear(8, 8), op, nn.Linear(8, 4)
        self.edit, self.when = edit, when

    def forward(self, x):
        a = self.op(self.lin0(x))
        if self.when == "before":
            self.write(a)
        y = self.lin(a)
        if self.when == "after":
            self.write(a)
        return y

    def write(self, a):
        if self.edit == "whole":
            a.mul_(2.0)
        elif self.edit == "view":
            a[:, :3].add_(1.0)  # an in-place op on a view of the saved tensor
        else:
            a[0] = 0.5


def _pair(op: str, edit: str, when: str):
    """The block under a root (as a model's blocks are): the lean plan's regions are the root's children."""
    torch.manual_seed(0)
    eager = nn.Sequential(Net(OPS[op](), edit, when)).double().train()
    lean = copy.deepcopy(eager)
    return eager, lean, lean_plan(lean)


def _run(model, x, plan=None):
    if plan is None:
        return model(x).square().sum().backward()
    with swapped(model, plan):
        y = model(x)
    y.square().sum().backward()


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("op", list(OPS))
def test_lean_fails_where_eager_fails_and_matches_it_elsewhere(op, edit, when):
    """Edited after ``lin`` saved it: eager raises, and so does lean. Edited before: eager runs (except where the
    op keeps its own output, ReLU's), and lean gives its gradients and statistics bit for bit."""
    eager, lean, plan = _pair(op, edit, when)
    x = torch.randn(5, 8, dtype=torch.float64)
    try:
        _run(eager, x)
    except RuntimeError as e:
        assert INPLACE in str(e)
        with pytest.raises(RuntimeError, match=INPLACE):
            _run(lean, x, plan)
        assert when == "after" or "relu" in op
        return
    assert when == "before"
    _run(lean, x, plan)
    for (name, a), b in zip(lean.named_parameters(), eager.parameters()):
        assert _exact.same_bits(a.grad, b.grad), name
    for a, b in zip(lean.buffers(), eager.buffers()):
        assert _exact.same_bits(a, b)


def test_edit_of_a_returned_output_after_forward_raises():
    """The model hands a lean output to the caller, who edits it before backward: eager's error."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.act, self.lin = nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 4)

        def forward(self, x):
            a = self.act(self.lin0(x))
            return self.lin(a), a

    torch.manual_seed(0)
    model = nn.Sequential(Two()).double()
    plan = lean_plan(model)
    x = torch.randn(5, 8, dtype=torch.float64)
    with swapped(model, plan):
        y, a = model(x)
    a.add_(1.0)
    with pytest.raises(RuntimeError, match=INPLACE):
        y.sum().backward()


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.act, self.lin = nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 4)
        # an edit the region cannot see coming: a callable held by the instance, the method named at run time
        self.editor = lambda t: getattr(t, "mul_")(3.0)  # noqa: B009 (a name the scan must not see)

    def forward(self, x):
        a = self.act(self.lin0(x))
        y = self.lin(a)
        self.editor(a)
        return y


def test_unseen_edit_of_a_dead_tensor_recomputes_correctly():
    """An edit no region saw (the regions watch each trainable module's own forward code, its methods and the
    module-level functions it calls), on a tensor gone by backward: the recipe rebuilds the value the saving op
    read, so the gradient is that of the forward as it ran (eager would raise); never one of the edited value."""
    torch.manual_seed(0)
    model = nn.Sequential(Hidden()).double()
    ref = copy.deepcopy(model)[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    with swapped(model, lean_plan(model)):
        y = model(x)
    y.square().sum().backward()
    ref.lin(ref.act(ref.lin0(x))).square().sum().backward()  # the same forward without the (later) edit
    for a, b in zip(model.parameters(), ref.parameters()):
        assert _exact.same_bits(a.grad, b.grad)


def test_a_hook_on_a_lean_convolution_that_edits_its_input_raises_like_eager():
    """A forward hook on the convolution of a Conv-BN-act layer edits the layer's input (the previous layer's
    output, a recipe) after the convolution saved it, and the tensor is gone by backward: eager raises, so the lean
    path must too. (The layer takes the region's mode off the stack while it runs, except when its convolution has
    hooks: their code must be watched.)"""

    def layer(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.SiLU())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = layer(3, 4), layer(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) * 2  # arithmetic: the block is a routing region

    torch.manual_seed(0)
    eager = nn.Sequential(Block()).double()
    lean = copy.deepcopy(eager)

    def edit(module, args, output) -> None:
        args[0].mul_(1.5)

    for model in (eager, lean):
        model[0].b[0].register_forward_hook(edit)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        eager(x).sum().backward()
    plan = lean_plan(lean)
    with swapped(lean, plan):
        out = lean(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("act", [True, False], ids=["bn+silu", "bn"])
def test_a_batchnorm_bias_written_between_forward_and_backward_is_refused(act):
    """A lean BN's output is rebuilt in backward from its input, statistics and bias; eager's backward does not read
    the bias, so eager accepts a bias written in place before backward (an optimizer step taken too early) and the
    lean path cannot rebuild the value the forward made: it refuses with eager's in-place wording, never folding the
    new bias in silently. Unwritten, the same program gives eager's gradients bit for bit."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)] + ([nn.SiLU()] if act else [])
        return nn.Sequential(nn.Sequential(*layers, nn.Conv2d(4, 2, 1))).double().train()

    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for write in (False, True):
        eager, lean = model(), model()
        plan = lean_plan(lean)
        eager(x).square().sum().backward()
        with swapped(lean, plan):
            out = lean(x)
        if write:
            with torch.no_grad():
                lean[0][1].bias.add_(0.5)
            with pytest.raises(RuntimeError, match="bias .* written in place between the forward and the backward"):
                out.square().sum().backward()
        else:
            out.square().sum().backward()
            for a, b in zip(lean.parameters(), eager.parameters()):
                assert _exact.same_bits(a.grad, b.grad)
