"""layer_norm (Triton path) against F.layer_norm: values and grads, with and without affine."""

from __future__ import annotations

import pytest
import torch

from freezert.ops import _registry as reg
from freezert.ops import backend, layer_norm, layer_norm_reference

from ._ops_util import CASES, _poison, assert_close, expected_path  # noqa: F401 (_poison is an autouse fixture)


@pytest.mark.parametrize("device,dtype,tol", CASES)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("shape,normalized", [((37, 45), (45,)), ((3, 7, 5, 9), (5, 9))], ids=["37x45", "4d"])
def test_matches_reference(device, dtype, tol, affine, shape, normalized):
    path = expected_path(device)
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    w = torch.randn(normalized, device=device).to(dtype) if affine != "none" else None
    b = torch.randn(normalized, device=device).to(dtype) if affine == "wb" else None
    fast = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = [t.float().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = layer_norm(fast[0], normalized, fast[1], fast[2], 1e-5)
    yr = layer_norm_reference(ref[0], normalized, ref[1], ref[2], 1e-5)
    assert backend()["layer_norm"] == path
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yr, tol, "output")
    g = torch.randn(shape, device=device)
    y.backward(g.to(dtype))
    yr.backward(g)
    for name, a, r in zip(("input", "weight", "bias"), fast, ref):
        if a is not None:
            assert a.grad.dtype == dtype
            assert_close(a.grad, r.grad, 2 * tol, f"grad {name}")


def test_only_weight_grad_and_eps():
    """Input that needs no grad (dx is skipped), int normalized_shape, a large eps."""
    path = expected_path("cpu")
    x = torch.randn(37, 45)
    w = torch.randn(45, requires_grad=True)
    y = layer_norm(x, 45, w, None, 1e-2)
    assert backend()["layer_norm"] == path
    yr = layer_norm_reference(x, 45, w, None, 1e-2)
    assert_close(y, yr, 1e-5, "output")
    g = torch.randn(37, 45)
    assert_close(torch.autograd.grad(y, w, g)[0], torch.autograd.grad(yr, w, g)[0], 2e-5, "grad weight")


def test_fallbacks():
    """Rows too long for one block, float64 and bf16 under the interpreter take the reference."""
    expected_path("cpu")
    x = torch.randn(2, 16385)
    torch.testing.assert_close(layer_norm(x, 16385), layer_norm_reference(x, 16385))
    assert backend()["layer_norm"] == reg.REFERENCE
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x, 5), layer_norm_reference(x, 5))
    assert backend()["layer_norm"] == reg.REFERENCE
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    torch.testing.assert_close(layer_norm(x, 5), layer_norm_reference(x, 5))
    assert backend()["layer_norm"] == reg.REFERENCE


def test_autocast_dtype_like_eager():
    path = expected_path("cpu")
    x = torch.randn(37, 45)
    w = torch.randn(45, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        h = torch.mm(x, torch.eye(45))  # fp16 under autocast
        y = layer_norm(h, 45, w)
        assert backend()["layer_norm"] == path
        yr = layer_norm_reference(h, 45, w)
    assert y.dtype == yr.dtype  # CUDA autocast runs layer_norm in fp32; CPU autocast keeps fp16
    assert_close(y, yr, 1e-3, "output")
