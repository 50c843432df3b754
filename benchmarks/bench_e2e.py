"""One YOLOv5 training step: full fine-tune vs naive (YOLOv5-style) freeze vs freezert.wrap.

Run: ``pytest benchmarks/bench_e2e.py --benchmark-only`` (or ``pytest benchmarks/``).
On CUDA: the paper's scale (YOLOv5m width, 512 px, batch 48), peak memory from the CUDA allocator in
``extra_info``. Without CUDA: yolov5n, 128 px, batch 4, peak memory not measured. ``FREEZERT_BENCH_SCALE``
= ``small`` or ``paper`` overrides the choice. Each variant starts from the same initial weights and trains on
the same synthetic batch; every step is synchronised. ``freezert bench`` runs the same comparison
round-robin with ratios.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from freezert.bench import FREEZERT, FULL, NAIVE, TrainConfig, Variant, build_model, synthetic_batches

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SCALE = os.environ.get("FREEZERT_BENCH_SCALE", "paper" if CUDA else "small")
if SCALE == "paper":
    MODEL, IMG, BATCH, ROUNDS, WARMUP = "yolov5m", 512, 48, 20, 5
else:
    MODEL, IMG, BATCH, ROUNDS, WARMUP = "yolov5n", 128, 4, 10, 2
FREEZE = 10


@pytest.fixture(scope="module")
def initial():
    torch.manual_seed(0)
    return build_model(MODEL)


@pytest.fixture(scope="module")
def batch(initial):
    return synthetic_batches(initial, 1, BATCH, IMG, DEVICE)[0]


@pytest.mark.parametrize("variant", [FULL, NAIVE, FREEZERT])
def test_train_step(benchmark, initial, batch, variant):
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)
    v = Variant(variant, initial, TrainConfig(freeze=FREEZE), DEVICE)
    for _ in range(WARMUP):
        v.step(batch)
    benchmark.group = f"e2e-{MODEL}-{IMG}px-b{BATCH}"
    benchmark.pedantic(v.step, args=(batch,), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        variant=variant,
        model=MODEL,
        img=IMG,
        batch=BATCH,
        freeze=FREEZE,
        device=str(DEVICE),
        trainable_params=v.result.trainable,
        # the variant alone is resident: weights, optimizer state and the step's activations
        peak_mem_bytes=torch.cuda.max_memory_allocated(DEVICE) if CUDA else None,
        peak_mem_note="torch.cuda.max_memory_allocated" if CUDA else "not measured on CPU",
    )
    assert v.result.loss is not None and v.result.loss == v.result.loss  # finite, not NaN
