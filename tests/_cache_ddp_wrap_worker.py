"""One rank of tests/test_cache_ddp_wrap.py: a wrapped model under DistributedDataParallel (two gloo processes),
``cache=FeatureCache("fp32", "disk", path=<shared dir>)``, a shuffling DistributedSampler, ``fm(x, cache_ids=idx)``
and ``fm.cache.sync()`` at each epoch's end; each output is compared with an uncached wrap of the same weights.
Writes the per-epoch hit counts to ``out.<rank>``."""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

import freezert
from freezert.cache import FeatureCache

N, BATCH, EPOCHS, FREEZE = 64, 8, 4, 4


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 12, 12, generator=g), torch.randint(0, 4, (N,), generator=g)


def run(rank: int, world: int, init_file: str, store: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x_all, y_all = dataset()
        model = build()
        ref = freezert.wrap(copy.deepcopy(model), freeze=FREEZE)  # uncached, kept at the same weights
        fm = freezert.wrap(model, freeze=FREEZE, cache=FeatureCache("fp32", "disk", path=store))  # rank: dist's
        ddp = nn.parallel.DistributedDataParallel(fm)
        opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.05)
        sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=3)
        hits, lookups, unequal, steps = [], [], 0, 0
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            before = fm.cache.stats()
            order = torch.tensor(list(sampler))
            for ids in order.split(BATCH):
                out = ddp(x_all[ids], cache_ids=ids)
                with torch.no_grad():
                    unequal += int(not torch.equal(out, ref(x_all[ids])))
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(out, y_all[ids]).backward()
                opt.step()
                with torch.no_grad():
                    for p, q in zip(fm.module.parameters(), ref.module.parameters()):
                        q.copy_(p)
                steps += 1
            after = fm.cache.stats()
            hits.append(after["hits"] - before["hits"])
            lookups.append(after["lookups"] - before["lookups"])
            fm.cache.sync()  # flush this rank's shard, wait for the other, read its rows
        st = fm.cache.stats()
        fm.cache.close()
        with open(out_file, "w") as f:
            json.dump(
                {
                    "hits": hits,
                    "lookups": lookups,
                    "unequal": unequal,
                    "steps": steps,
                    "stale": st["stale"],
                    "corrupt": st["corrupt"],
                    "shared_rows": st["tiers"]["disk"]["shared_rows"],
                },
                f,
            )
    finally:
        dist.destroy_process_group()
