"""DistributedDataParallel over a wrapped model: two gloo CPU processes give the single-process gradients."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import freezert

from . import _ddp_worker as w
from ._ref import loss_of


def _spawn(tmp_path, target, world=2, timeout=120):
    ctx = mp.start_processes(
        target,
        args=(world, str(tmp_path / "init"), str(tmp_path / "out")),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    for _ in range(timeout):
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail("DDP workers did not finish in time")


def _expected_grads() -> dict[str, torch.Tensor | None]:
    # single process: each shard on its own (BatchNorm in the trainable part sees per-shard statistics
    # under DDP too), gradients averaged, as DDP's all-reduce does
    expected: dict[str, torch.Tensor | None] = {}
    for shard in w.batch().chunk(2):
        fm = freezert.wrap(w.build(), freeze=3)
        for _ in range(2):
            fm.zero_grad(set_to_none=True)
            loss_of(fm(shard)).backward()
        for n, p in fm.model.named_parameters():
            if p.grad is None:
                expected[n] = None
            else:
                expected[n] = p.grad / 2 + (expected.get(n) if expected.get(n) is not None else 0)
    return expected


def _check(ranks, expected) -> None:
    for r in ranks:
        assert r.keys() == expected.keys()
        for n, g in expected.items():
            if g is None:
                assert r[n] is None, f"frozen {n} got a gradient under DDP"
            else:
                torch.testing.assert_close(r[n], g, rtol=1e-4, atol=1e-6)
    assert any(g is None for g in expected.values()) and any(g is not None for g in expected.values())


def test_ddp_gradients_equal_single_process(tmp_path):
    _spawn(tmp_path, w.run)
    _check([torch.load(tmp_path / f"out.{r}") for r in range(2)], _expected_grads())


def test_ddp_each_rank_caches_its_own_shard(tmp_path):
    _spawn(tmp_path, w.run_cached)
    outs = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    for o in outs:
        assert o["stats"]["hits"] == 3 and o["stats"]["misses"] == 3  # its 3 samples, once each
    _check([o["grads"] for o in outs], _expected_grads())
