"""The lean ops one by one: eager's values, gradients and running statistics bit for bit; recipes rebuild exactly."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freezert import FreezeError
from freezert.memory import saved_bytes
from freezert.ops import (
    _exact,
    activation,
    activation_,
    activation_reference,
    backend,
    batch_norm_act,
    batch_norm_act_lean,
    batch_norm_act_reference,
    batch_norm_lean,
    dropout_lean,
    elementwise,
    layer_norm,
    layer_norm_lean,
    recompute_saved,
    rms_norm_lean,
    rms_norm_reference,
)
from freezert.ops import _registry as reg
from freezert.ops.recompute import fresh_recipe

from ._ops_util import _poison  # noqa: F401 (an autouse fixture)

SHAPES = [(3, 19, 7, 9), (5, 7), (2, 3, 11), (2, 5, 3, 4, 3), (4, 6, 1, 1)]
DTYPES = [torch.float64, torch.float32]


@pytest.fixture
def _nan_uninitialized():
    """Plain torch has no kernel buffers to poison: make every uninitialised allocation NaN instead."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def same(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    """Bit for bit (NaNs included), with the largest difference in the message when not."""
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert _exact.same_bits(a, b), f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}"


def same_grads_and_buffers(model: nn.Module, ref: nn.Module) -> None:
    """Every parameter's gradient and every buffer of ``model`` equal ``ref``'s bit for bit."""
    for a, b in zip(model.parameters(), ref.parameters()):
        same(a.grad, b.grad, "grad")
    for a, b in zip(model.buffers(), ref.buffers()):
        same(a, b, "buffer")


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # neither contiguous nor channels_last
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    return x


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_lean_is_eager_bit_for_bit(dtype, shape, training, layout, affine):
    c = shape[1]
    x = _layout(torch.randn(shape, dtype=dtype) * 2 + 0.5, layout)
    w, b = (torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)) if affine else (None, None)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    xl, wl, bl = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    rml, rvl, rmr, rvr = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    g = torch.randn(shape, dtype=dtype)
    with recompute_saved():
        y = batch_norm_lean(xl, rml, rvl, wl, bl, training, 0.1, 1e-5)
        # a later op saving y keeps the recipe: rebuilt from the saved statistics, exactly the forward's value
        out = y * 1.5
    assert backend()["batch_norm"] == reg.LEAN
    yr = F.batch_norm(xr, rmr, rvr, wr, br, training, 0.1, 1e-5)
    (yr * 1.5).backward(g)
    out.backward(g)
    same(y, yr, "output")
    for name, a, r in (("input", xl, xr), ("weight", wl, wr), ("bias", bl, br)):
        same(None if a is None else a.grad, None if r is None else r.grad, f"grad {name}")
    same(rml, rmr, "running_mean")
    same(rvl, rvr, "running_var")


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype,params", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)], ids=str)
def test_batch_norm_lean_half_inputs(dtype, params):
    """fp16 input with fp32 parameters (autocast's mix) and bf16 throughout (no exact shortcut: statistics pass)."""
    x = (torch.randn(4, 6, 5, 3) * 2).to(dtype)
    w, b = torch.randn(6, dtype=params), torch.randn(6, dtype=params)
    xl, wl, bl = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    with recompute_saved():
        out = batch_norm_lean(xl, None, None, wl, bl, True) * 2
    yr = F.batch_norm(xr, None, None, wr, br, True) * 2
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    yr.backward(g)
    same(out, yr, "output")
    for name, a, r in (("input", xl, xr), ("weight", wl, wr), ("bias", bl, br)):
        same(a.grad, r.grad, f"grad {name}")


def test_batch_norm_rebuild_probe_picks_an_exact_formula_or_none():
    """The CPU eval-kernel shortcut is exact for contiguous / channels_last inputs with fp32 statistics and
    parameters; bf16 parameters round the scale, so the statistics are recomputed instead (exact again)."""
    bn = sys_module("batch_norm_lean")
    x = torch.randn(2, 4, 3, 3)
    assert bn._rebuild_how(x, torch.ones(4), torch.zeros(4), 1e-5) == "eval_alpha"
    assert bn._rebuild_how(x.bfloat16(), torch.ones(4).bfloat16(), None, 1e-5) == "stats"


def sys_module(name: str):
    import sys

    return sys.modules[f"freezert.ops.{name}"]


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 19, 7, 9), (5, 7), (2, 5, 3, 4, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["silu", "relu", "gelu", "gelu_tanh", "hardswish", "identity"])
def test_batch_norm_act_lean_is_eager_bit_for_bit(dtype, shape, training, act):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    xl, wl, bl = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    rml, rvl, rmr, rvr = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = batch_norm_act_lean(xl, rml, rvl, wl, bl, training, 0.1, 1e-5, act)
    assert backend()["batch_norm_act"] == reg.LEAN
    yr = batch_norm_act_reference(xr, rmr, rvr, wr, br, training, 0.1, 1e-5, act)
    g = torch.randn(shape, dtype=dtype)
    y.backward(g)
    yr.backward(g)
    same(y, yr, "output")
    for name, a, r in (("input", xl, xr), ("weight", wl, wr), ("bias", bl, br)):
        same(a.grad, r.grad, f"grad {name}")
    same(rml, rmr, "running_mean")
    same(rvl, rvr, "running_var")


def test_batch_norm_act_lean_saves_input_and_stats_only():
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    big = saved_bytes(lambda: batch_norm_act_lean(x, None, None, w, b, True), exclude=[w, b])
    eager = saved_bytes(lambda: batch_norm_act_reference(x, None, None, w, b, True), exclude=[w, b])
    assert big == x.numel() * 4 + 2 * 8 * 4  # the input and fp32 (mean, invstd)
    assert eager >= 2 * x.numel() * 4  # eager keeps the BN output for SiLU too


def test_impl_auto_is_lean_off_cuda_and_refuses_unknown():
    x = torch.randn(3, 4, 5, 5)
    batch_norm_act(x, None, None, training=True, impl="auto")
    layer_norm(torch.randn(3, 5), 5, impl="auto")
    assert backend()["batch_norm_act"] == reg.LEAN and backend()["layer_norm"] == reg.LEAN
    with pytest.raises(FreezeError, match="impl='fast'"):
        batch_norm_act(x, None, None, training=True, impl="fast")
    with pytest.raises(FreezeError, match="activation='tanh'"):
        batch_norm_act_lean(x, None, None, training=True, activation="tanh")


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,norm", [((7, 13), (13,)), ((2, 5, 3, 11), (3, 11)), ((4, 3), (3,))], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_lean_is_eager_bit_for_bit(dtype, shape, norm, affine):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    w = torch.randn(norm, dtype=dtype) if affine else None
    b = torch.randn(norm, dtype=dtype) if affine else None
    xl, wl, bl = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    with recompute_saved():
        y = layer_norm_lean(xl, norm, wl, bl, 1e-5)
        out = y.square()  # saves y: a recipe
    yr = F.layer_norm(xr, norm, wr, br, 1e-5)
    g = torch.randn(shape, dtype=dtype)
    out.backward(g)
    yr.square().backward(g)
    same(y, yr, "output")
    same(xl.grad, xr.grad, "grad input")
    if affine:
        same(wl.grad, wr.grad, "grad weight")
        same(bl.grad, br.grad, "grad bias")


ACTS = ["silu", "relu", "relu6", "hardswish", "gelu", "gelu_tanh", "identity"]


def _kinks(dtype):
    x = torch.randn(5, 17, dtype=dtype) * 4
    x[0, :6] = torch.tensor([-3.0, 3.0, 0.0, 6.0, -2.5, 5.5], dtype=dtype)  # relu6 / hardswish / relu kinks
    x[1, 0] = float("nan")
    return x


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ACTS)
def test_activation_is_eager_bit_for_bit(dtype, name):
    x = _kinks(dtype)
    xl, xr = _leaves(x, x)
    with recompute_saved():
        y = activation(xl, name)
        out = y * y  # saves y twice: one recipe, rebuilt once
    yr = activation_reference(xr, name)
    g = torch.randn(5, 17, dtype=dtype)
    out.backward(g)
    (yr * yr).backward(g)
    assert backend()["activation"] == reg.LEAN
    same(y, yr, "output")
    same(xl.grad, xr.grad, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["silu", "relu", "relu6", "hardswish"])
def test_in_place_activation_on_a_recipe_keeps_nothing_and_is_eager(dtype, name):
    """``act_(bn(x))`` then a save: eager keeps the BN input and a copy (or the output); lean only the BN input."""
    x = torch.randn(4, 3, 5, 5, dtype=dtype) * 2
    xl, xr = _leaves(x, x)
    w = torch.randn(3, 3, 1, 1, dtype=dtype, requires_grad=True)
    wr = w.detach().clone().requires_grad_()
    inplace = {"silu": lambda z: F.silu(z, inplace=True), "relu": torch.relu_}
    inplace |= {"relu6": lambda z: F.relu6(z, inplace=True), "hardswish": lambda z: F.hardswish(z, inplace=True)}

    def lean():
        with recompute_saved():
            z = batch_norm_lean(xl, None, None, None, None, True)
            a = activation_(z, name)
            assert a is z and fresh_recipe(a)[0] is not None
            F.conv2d(a, w).square().sum().backward()

    n = saved_bytes(lean, exclude=[w])
    F.conv2d(inplace[name](F.batch_norm(xr, None, None, None, None, True)), wr).square().sum().backward()
    same(xl.grad, xr.grad, "grad input")
    same(w.grad, wr.grad, "grad weight")
    el = x.element_size()
    # the BN input and its statistics, the conv output (square's input): no activation kept
    assert n == x.numel() * el + 2 * 3 * el + 4 * 3 * 25 * el


def test_in_place_activation_without_a_recipe_is_eager_itself():
    z = torch.randn(6, requires_grad=True) * 1.0
    out = activation_(z, "relu")
    assert out is z and type(z.grad_fn).__name__ == "ReluBackward0"
    with pytest.raises(FreezeError, match="gelu"):
        activation_(z, "gelu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_dropout_lean_draws_like_eager_and_keeps_a_mask(dtype):
    x = torch.randn(64, 33, dtype=dtype)
    xl, xr = _leaves(x, x)
    torch.manual_seed(3)
    with recompute_saved():
        y = dropout_lean(xl, 0.3)
        out = y.square()
    torch.manual_seed(3)
    yr = F.dropout(xr, 0.3, True)
    g = torch.randn(64, 33, dtype=dtype)
    out.backward(g)
    yr.square().backward(g)
    same(y, yr, "output")
    same(xl.grad, xr.grad, "grad")
    kept = saved_bytes(lambda: dropout_lean(xl, 0.3))
    assert kept == 64 * 33  # a bool mask; eager keeps the noise in the input's dtype
    with pytest.raises(ValueError, match="p=1.0"):
        dropout_lean(xl, 1.0)


def _new_gelu(x):  # transformers' NewGELUActivation (GPT-2's gelu_new), verbatim
    import math

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elementwise_formula_is_eager_bit_for_bit_and_keeps_the_input_only(dtype):
    x = torch.randn(6, 40, dtype=dtype) * 3
    xl, xr = _leaves(x, x)
    w = torch.randn(40, 5, dtype=dtype, requires_grad=True)
    with recompute_saved():
        y = elementwise(xl @ torch.eye(40, dtype=dtype), _new_gelu)
        out = y @ w
    yr = _new_gelu(xr @ torch.eye(40, dtype=dtype))
    g = torch.randn(6, 5, dtype=dtype)
    out.backward(g)
    wr = w.detach().clone().requires_grad_()
    (yr @ wr).backward(g)
    same(y, yr, "output")
    same(xl.grad, xr.grad, "grad")
    same(w.grad, wr.grad, "grad weight")
    n = saved_bytes(lambda: elementwise(xl * 1.0, _new_gelu))
    assert n == x.numel() * x.element_size()  # eager keeps the input, its cube, the tanh and two products


@pytest.mark.usefixtures("_nan_uninitialized")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 33), (3, 1)], ids=str)
def test_rms_norm_lean_is_llama_bit_for_bit(dtype, shape):
    """Llama's formula (float32 inside, whatever the input), and a float32 input read twice: exact all the same."""
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    w = torch.randn(shape[-1], dtype=dtype)
    xl, wl = _leaves(x, w)
    xr, wr = _leaves(x, w)
    with recompute_saved():
        y = rms_norm_lean(xl * 1.0, wl, 1e-6)
        out = (y * y).sum() + (xl * 1.0).sum()  # the input also feeds another op (a residual's pattern)
    yr = rms_norm_reference(xr * 1.0, wr, 1e-6)
    ref = (yr * yr).sum() + (xr * 1.0).sum()
    out.backward()
    ref.backward()
    assert backend()["rms_norm"] == reg.LEAN
    same(y, yr, "output")
    same(xl.grad, xr.grad, "grad input")
    same(wl.grad, wr.grad, "grad weight")


def test_lean_functions_compile_without_graph_breaks():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(3, requires_grad=True)

    def f(x, w):
        y = batch_norm_act_lean(x, None, None, w, None, True, 0.1, 1e-5, "silu")
        y = batch_norm_lean(y, None, None, w, None, True, 0.1, 1e-5)
        return layer_norm_lean(activation(y, "gelu"), (4,), None, None).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_a_view_of_a_marked_output_is_a_recipe_too():
    """GPT-2's Conv1D saves ``x.view(-1, d)`` of the LayerNorm output: the view is rebuilt from the recipe."""
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(8, 6, requires_grad=True)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

    def lean():
        with recompute_saved():
            y = layer_norm_lean(x, 8)
            torch.addmm(torch.zeros(6), y.view(-1, 8), w).square().sum().backward()

    ours = saved_bytes(lean, exclude=[w])
    torch.addmm(torch.zeros(6), F.layer_norm(xr, (8,)).view(-1, 8), wr).square().sum().backward()
    # the input, per-row (mean, rstd) and the square's input (15 x 6); not the LayerNorm output
    assert ours == x.numel() * 4 + 2 * 15 * 4 + 15 * 6 * 4
    same(x.grad, xr.grad, "grad input")
    same(w.grad, wr.grad, "grad weight")


def test_outer_hooks_see_the_recipe_arguments_and_results_are_exact():
    """save_on_cpu around the lean ops: recipe arguments and plain saves go through it; the gradients are eager's."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    xl, xr = _leaves(x, x)
    with torch.autograd.graph.save_on_cpu(), recompute_saved():
        out = F.conv2d(activation(batch_norm_lean(xl, None, None, None, None, True), "silu"), w)
    out.square().sum().backward()
    gw = w.grad.clone()
    w.grad = None
    F.conv2d(F.silu(F.batch_norm(xr, None, None, None, None, True)), w).square().sum().backward()
    same(xl.grad, xr.grad, "grad input")
    same(gw, w.grad, "grad weight")


def test_recipe_chains_stop_at_max_depth():
    """A residual stream of recipes stops growing after MAX_DEPTH steps: that tensor is saved as it is."""
    rc = sys_module("recompute")
    x = torch.randn(8, requires_grad=True)
    with recompute_saved():
        y = activation(x * 1.0, "relu")
        depths = []
        for _ in range(rc.MAX_DEPTH + 2):
            y = y + 1.0 if fresh_recipe(y)[0] is None else _add_marked(y)
            r = fresh_recipe(y)[0]
            depths.append(None if r is None else r.depth)
    assert max(d for d in depths if d is not None) == rc.MAX_DEPTH and None in depths


def test_a_batchnorm_recipe_reads_its_node_and_counts_the_depth_of_its_input():
    """A lean BatchNorm output's recipe holds no argument: it reads its node's saves. Its depth is its input's
    plus one when that input is a recipe (the rebuild walks it through the node), and at the limit the output is
    not marked; outside ``recompute_saved()`` nothing is marked. The rebuilt value is the output, bit for bit."""
    rc = sys_module("recompute")
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def norm(t):
        return batch_norm_lean(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5)

    assert fresh_recipe(norm(x * 1.0))[0] is None  # not inside recompute_saved(): no recipe
    with recompute_saved():
        a = activation(x * 1.0, "relu")
        z = norm(a)
        r = fresh_recipe(z)[0]
        assert r is not None and r.args == () and r.depth == fresh_recipe(a)[0].depth + 1
        assert torch.equal(r.fn(), z)
        deep = a
        while fresh_recipe(deep)[0].depth < rc.MAX_DEPTH:
            deep = _add_marked(deep)
        assert fresh_recipe(norm(deep))[0] is None


def _add_marked(y):
    from freezert.ops.recompute import mark_recomputable

    return mark_recomputable(y + 1.0, functools.partial(torch.add, other=1.0), y)


def test_region_routes_functional_calls_and_composes_residuals():
    """Inside a lean region, F.batch_norm / F.relu(inplace) / ``+=`` / cat run lean: eager's gradients, less kept."""
    from freezert.ops import lean_region

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.bn(self.conv1(x))
            out += x  # an in-place residual on a recipe (torchvision's Bottleneck)
            out = F.relu(out, inplace=True)
            return self.conv2(torch.cat([F.relu(out), x], 1))

    torch.manual_seed(0)
    block = Block().double()
    ref, counted = Block().double(), Block().double()
    ref.load_state_dict(block.state_dict())
    counted.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)

    def lean():
        with lean_region():
            out = block(x)
        out.square().sum().backward()

    kept = saved_bytes(lean, exclude=[*block.parameters(), *block.buffers()])
    eager = saved_bytes(lambda: counted(x), exclude=[*counted.parameters(), *counted.buffers()])
    ref(x).square().sum().backward()  # outside any hooks: under hooks PyTorch skips its own in-place check
    same_grads_and_buffers(block, ref)
    assert kept < eager


def test_nested_regions_route_each_op_through_one_mode_and_stay_exact():
    """A composing block inside a composing block (a Bottleneck inside a C2f, Attention inside a PSABlock): the
    inner block's ops pass through one lean mode, not one per level (which cost Ultralytics models 14x), with
    eager's gradients and fewer bytes kept."""
    from freezert.ops import lean_plan, swapped

    depths: list[int] = []

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            depths.append(torch._C._len_torch_function_stack())
            return x + F.silu(self.bn(self.conv(x)))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Inner(), Inner()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    torch.manual_seed(0)
    model, ref, counted = (nn.Sequential(Outer()).double() for _ in range(3))
    ref.load_state_dict(model.state_dict())
    counted.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    plan = lean_plan(model)
    assert sum(1 for _, r in plan if getattr(r, "ops", False)) == 1  # the outer block's region only

    def lean():
        with swapped(model, plan):
            out = model(x)
        out.square().sum().backward()

    kept = saved_bytes(lean, exclude=[*model.parameters(), *model.buffers()])
    assert depths == [1, 1]
    eager = saved_bytes(lambda: counted(x), exclude=[*counted.parameters(), *counted.buffers()])
    ref(x).square().sum().backward()
    same_grads_and_buffers(model, ref)
    assert kept < eager


def test_batch_norm_act_saves_past_the_hooks_and_still_counts_as_kept():
    """The BN+act op's own saves (its input and statistics) go to autograd, not through the recompute hooks: no
    Python per save, eager's own in-place check. They still count as kept, so the output's recipe costs nothing
    and a later save of the output stores the recipe; the hold ends with the node's backward."""
    from freezert.ops import recompute

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    bn = nn.BatchNorm2d(4).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    seen: list = []

    def pack(t):
        seen.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recompute_saved():
        z = conv(x)
        n = len(seen)
        y = batch_norm_act_lean(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5, "silu")
        assert len(seen) == n + 5  # x, weight, mean, invstd, reserve: straight to the enclosing hooks
        assert recompute._key(z) in recompute._SAVED
        assert fresh_recipe(y)[0] is not None
        out = (y * 2).sum()  # mul saves its tensor operand: the recipe, not y
    out.backward()
    assert recompute._key(z) not in recompute._SAVED  # released by the backward that read it

    # eager's own check: an in-place edit of the saved input raises autograd's error
    z = conv(x)
    with recompute_saved():
        y = batch_norm_act_lean(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5, "silu")
    with torch.no_grad():
        z.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_an_enclosing_pack_hook_that_raises_leaves_no_error_behind():
    """The error reaches the caller as it is; the half-built saved-tensor record under it is dropped quietly (its
    ``__del__`` raised AttributeError, printed as "Exception ignored", where the key was never set)."""
    import sys

    unraisable = []
    old, sys.unraisablehook = sys.unraisablehook, unraisable.append

    def boom(t):
        raise RuntimeError("outer pack failed")

    x = torch.randn(8, requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(boom, lambda t: t), recompute_saved():
            with pytest.raises(RuntimeError, match="outer pack failed"):
                torch.sigmoid(x * 2)
        import gc

        gc.collect()
    finally:
        sys.unraisablehook = old
    assert not unraisable, [str(u.exc_value) for u in unraisable]
