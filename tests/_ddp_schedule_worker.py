"""Helper for tests/test_schedule.py: two gloo processes train under DDP while the frozen set changes.

Run as ``python _ddp_schedule_worker.py OUTDIR PORT [rebuild|keep]``; each rank writes ``rank{r}.pt`` with its
final parameters and the frozen set after every step. ``reference()`` is the single-process run on the
concatenated batches that the ranks must match.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from freezert.schedule import Linear, Unfreeze, rebuild_ddp

STEPS = 10
WORLD = 2
PER_RANK = 4


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 3),
    )


def make_schedule() -> Unfreeze:
    # Depth grows 0 -> 1 -> 2 over the first 80%, then every block trains again at a new learning rate.
    return Unfreeze(at=0.8, lr=0.05, blocks=Linear(freeze_start=0.0, freeze_level=1.0))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * PER_RANK, 6, generator=g), torch.randn(WORLD * PER_RANK, 3, generator=g)


def _train(model, forward, opt, sched, rank: int | None, on_change=None):
    trace = []
    for step in range(STEPS):
        x, y = batch(step)
        if rank is not None:
            x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        loss = F.mse_loss(forward()(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched.step((step + 1) / STEPS) and on_change is not None:
            on_change()
        trace.append(sched.frozen)
    return trace


def reference() -> tuple[dict, list]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = make_schedule().attach(model, opt, blocks=list(model.children()))
    trace = _train(model, lambda: model, opt, sched, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, trace


def _rank(rank: int, outdir: str, port: int, mode: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20))
    try:
        torch.set_num_threads(1)
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = make_schedule().attach(model, opt, blocks=list(model.children()))
        box = {"ddp": DDP(model)}

        def rebuild():
            if mode == "rebuild":
                box["ddp"] = rebuild_ddp(box["ddp"])

        error = None
        try:
            trace = _train(model, lambda: box["ddp"], opt, sched, rank, on_change=rebuild)
        except RuntimeError as e:  # "keep" mode: the stale reducer may refuse to go on
            trace, error = None, str(e)
        torch.save(
            {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "trace": trace, "error": error},
            os.path.join(outdir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def main() -> None:
    outdir, port = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "rebuild"
    import torch._dynamo  # noqa: F401  DDP's constructor imports it (seconds): once here, not in each child

    # fork: the children inherit the imported torch instead of importing it again (seconds on a small CPU);
    # safe here because this parent has only imported, never run an op or started a thread pool.
    mp.start_processes(_rank, args=(outdir, port, mode), nprocs=WORLD, join=True, start_method="fork")


if __name__ == "__main__":
    main()
