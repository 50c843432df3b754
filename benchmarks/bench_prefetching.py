"""Epoch time of a wrapped model trained from its feature cache through a DataLoader: the device tier, the disk tier,
and the disk tier with ``freezert.cache.prefetching(loader, fm)`` (the next batch's rows read while this one trains).

    python benchmarks/bench_prefetching.py [--rows 1024] [--batch 64] [--rounds 11] [--tail conv|light]

The trainer-level counterpart of bench_prefetch.py (which drives ``FeatureCache`` directly): here the loop is a
user's, ``fm(x, cache_ids=idx)`` over a shuffling ``DataLoader``; a ``nn.Sequential`` CNN whose first 4 blocks (two
convolutions, 3x32x32 -> a [64, 16, 16] boundary) are frozen, ``cache=FeatureCache("fp16", ...)``. One epoch fills
each variant's cache (untimed); then the variants run one epoch each in turn per round, in the same sample order,
so drift on a shared machine lands on all alike. Prints each variant's median epoch, its median time inside the
cache's ``fetch`` per epoch, and per-round ratios to the device tier (median and quartiles). The disk store lies in
the page cache (its working set fits in RAM): "disk" measures ``preadv`` + checksum + decode, not a cold drive.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import freezert
from freezert.cache import FeatureCache, prefetching

VARIANTS = ("device", "disk", "disk + prefetching")


def model(tail: str) -> nn.Sequential:
    torch.manual_seed(0)
    prefix = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU()]
    if tail == "light":
        rest = [nn.Conv2d(64, 64, 1), nn.ReLU()]
    else:
        rest = [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)]
        rest.append(nn.ReLU())
    return nn.Sequential(*prefix, *rest, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def call(b):
    return (b[0],), {"cache_ids": b[2]}


class Variant:
    def __init__(self, name: str, base: nn.Sequential, store: str):
        self.name = name
        where = dict(where="auto", budget="8GiB") if name == "device" else dict(where="disk", budget="8GiB", path=store)
        self.fm = freezert.wrap(copy.deepcopy(base), freeze=4, cache=FeatureCache("fp16", **where))
        self.opt = torch.optim.SGD([p for p in self.fm.parameters() if p.requires_grad], lr=0.01)

    def epoch(self, loader) -> tuple[float, float]:
        """(epoch seconds, seconds inside the cache's fetch)."""
        get0 = self.fm.cache.stats()["get_s"]
        t0 = time.perf_counter()
        batches = prefetching(loader, self.fm, call) if self.name.endswith("prefetching") else loader
        for x, y, idx in batches:
            loss = nn.functional.cross_entropy(self.fm(x, cache_ids=idx), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0, self.fm.cache.stats()["get_s"] - get0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--tail", choices=["conv", "light"], default="conv")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, 3, 32, 32, generator=g)
    ds = TensorDataset(x, torch.randint(0, 10, (a.rows,), generator=g), torch.arange(a.rows))
    base = model(a.tail)
    with tempfile.TemporaryDirectory() as d:
        variants = [Variant(n, base, f"{d}/{i}") for i, n in enumerate(VARIANTS)]
        for v in variants:  # the fill epoch
            v.epoch(DataLoader(ds, batch_size=a.batch))
        times = {v.name: [] for v in variants}
        fetch = {v.name: [] for v in variants}
        ratios = {v.name: [] for v in variants}
        for r in range(a.rounds):
            row = []
            for v in variants:
                order = torch.Generator().manual_seed(100 + r)  # the same shuffled order for every variant
                t, f = v.epoch(DataLoader(ds, batch_size=a.batch, shuffle=True, generator=order))
                times[v.name].append(t)
                fetch[v.name].append(f)
                row.append(t)
            for v, t in zip(variants, row):
                ratios[v.name].append(t / row[0])
        stats = [v.fm.cache.stats() for v in variants]
    print(
        f"{datetime.date.today()}, torch {torch.__version__}, CPU ({a.threads} thread), {a.rows} rows of [64, 16, 16] "
        f"fp16, batch {a.batch}, tail {a.tail}, {a.rounds} rounds"
    )
    print("| variant | median epoch | in fetch per epoch | epoch / device tier, per round: median [quartiles] |")
    print("| --- | --- | --- | --- |")
    for v, st in zip(variants, stats):
        q = statistics.quantiles(ratios[v.name], n=4)
        print(
            f"| {v.name} | {statistics.median(times[v.name]):.3f} s | {statistics.median(fetch[v.name]):.3f} s | "
            f"{statistics.median(ratios[v.name]):.3f}x [{q[0]:.3f}, {q[2]:.3f}] |"
        )
        if st["misses"] != a.rows:
            raise RuntimeError(f"{v.name} recomputed rows after its fill epoch ({st['misses']} misses)")
    print(f"prefetched rows (disk + prefetching): {stats[2]['prefetched']} of {stats[2]['hits']} hits")


if __name__ == "__main__":
    main()
