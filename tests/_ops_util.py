"""Shared pieces of the kernel tests: dtype cases, NaN poisoning, the expected path, tolerance checks."""

from __future__ import annotations

import pytest
import torch

from freezert.ops import _registry as reg

CASES = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, 1e-3, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, 1e-5, id="cuda-fp32", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, 1e-3, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, 1e-2, id="cuda-bf16", marks=pytest.mark.cuda),
]


@pytest.fixture(autouse=True)
def _poison():
    """Every kernel output starts as NaN, so an element the kernel did not write fails the test."""
    reg.set_poison(True)
    reg.reset_backend()
    yield
    reg.set_poison(False)


def needs_interpreter() -> None:
    if not reg.interpreting():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def expected_path(device: str) -> str:
    """The backend() value a kernel test on ``device`` must see (skips where that path cannot run)."""
    if device == "cuda":
        if reg.interpreting():
            pytest.skip("the Triton interpreter is on: run CUDA tests with TRITON_INTERPRET=0")
        return reg.TRITON
    needs_interpreter()
    return reg.INTERPRETER


def assert_close(actual, expected, tol, what, floor=1.0):
    """Elementwise, with the absolute slack scaled by the reference's magnitude (at least ``floor``: 1 by
    default; 0 holds a tensor of tiny values, like a mean-reduced gradient, to its own scale)."""
    expected = expected.float()
    scale = max(floor, expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
