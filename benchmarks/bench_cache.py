"""The feature cache's training step: cached (epochs 2+) vs the floor vs freezert without the cache.

Run: ``pytest benchmarks/bench_cache.py --benchmark-only``. The floor trains the trainable part alone on
boundary features precomputed into device memory; the cached step reads them back from ``FeatureCache``
(fp16, where="auto") after one fill epoch; the uncached step runs the frozen prefix every time.
On CUDA: the paper's scale (yolov5m 512 px batch 48; the encoder at BERT-base width, L 256, batch 32, freeze 8
of 12), peak memory in ``extra_info``. Without CUDA: yolov5n 64 px batch 2 and a narrow encoder, L 32, batch 4.
``FREEZERT_BENCH_SCALE`` = ``small`` or ``paper`` overrides the choice. ``freezert bench --cache`` runs the
whole comparison (full fine-tune and naive freeze too, epoch by epoch) with ratios.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from freezert.bench import (
    CACHED,
    FLOOR,
    FREEZERT,
    CacheConfig,
    EncoderTask,
    EpochVariant,
    TrainConfig,
    YoloTask,
    epoch_batches,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SCALE = os.environ.get("FREEZERT_BENCH_SCALE", "paper" if CUDA else "small")
if SCALE not in ("small", "paper"):
    raise ValueError(f"FREEZERT_BENCH_SCALE={SCALE!r}: use 'small' or 'paper'")
if SCALE == "paper" and not CUDA:
    pytestmark = pytest.mark.skip(reason="FREEZERT_BENCH_SCALE=paper needs CUDA (BERT-base/yolov5m sizes)")

STEPS = 4  # distinct batches in the dataset: the cached step cycles over stored rows, as an epoch does
if SCALE == "paper":
    YOLO = dict(model="yolov5m", img=512, batch=48)
    ENCODER = dict(seq_len=256, batch=32)  # BERT-base width on CUDA (d_model 768, 12 heads, ff 3072)
    ROUNDS, WARMUP = 20, 3
else:
    YOLO = dict(model="yolov5n", img=64, batch=2)
    ENCODER = dict(seq_len=32, batch=4)  # d_model 128 on CPU
    ROUNDS, WARMUP = 8, 1
FREEZE = {"yolo": 10, "encoder": 8}


def make_task(family: str):
    """(training config, task, one epoch's (slice, batch) pairs) at this file's sizes for ``family``."""
    config = TrainConfig(freeze=FREEZE[family])
    torch.manual_seed(0)
    if family == "yolo":
        task = YoloTask(**YOLO, dataset_size=STEPS * YOLO["batch"], freeze=config.freeze, device=DEVICE)
    else:
        task = EncoderTask(**ENCODER, dataset_size=STEPS * ENCODER["batch"], freeze=config.freeze, device=DEVICE)
    batch = (YOLO if family == "yolo" else ENCODER)["batch"]
    return config, task, epoch_batches(task, batch, STEPS * batch)


@pytest.fixture(scope="module", params=["yolo", "encoder"])
def setup(request):
    return (request.param, *make_task(request.param))


@pytest.mark.parametrize("variant", [CACHED, FLOOR, FREEZERT])
def test_cache_step(benchmark, setup, variant):
    family, config, task, batches = setup
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.synchronize(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
    v = EpochVariant(variant, task, config, DEVICE, batches, CacheConfig())
    for _ in range(WARMUP):
        v.step(None, None, task.warm)
    if variant == CACHED:
        for i, (s, b) in enumerate(batches):  # the fill epoch (not timed)
            v.step(i, s, b)
        filled = v.counters()
    it = iter(range(10**9))

    def step():
        i = next(it) % len(batches)
        s, b = batches[i]
        return v.step(i, s, b)

    benchmark.group = f"cache-{family}-{SCALE}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    info = dict(
        variant=variant,
        family=family,
        freeze=config.freeze,
        batch=len(batches[0][1][0]),
        device=str(DEVICE),
        trainable_params=v.result.trainable,
        peak_mem_bytes=(torch.cuda.max_memory_allocated(DEVICE) - base) if CUDA else None,
        peak_mem_note="torch.cuda.max_memory_allocated less the resident dataset" if CUDA else "not measured on CPU",
    )
    if variant == CACHED:
        after = v.counters()
        info.update(
            hits=after["hits"] - filled["hits"],
            misses=after["misses"] - filled["misses"],
            cache_bytes=v.fm.cache.stats()["bytes"],
        )
        calls = next(it)  # steps taken: ROUNDS + 1 warm-up, or 1 under --benchmark-disable
        assert info["misses"] == 0 and info["hits"] == calls * info["batch"]  # every timed step was a hit
    benchmark.extra_info.update(info)
    assert v.result.loss is not None and v.result.loss == v.result.loss


@pytest.mark.parametrize("variant", ["extend", "refill"])
def test_deeper_freeze_epoch(benchmark, variant):
    """The first epoch after freezing moves from 6 to 10 blocks, with a filled cache: carried to the new cut
    ("extend": only blocks 6..9 run on the stored rows) vs started over ("refill": the prefix runs again)."""
    import copy

    import freezert

    _, task, batches = make_task("yolo")
    xs = [b[0] for _, b in batches]

    def fresh():
        fm = freezert.wrap(copy.deepcopy(task.initial).to(DEVICE), freeze=6, cache="fp16").eval()
        with torch.no_grad():
            for x in xs:
                fm(x)
        if variant == "extend":
            fm.set_freeze(10)
        else:  # what a cache that cannot extend costs: a new one at the new depth
            fm = freezert.wrap(fm.unwrap(), freeze=10, cache="fp16").eval()
        return (fm,), {}

    def epoch(fm):
        with torch.no_grad():
            for x in xs:
                fm(x)
        if CUDA:
            torch.cuda.synchronize(DEVICE)
        return fm

    benchmark.group = f"cache-deeper-{SCALE}"
    fm = benchmark.pedantic(epoch, setup=fresh, rounds=ROUNDS, iterations=1)
    st = fm.cache.stats()
    n = sum(len(x) for x in xs)
    assert st["extended"] == (n if variant == "extend" else 0)
    assert st["misses"] == n  # extend: the fill at depth 6 only; refill: the new cache's fill at depth 10
    assert st["hits"] == (n if variant == "extend" else 0)
    benchmark.extra_info.update(variant=variant, rows=n, extended=st["extended"], device=str(DEVICE))
