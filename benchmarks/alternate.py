"""The cache benchmark's variants stepped in turn, one step each per round: drift hits them all alike.

    python benchmarks/alternate.py [--family yolo encoder] [--rounds 200]

Timing whole blocks of steps per variant (pytest-benchmark, ``freezert bench``) lets a small, shared CPU's
drift land on one variant; alternating step by step does not. Prints the median step time of each variant
and the ratios to the floor. The sizes are ``bench_cache.py``'s (small on CPU, paper scale on CUDA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cache as bc

from freezert.bench import CACHED, FLOOR, FREEZERT, EpochVariant


def run(family: str, rounds: int) -> dict[str, float]:
    config, task, batches = bc.make_task(family)
    variants = {n: EpochVariant(n, task, config, bc.DEVICE, batches) for n in (CACHED, FLOOR, FREEZERT)}
    for v in variants.values():
        v.step(None, None, task.warm)
        for i, (s, b) in enumerate(batches):  # the cached variant's fill epoch; a warm-up for the others
            v.step(i, s, b)
    filled = variants[CACHED].counters()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(rounds):
        i = r % len(batches)
        s, b = batches[i]
        for n, v in variants.items():
            times[n].append(v.step(i, s, b))
    misses = variants[CACHED].counters()["misses"] - filled["misses"]
    if misses:
        raise RuntimeError(f"the cached variant missed {misses} rows after its fill epoch")
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", choices=["yolo", "encoder"], default=["yolo", "encoder"])
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    print(f"device {bc.DEVICE}, scale {bc.SCALE}, torch {torch.__version__}, {a.rounds} rounds")
    print(f"{'family':<8} {'variant':<16} {'median ms':>10} {'/ floor':>8}")
    for family in a.family:
        med = run(family, a.rounds)
        for n, t in med.items():
            print(f"{family:<8} {n:<16} {t:>10.2f} {t / med[FLOOR]:>7.3f}x")


if __name__ == "__main__":
    main()
