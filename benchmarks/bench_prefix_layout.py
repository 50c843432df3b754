"""The frozen prefix alone, as inference: naive (eval-mode BatchNorm, the model's layout), BatchNorm folded, and
folded in channels_last (what ``channels_last="auto"`` runs on CPU), its output handed back in the model's layout.

    python benchmarks/bench_prefix_layout.py [--models yolov8n yolo11n resnet50 mobilenet_v3] [--rounds 15]

The models and inputs of ``bench_defaults.py`` (real configurations, random weights, BatchNorm calibrated), the
prefix ``wrap(model, freeze)`` freezes there (YOLO: layers 0-9; resnet50: stem + layer1 + layer2; mobilenet_v3:
features 0-7), ``torch.no_grad()``, one thread; the three variants alternated one call each per round, the median
per variant, and the largest output difference from naive's over naive's largest output.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import bench_defaults as bd
import torch
from torch import nn

from freezert.fold import FoldScan, after_fold, fold_


def prefix(name: str, model: nn.Module) -> nn.Module:
    if name.startswith("yolo"):
        return nn.Sequential(*list(model.model)[:10])
    if name == "resnet50":
        return nn.Sequential(*list(model.children())[:6])
    return nn.Sequential(*list(model.features)[:8])


def folded(seq: nn.Module, x: torch.Tensor) -> nn.Module:
    seq = copy.deepcopy(seq)
    scan = FoldScan([seq])
    with torch.no_grad():
        seq(x)
    for conv, bn in scan.close():
        fold_(conv, bn)
        for parent in seq.modules():
            for key, child in parent._modules.items():
                if child is bn:
                    parent._modules[key] = after_fold(bn)
    return seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov8n", "yolo11n", "resnet50", "mobilenet_v3"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {args.threads} thread(s), oneDNN {torch.backends.mkldnn.is_available()}")
    for name in args.models:
        measure(name, args.rounds)


def measure(name: str, rounds: int) -> None:
    model, batches = bd._build(name)
    x = batches[0][0]
    naive = prefix(name, model).eval()
    fold = folded(naive, x)
    cl = copy.deepcopy(fold)
    for m in cl.modules():
        for key, t in list(m._parameters.items()):
            if t is not None and t.dim() == 4:
                m._parameters[key] = t.detach().contiguous(memory_format=torch.channels_last)
    variants = {
        "naive": lambda: naive(x),
        "folded": lambda: fold(x),
        "folded, channels_last": lambda: cl(x.contiguous(memory_format=torch.channels_last)).contiguous(),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        ref = naive(x)
        errs = {k: float((f() - ref).abs().max() / ref.abs().max()) for k, f in variants.items()}
        for _ in range(2):
            for f in variants.values():
                f()
        for _ in range(rounds):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["naive"])
    print(f"\n{name}: input {tuple(x.shape)}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:24s} {1e3 * med:7.1f} ms  {med / base:.2f}x naive  rel err {errs[k]:.1e}")


if __name__ == "__main__":
    main()
