"""linear_cross_entropy (chunked, Triton softmax/grad) against F.cross_entropy(F.linear(...))."""

from __future__ import annotations

import pytest
import torch

from freezert import FreezeError
from freezert.ops import _registry as reg
from freezert.ops import backend, linear_cross_entropy, linear_cross_entropy_reference

from ._ops_util import CASES, _poison, assert_close, expected_path  # noqa: F401 (_poison is an autouse fixture)

N, D = 29, 23


def make(device, dtype, v, ignore=True, bias=True):
    x = torch.randn(N, D, device=device).to(dtype)
    w = (torch.randn(v, D, device=device) * 0.3).to(dtype)
    b = torch.randn(v, device=device).to(dtype) if bias else None
    t = torch.randint(0, v, (N,), device=device)
    if ignore:
        t[::4] = -100
    return x, w, b, t


def check(device, dtype, tol, v, reduction, smoothing, bias=True, chunk=8, ignore_index=-100):
    path = expected_path(device)
    x, w, b, t = make(device, dtype, v, bias=bias)
    if ignore_index != -100:
        t[t == -100] = ignore_index
    fast = [u.clone().requires_grad_() if u is not None else None for u in (x, w, b)]
    ref = [u.float().clone().requires_grad_() if u is not None else None for u in (x, w, b)]
    loss = linear_cross_entropy(
        fast[0],
        fast[1],
        t,
        fast[2],
        ignore_index=ignore_index,
        label_smoothing=smoothing,
        reduction=reduction,
        chunk_size=chunk,
    )
    lref = linear_cross_entropy_reference(
        ref[0], ref[1], t, ref[2], ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction
    )
    assert backend()["linear_cross_entropy"] == path
    assert loss.dtype == dtype and loss.shape == lref.shape
    assert_close(loss, lref, tol, "loss")
    g = torch.rand(lref.shape, device=device) + 0.5
    loss.backward(g.to(dtype))
    lref.backward(g)
    for name, a, r in zip(("input", "weight", "bias"), fast, ref):
        if a is not None:
            assert a.grad.dtype == dtype
            assert_close(a.grad, r.grad, 2 * tol, f"grad {name}", floor=0.0)  # mean: grads are ~1/N small


@pytest.mark.parametrize("device,dtype,tol", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [101, 1000])
def test_matches_reference(device, dtype, tol, reduction, v):
    check(device, dtype, tol, v, reduction, 0.0)


@pytest.mark.parametrize("device,dtype,tol", CASES[:1] + CASES[2:])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing(device, dtype, tol, reduction):
    check(device, dtype, tol, 101, reduction, 0.1)


def test_no_bias_other_ignore_index_one_chunk():
    check("cpu", torch.float32, 1e-5, 101, "mean", 0.2, bias=False, chunk=None, ignore_index=7)


def test_all_ignored_mean_is_nan_like_torch():
    expected_path("cpu")
    x, w, b, t = make("cpu", torch.float32, 101)
    t[:] = -100
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, t, b, chunk_size=8)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_reference(x, w, t, b))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # eager's gradients are zeros too


def test_fp16_mean_gradients_of_rare_classes_survive_a_loss_scale():
    """fp16, mean, a GradScaler-like loss scale: the weight gradient of classes absent from the batch is
    sum_i p_ic x_i / N, tiny per row. Folding 1/N into the fp16 logit gradients before the scale arrives
    flushed many of them to zero; each absent class's gradient row must be right on its own scale."""
    expected_path("cpu")
    g = torch.Generator().manual_seed(3)
    n, d, v = 193, 40, 1531
    x = torch.randn(n, d, generator=g).half()
    w = (torch.randn(v, d, generator=g) * 1.5).half()  # spread logits: many probabilities far below 1/V
    t = torch.randint(0, v, (n,), generator=g)
    fast = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [x.double().requires_grad_(), w.double().requires_grad_()]
    (linear_cross_entropy(fast[0], fast[1], t, chunk_size=64) * 1024).backward()
    (linear_cross_entropy_reference(ref[0], ref[1], t) * 1024).backward()
    absent = torch.ones(v, dtype=torch.bool)
    absent[t] = False
    gw, gr = fast[1].grad.double()[absent], ref[1].grad[absent]
    per_row = (gw - gr).norm(dim=1) / gr.norm(dim=1)
    assert per_row.quantile(0.9) < 0.02, per_row.quantile(0.9)  # was 0.51 with the 1/N folded in
    assert ((gw == 0) & (gr != 0)).double().mean() < 0.01  # elements flushed to zero: was 11%


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_float32_under_autocast_and_a_large_scale_stays_finite(smoothing):
    """Autocast: the loss comes back fp32 like eager's; a gradient of 65536 (GradScaler's first scale, above
    fp16's maximum) reaches the fp16 matmul inputs without overflowing on the way."""
    path = expected_path("cpu")
    x, w, b, t = make("cpu", torch.float32, 101)
    fast = [u.clone().requires_grad_() for u in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(*fast[:2], t, fast[2], label_smoothing=smoothing, chunk_size=8)
    assert loss.dtype == torch.float32 and backend()["linear_cross_entropy"] == path
    (loss * 65536.0).backward()
    for u in fast:
        assert torch.isfinite(u.grad).all()
    ref = [u.clone().requires_grad_() for u in (x, w, b)]
    lref = linear_cross_entropy_reference(*ref[:2], t, ref[2], label_smoothing=smoothing)
    (lref * 65536.0).backward()
    assert_close(loss, lref, 1e-2, "loss")
    assert_close(fast[1].grad, ref[1].grad, 2e-2, "grad weight", floor=0.0)


def test_a_block_of_minus_inf_logits_is_not_nan():
    """A bias of -inf masks classes (here the whole first 4096-column block): the online max starts at -inf."""
    expected_path("cpu")
    n, d, v = 3, 8, 4100
    x, w = torch.randn(n, d), torch.randn(v, d) * 0.1
    b = torch.zeros(v)
    b[:4096] = float("-inf")
    t = torch.tensor([4096, 4099, 4097])
    xf = x.clone().requires_grad_()
    loss = linear_cross_entropy(xf, w, t, b, chunk_size=2)
    xr = x.clone().requires_grad_()
    lref = linear_cross_entropy_reference(xr, w, t, b)
    assert torch.isfinite(loss)
    assert_close(loss, lref, 1e-5, "loss")
    loss.backward()
    lref.backward()
    assert_close(xf.grad, xr.grad, 1e-5, "grad input")


def test_saved_tensors_smaller_than_logits():
    """Peak memory fact, device-independent: nothing saved for backward is as large as N x V."""
    expected_path("cpu")
    v = 1000
    x, w, b, t = make("cpu", torch.float32, v)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    for reduction in ("mean", "none"):
        sizes: list[int] = []

        def pack(u, sizes=sizes):
            sizes.append(u.numel())
            return u

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
            loss = linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=8)
        assert sizes and max(sizes) < N * v, (reduction, sizes)
        loss.sum().backward()
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
            linear_cross_entropy_reference(x, w, t, b, reduction=reduction)
        assert max(sizes) >= N * v  # eager keeps the logits (or their softmax)


def test_fallback_shapes_and_errors():
    expected_path("cpu")
    x = torch.randn(2, 3, D)  # (B, T, D): F.cross_entropy reads dim 1 as classes; leave it to torch
    w = torch.randn(3, D)
    t = torch.randint(0, 3, (2, 3))
    torch.testing.assert_close(linear_cross_entropy(x, w, t), linear_cross_entropy_reference(x, w, t))
    assert backend()["linear_cross_entropy"] == reg.REFERENCE
    with pytest.raises(FreezeError, match="reduction"):
        linear_cross_entropy(torch.randn(3, D), w, torch.zeros(3, dtype=torch.long), reduction="avg")
    with pytest.raises(FreezeError, match="chunk_size"):
        linear_cross_entropy(torch.randn(3, D), w, torch.zeros(3, dtype=torch.long), chunk_size=0)


def test_autocast_matches_eager_autocast():
    """Under autocast: matmuls in the autocast dtype, an fp32 loss, like F.linear + F.cross_entropy."""
    path = expected_path("cpu")
    x, w, b, t = make("cpu", torch.float32, 101)
    fast = [u.clone().requires_grad_() for u in (x, w, b)]
    ref = [u.clone().requires_grad_() for u in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(fast[0], fast[1], t, fast[2], chunk_size=8)
        assert backend()["linear_cross_entropy"] == path
        lref = linear_cross_entropy_reference(ref[0], ref[1], t, ref[2])
    assert loss.dtype == lref.dtype == torch.float32
    assert_close(loss, lref, 2e-3, "loss")
    loss.backward()
    lref.backward()
    for a, r in zip(fast, ref):
        assert a.grad.dtype == torch.float32
        assert_close(a.grad, r.grad, 2e-3, "grad")
