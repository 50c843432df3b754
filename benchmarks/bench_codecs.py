"""Measured round-trip error of each feature-cache codec, against the bound docs/CACHE.md states.

    python benchmarks/bench_codecs.py [--rows 512] [--dim 4096]

Rows go through a real ``FeatureCache`` (``put`` then ``fetch``: encode, escape rule, decode). Two kinds of data: a
standard normal (signed, the output of a norm layer) and ReLU-like (non-negative, half zeros: a conv block's
output). Per codec: bytes per row, the largest error relative to the row's max magnitude (what the stated bound
covers), and the largest error relative to the value itself among values at least 1/16 of the row's max (how
precise the typical large activation is). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from freezert._codecs import CODECS
from freezert.cache import FeatureCache


def roundtrip(codec: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    cache = FeatureCache(codec, "host", budget="4GiB")
    cache.bind("00000000000000c0", [((x.shape[1],), torch.float32)], "cpu")
    cache.put(range(x.shape[0]), [x])
    hit, (got,) = cache.fetch(range(x.shape[0]), "cpu")
    assert bool(hit.all())
    return got, cache.stats()["tiers"]["host"]["bytes_per_row"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--dim", type=int, default=4096)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(a.rows, a.dim, generator=g)
    data = {"normal": normal, "relu": torch.relu(torch.randn(a.rows, a.dim, generator=g)) * 3}
    print(f"{a.rows} rows of {a.dim} values; error of a put/fetch round trip to float32")
    print("| codec | data | bytes/row | stated bound (x amax) | max err / row amax | max err / value (>= amax/16) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for codec in ("fp32", "fp16", "bf16", "fp8"):
        for kind, x in data.items():
            got, per_row = roundtrip(codec, x)
            err = (got - x).abs()
            amax = x.abs().amax(1, keepdim=True)
            big = x.abs() >= amax / 16
            rel_amax = float((err / amax).max())
            rel_big = float((err[big] / x.abs()[big]).max())
            bound = CODECS[codec].rel
            bound_s = "exact" if bound == 0 else f"2^{int(torch.log2(torch.tensor(bound)))}"
            print(f"| {codec} | {kind} | {per_row:.0f} | {bound_s} | {rel_amax:.2e} | {rel_big:.2e} |")
            assert rel_amax <= bound, (codec, kind, rel_amax, bound)


if __name__ == "__main__":
    main()
