"""Epoch time of a trainable tail fed from the feature cache: device tier vs disk tier, with and without prefetch.

    python benchmarks/bench_prefetch.py [--rows 2048] [--batch 64] [--rounds 5] [--codec fp16]

At the cache level (keys = dataset indices, rows stored once before timing): each epoch visits the dataset in a
shuffled order, ``fetch``es each batch's rows and runs the tail's forward, backward and optimizer step on them.
``disk+prefetch`` calls ``cache.prefetch(next batch)`` before the step, so the next batch's records are read,
verified and decoded on a background thread while the step runs. The variants run one epoch each in turn per
round (drift on a shared machine lands on all alike); the table has each variant's median epoch and its ratio to
the device tier. The disk store lies in the page cache here (its working set fits in RAM), so "disk" measures
``preadv`` + checksum + decode, not a cold drive.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from freezert.cache import FeatureCache

FP = "00000000000000be"


def tail(kind: str, channels: int, classes: int = 10) -> nn.Module:
    """The trainable part after the cut: a conv block and a classifier ("conv", a fine-tuned head) or a 1x1 conv and
    a classifier ("light": the cheapest tail, where reading the cache weighs most)."""
    if kind == "light":
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(), *pool, nn.Linear(channels, classes))
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


def make_cache(kind: str, codec: str, shape, rows: torch.Tensor, path: str | None) -> FeatureCache:
    if kind == "device":
        cache = FeatureCache(codec, "auto", budget="8GiB")  # a CPU model: the device tier is CPU memory
    else:
        cache = FeatureCache(codec, "disk", budget="8GiB", path=path)
    cache.bind(FP, [(shape, torch.float32)], "cpu")
    for lo in range(0, rows.shape[0], 256):
        cache.put(range(lo, min(lo + 256, rows.shape[0])), [rows[lo : lo + 256]])
    return cache


def epoch(cache: FeatureCache, model: nn.Module, opt, labels, order: list[int], batch: int, prefetch: bool):
    """(epoch seconds, seconds spent in fetch)."""
    t0, in_fetch = time.perf_counter(), 0.0
    batches = [order[lo : lo + batch] for lo in range(0, len(order), batch)]
    for i, ids in enumerate(batches):
        f0 = time.perf_counter()
        hit, (x,) = cache.fetch(ids, "cpu")
        in_fetch += time.perf_counter() - f0
        if prefetch and i + 1 < len(batches):
            cache.prefetch(batches[i + 1], "cpu")
        assert bool(hit.all())
        loss = nn.functional.cross_entropy(model(x), labels[ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, in_fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--tail", choices=["conv", "light"], default="conv")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the step (the prefetch thread is extra)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape = (a.channels, a.size, a.size)
    rows = torch.relu(torch.randn(a.rows, *shape))
    labels = torch.randint(0, 10, (a.rows,))
    tmp = tempfile.mkdtemp(prefix="freezert-bench-prefetch-")
    caches = {
        "device": make_cache("device", a.codec, shape, rows, None),
        "disk": make_cache("disk", a.codec, shape, rows, f"{tmp}/store"),
    }
    caches["disk+prefetch"] = caches["disk"]
    model = tail(a.tail, a.channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in caches}
    for name in caches:  # warm-up: one epoch each
        epoch(caches[name], model, opt, labels, list(range(a.rows)), a.batch, name.endswith("prefetch"))
    names = list(caches)
    for r in range(a.rounds):
        order = torch.randperm(a.rows, generator=g).tolist()
        for name in names[r % 3 :] + names[: r % 3]:  # rotated: no variant always runs first
            cache = caches[name]
            times[name].append(epoch(cache, model, opt, labels, order, a.batch, name.endswith("prefetch")))
    rec = caches["disk"].stats()["tiers"]["disk"]["bytes_per_row"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rows} rows of {list(shape)} in "
        f"{a.codec} ({rec / 1024:.1f} KiB per disk record), batch {a.batch}, {a.tail} tail, {a.rounds} rounds"
    )
    print(f"{'variant':<14} {'median epoch s':>14} {'in fetch s':>11} {'/ device, per round: median [quartiles]':>42}")
    for name, t in times.items():
        ratios = sorted(e / d for (e, _), (d, _) in zip(t, times["device"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        med, fetch_s = statistics.median(e for e, _ in t), statistics.median(f for _, f in t)
        print(f"{name:<14} {med:>14.3f} {fetch_s:>11.3f} {q[1]:>27.3f}x [{q[0]:.3f}, {q[2]:.3f}]")
    st = caches["disk"].stats()
    print(f"disk: prefetched {st['prefetched']} of {st['hits']} hits; corrupt {st['corrupt']}")
    for c in caches.values():
        c.close()


if __name__ == "__main__":
    main()
