"""The lean path's fixed cost per layer: Conv-BN-SiLU layers on a tiny input, eager against the lean op.

    python benchmarks/bench_lean_overhead.py [--layers 20] [--rounds 30] [--threads 1]

On a tiny input (1 x 8 x 4 x 4) the kernels cost almost nothing, so a step's time is the Python and dispatch each
layer costs: eager's (three modules, three autograd nodes) against the lean path's (one ``LeanConvBNAct`` under
``recompute_saved()``: the BN+act autograd Function, the output's recipe, the convolution's saves as recipes, the
rebuild in backward). Prints microseconds per layer (forward + backward) for

* eager: ``nn.Sequential(conv, bn, SiLU)`` layers, plain autograd;
* eager under no-op saved-tensor hooks (what any Python hook on every save costs);
* lean: the same layers as ``LeanConvBNAct`` inside ``recompute_saved()`` (what ``wrap()``'s defaults run);

each step alternated with the others, and the median of each round's ratio to eager. The difference is a fixed
cost per layer: at a real input it weighs as much as it is against that layer's kernels (``docs/MEMORY.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch import nn

from freezert.ops import recompute_saved
from freezert.ops.lean_modules import LeanConvBNAct


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
            for _ in range(args.layers)
        ]
    )
    lean = copy.deepcopy(eager)
    for i in range(args.layers):
        lean[i] = LeanConvBNAct(lean[i], ("0", "1", "2"), "silu")
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    variants = {
        "eager": (eager, contextlib.nullcontext),
        "eager, no-op hooks": (eager, lambda: torch.autograd.graph.saved_tensors_hooks(_same, _same)),
        "lean": (lean, recompute_saved),
    }

    def step(model, ctx) -> None:
        with ctx():
            y = model(x)
        y.sum().backward()

    for model, ctx in variants.values():
        for _ in range(5):
            step(model, ctx)
    per: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotated
        for name in names:
            model, ctx = variants[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, ctx)
            per[name].append((time.perf_counter() - t0) / args.steps / args.layers * 1e6)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.layers} layers, 1x8x4x4, {args.rounds} rounds")
    for name, ts in per.items():
        ratio = statistics.median(a / b for a, b in zip(ts, per["eager"]))
        print(f"{name:20s} {statistics.median(ts):7.1f} us/layer  {ratio:.2f}x eager")


if __name__ == "__main__":
    main()
