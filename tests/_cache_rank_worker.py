"""One rank of tests/test_cache_ranks.py's two-process gloo run: a shuffling DistributedSampler over dataset indices,
every rank caching into one shared ``FeatureCache(path=...)`` (its rank from torch.distributed), ``sync()`` at each
epoch's end. Writes the per-epoch hit counts to ``out.<rank>``."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from freezert.cache import FeatureCache

FP = "00000000000000dd"
LAYOUT = [((3, 4), torch.float32)]
N, BATCH, EPOCHS = 96, 8, 4


def rows(ids: list[int]) -> list[torch.Tensor]:
    """What the frozen prefix computes for sample ``i``: a deterministic function of the index."""
    t = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1)
    return [t * 0.5 + torch.arange(12, dtype=torch.float32).view(1, 3, 4)]


def run(rank: int, world: int, init_file: str, store: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cache = FeatureCache("fp32", "disk", "64MiB", store)  # rank: torch.distributed's
        cache.bind(FP, LAYOUT, "cpu")
        sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=3)
        hits, lookups, wrong = [], [], 0
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            order = list(sampler)
            h = 0
            for lo in range(0, len(order), BATCH):
                ids = order[lo : lo + BATCH]
                hit, got = cache.fetch(ids, "cpu")
                served = [i for i, x in zip(ids, hit.tolist()) if x]
                wrong += int(not torch.equal(got[0], rows(served)[0]))
                miss = [i for i, x in zip(ids, hit.tolist()) if not x]
                cache.put(miss, rows(miss))
                h += len(served)
            hits.append(h)
            lookups.append(len(order))
            cache.sync()  # flush this rank's shard, wait for the others, read theirs
        st = cache.stats()
        cache.close()
        with open(out_file, "w") as f:
            json.dump({"hits": hits, "lookups": lookups, "wrong": wrong, "disk": st["tiers"]["disk"]}, f)
    finally:
        dist.destroy_process_group()
