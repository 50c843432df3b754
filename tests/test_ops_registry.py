"""The registry: which path runs, fallbacks to the references, import without triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import freezert.ops as ops
from freezert.ops import _registry as reg


def test_backend_reports_every_op():
    reg.reset_backend()
    report = ops.backend()
    assert set(report) == {"batch_norm_act", "layer_norm", "linear_cross_entropy"}
    assert set(report.values()) <= {reg.TRITON, reg.INTERPRETER, reg.REFERENCE}


def test_bf16_and_fp64_fall_back_under_the_interpreter():
    if not reg.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    x = torch.randn(3, 5, 7, 9, dtype=torch.bfloat16)
    y = ops.batch_norm_act(x, None, None, training=True)
    assert ops.backend()["batch_norm_act"] == reg.REFERENCE
    torch.testing.assert_close(y, ops.batch_norm_act_reference(x, None, None, training=True))
    x = torch.randn(29, 23, dtype=torch.float64)
    w = torch.randn(11, 23, dtype=torch.float64)
    t = torch.randint(0, 11, (29,))
    loss = ops.linear_cross_entropy(x, w, t)
    assert ops.backend()["linear_cross_entropy"] == reg.REFERENCE
    torch.testing.assert_close(loss, ops.linear_cross_entropy_reference(x, w, t))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = {**os.environ, "PYTHONPATH": root, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_needs_no_triton_and_falls_back_without_it():
    res = _run(
        """
        import sys
        import torch
        import freezert.ops as ops
        assert "triton" not in sys.modules  # imported lazily, on the first kernel call
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        x = torch.randn(3, 5, 7, 9)
        y = ops.batch_norm_act(x, torch.zeros(5), torch.ones(5), training=True)
        z = ops.layer_norm(torch.randn(4, 6), 6)
        loss = ops.linear_cross_entropy(torch.randn(4, 6), torch.randn(3, 6), torch.tensor([0, 1, 2, 0]))
        assert set(ops.backend().values()) == {"reference"}, ops.backend()
        print("ok")
    """,
        TRITON_INTERPRET="1",
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(reg, "interpreting", lambda: False)
    x = torch.randn(4, 6)
    torch.testing.assert_close(ops.layer_norm(x, 6), ops.layer_norm_reference(x, 6))
    assert ops.backend()["layer_norm"] == reg.REFERENCE
