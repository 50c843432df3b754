"""batch_norm_act (Triton path) against F.batch_norm + activation: values, grads, running stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from freezert import FreezeError
from freezert.ops import backend, batch_norm_act, batch_norm_act_reference

from ._ops_util import CASES, _poison, assert_close, expected_path  # noqa: F401 (_poison is an autouse fixture)


def run_both(x, rm, rv, w, b, training, act, momentum=0.1, eps=1e-5):
    """Kernel on x (its dtype) vs the fp32 reference on the same values; returns both sides."""
    fast = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
    ref = [t.detach().float().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        ref[0] = ref[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    rm_f, rv_f = (None, None) if rm is None else (rm.clone(), rv.clone())
    rm_r, rv_r = (None, None) if rm is None else (rm.float().clone(), rv.float().clone())
    y = batch_norm_act(fast[0], rm_f, rv_f, fast[1], fast[2], training, momentum, eps, act)
    yr = batch_norm_act_reference(ref[0], rm_r, rv_r, ref[1], ref[2], training, momentum, eps, act)
    g = torch.randn(yr.shape, device=x.device)
    y.backward(g.to(y.dtype))
    yr.backward(g)
    return (y, fast, rm_f, rv_f), (yr, ref, rm_r, rv_r)


@pytest.mark.parametrize("device,dtype,tol", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["silu", "relu", "identity"])
def test_matches_reference(device, dtype, tol, channels_last, training, act):
    path = expected_path(device)
    n, c, h, w = 3, 19, 7, 9
    x = (torch.randn(n, c, h, w, device=device) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c, device=device).requires_grad_()
    bias = torch.randn(c, device=device).requires_grad_()
    rm = torch.randn(c, device=device)
    rv = torch.rand(c, device=device) + 0.5
    (y, fast, rm_f, rv_f), (yr, ref, rm_r, rv_r) = run_both(x, rm, rv, weight, bias, training, act)
    assert backend()["batch_norm_act"] == path
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert_close(y, yr, tol, "output")
    for name, a, r in zip(("input", "weight", "bias"), fast, ref):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, r.grad, tol * 2, f"grad {name}")
    assert_close(rm_f, rm_r, tol, "running_mean")
    assert_close(rv_f, rv_r, tol, "running_var")


@pytest.mark.parametrize("device,dtype,tol", CASES[:2])
def test_fp16_parameters_and_buffers(device, dtype, tol):
    """A module converted with .half(): weight, bias and running stats in the input's dtype."""
    expected_path(device)
    c = 5
    x = torch.randn(3, c, 7, 9, device=device).to(dtype).requires_grad_()
    w = torch.randn(c, device=device).to(dtype).requires_grad_()
    b = torch.randn(c, device=device).to(dtype).requires_grad_()
    rm, rv = torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)
    (y, fast, rm_f, rv_f), (yr, ref, rm_r, rv_r) = run_both(x, rm, rv, w, b, True, "silu")
    assert rm_f.dtype == dtype and fast[1].grad.dtype == dtype
    assert_close(y, yr, tol, "output")
    assert_close(rm_f, rm_r, tol, "running_mean")
    assert_close(rv_f, rv_r, tol, "running_var")
    for a, r in zip(fast, ref):
        assert_close(a.grad, r.grad, 4 * tol, "grad")


@pytest.mark.parametrize("shape", [(29, 5), (3, 5, 11), (2, 5, 1, 1)], ids=["2d", "3d", "1x1"])
def test_other_ranks_and_no_affine(shape):
    """(N, C), (N, C, L), 1x1 maps; no weight / bias; no running stats (batch statistics only)."""
    path = expected_path("cpu")
    x = torch.randn(*shape).requires_grad_()
    (y, fast, _, _), (yr, ref, _, _) = run_both(x, None, None, None, None, True, "silu")
    assert backend()["batch_norm_act"] == path
    assert_close(y, yr, 1e-5, "output")
    assert_close(fast[0].grad, ref[0].grad, 2e-5, "grad input")


def test_non_contiguous_input_and_grad():
    path = expected_path("cpu")
    x = torch.randn(3, 9, 19, 7).transpose(1, 2).requires_grad_()  # (3, 19, 9, 7), neither layout
    w, b = torch.randn(19).requires_grad_(), torch.randn(19).requires_grad_()
    y = batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "relu")
    yr = batch_norm_act_reference(x, None, None, w, b, True, 0.1, 1e-5, "relu")
    assert backend()["batch_norm_act"] == path
    assert_close(y, yr, 1e-5, "output")
    g = torch.randn(3, 19, 7, 9).permute(0, 1, 3, 2)  # a strided incoming gradient
    (gx, gw) = torch.autograd.grad(y, (x, w), g)
    (gxr, gwr) = torch.autograd.grad(yr, (x, w), g)
    assert_close(gx, gxr, 2e-5, "grad input")
    assert_close(gw, gwr, 2e-5, "grad weight")


def test_saves_less_than_eager():
    """Only the input and per-channel vectors are saved; eager BN + SiLU also keeps the BN output."""
    expected_path("cpu")
    x = torch.randn(3, 19, 7, 9, requires_grad=True)
    w, b = torch.randn(19, requires_grad=True), torch.randn(19, requires_grad=True)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    ours = saved_bytes(lambda: batch_norm_act(x, torch.zeros(19), torch.ones(19), w, b, True, 0.1, 1e-5, "silu"))
    eager = saved_bytes(lambda: F.silu(F.batch_norm(x, torch.zeros(19), torch.ones(19), w, b, True, 0.1, 1e-5)))
    assert ours < eager
    assert ours <= x.numel() * x.element_size() + 4 * 19 * 4  # input + mean, invstd, weight, bias


def test_momentum_and_eps():
    expected_path("cpu")
    x = torch.randn(3, 5, 7, 9, requires_grad=True)
    rm, rv = torch.randn(5), torch.rand(5) + 0.1
    (y, _, rm_f, rv_f), (yr, _, rm_r, rv_r) = run_both(x, rm, rv, None, None, True, "silu", momentum=0.37, eps=1e-3)
    assert_close(y, yr, 1e-5, "output")
    assert_close(rm_f, rm_r, 1e-5, "running_mean")
    assert_close(rv_f, rv_r, 1e-5, "running_var")


def test_errors():
    x = torch.randn(1, 5, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(x, None, None, training=True)
    with pytest.raises(FreezeError, match="activation"):
        batch_norm_act(torch.randn(2, 5), None, None, training=True, activation="gelu")
    with pytest.raises(FreezeError, match="running_mean"):
        batch_norm_act(torch.randn(2, 5), None, None, training=False)
    with pytest.raises(FreezeError, match="momentum=None"):
        batch_norm_act(torch.randn(2, 5), None, None, training=True, momentum=None)
