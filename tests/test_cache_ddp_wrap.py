"""Several ranks through the wrapper: two gloo processes train one wrapped model under DDP with a shared disk
store (one shard per rank) and a shuffling DistributedSampler; every rank is served the other's rows after
``fm.cache.sync()``, and every output equals the uncached wrap's."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from . import _cache_ddp_wrap_worker as w


def _rank_main(rank: int, world: int, init: str, store: str, out: str) -> None:
    w.run(rank, world, init, store, f"{out}.{rank}")


def test_ranks_share_the_wrapped_models_cache_with_a_shuffling_sampler(tmp_path):
    world = 2
    ctx = mp.start_processes(
        _rank_main,
        args=(world, str(tmp_path / "init"), str(tmp_path / "store"), str(tmp_path / "out")),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    for _ in range(120):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the DDP ranks did not finish in time")
    outs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    for o in outs:
        rates = [h / n for h, n in zip(o["hits"], o["lookups"])]
        # epoch 1 fills (each rank its half); from then on the other rank's rows are hits too (a rank's own rows
        # alone would give about 1/2, 3/4, ...)
        assert rates[0] == 0 and min(rates[2:]) >= 0.9, rates
        assert o["unequal"] == 0 and o["steps"] == w.EPOCHS * w.N // (world * w.BATCH)
        assert o["stale"] == 0 and o["corrupt"] == 0 and o["shared_rows"] > 0
    assert sum(o["lookups"][0] for o in outs) == w.N
