"""Subprocess helper for tests/test_cache.py: writes or reads a disk-tier FeatureCache in a fresh process.

python -m tests._cache_worker write PATH N   stores rows 0..N-1 (relies on the exit-time index flush)
python -m tests._cache_worker read PATH N    prints JSON {hits, max_err, stats} for keys 0..N-1 (+1 unknown key)
"""

from __future__ import annotations

import json
import sys

import torch

from freezert.cache import FeatureCache

FP = "feedc0de00000001"
LAYOUT = [((3, 5), torch.float32), ((7,), torch.float32)]


def rows(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(n, *s, generator=g) for s, _ in LAYOUT]


def main() -> None:
    mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = FeatureCache("fp32", "disk", "64MiB", path)
    cache.bind(FP, LAYOUT, torch.device("cpu"))
    keys = torch.arange(n, dtype=torch.int64) * 1000 + 7
    if mode == "write":
        cache.put(keys, rows(n))
        print(json.dumps({"rows": len(cache)}))
        return  # no flush(): the index is written at interpreter exit
    probe = torch.cat([keys, torch.tensor([99])])
    hit, got = cache.fetch(probe, "cpu")
    out = {"hits": hit.tolist(), "rows": len(cache)}
    if hit.any():
        want = [r[hit[:n]] for r in rows(n)]
        out["max_err"] = max(float((a - b).abs().max()) for a, b in zip(got, want))
    out["corrupt"] = cache.stats()["corrupt"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
