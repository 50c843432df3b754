"""A DDP worker for tests/test_ddp.py: one rank of a two-process gloo run."""

from __future__ import annotations

import torch
import torch.distributed as dist

import freezert
from freezert.models import cnn_classifier

from ._ref import loss_of, pretrained_like


def build(seed: int = 0):
    torch.manual_seed(seed)
    return pretrained_like(cnn_classifier(num_classes=5, width=16), torch.randn(4, 3, 24, 24))


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 24, 24, generator=g)


def run(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fm = freezert.wrap(build(), freeze=3)
        ddp = torch.nn.parallel.DistributedDataParallel(fm)
        shard = batch().chunk(world)[rank]
        for _ in range(2):  # the second step runs the folded segment
            ddp.zero_grad(set_to_none=True)
            loss_of(ddp(shard)).backward()
        grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in fm.model.named_parameters()}
        torch.save(grads, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def run_cached(rank: int, world: int, init_file: str, out_file: str) -> None:
    """Each rank caches its own shard (fp32 codec); the second epoch is served from the cache."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fm = freezert.wrap(build(), freeze=3, cache="fp32")
        ddp = torch.nn.parallel.DistributedDataParallel(fm)
        shard = batch().chunk(world)[rank]
        for _ in range(2):  # epoch 1 fills, epoch 2 hits
            ddp.zero_grad(set_to_none=True)
            loss_of(ddp(shard)).backward()
        grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in fm.model.named_parameters()}
        torch.save({"grads": grads, "stats": fm.cache.stats()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
