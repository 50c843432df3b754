"""Step time of ``wrap(model, freeze)`` against another checkout of freezert: the same training step, each
version in its own process, rounds alternated (this machine is noisy), per-round ratios reported.

    python benchmarks/bench_trunk.py --other /tmp/freezert-old [--rounds 8] [--steps 20]

``--other`` is a source tree of freezert (e.g. ``git worktree add /tmp/freezert-old <commit>`` with the built
``freezert/_C*.so`` copied in); this checkout is "this". Prints, per model, the median step time of each and
the median and quartiles of the per-round ratio this/other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODELS = ("yolov5n", "encoder", "resnet18", "bert")

_CHILD = r"""
import json, statistics, sys, time, warnings
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import freezert
name, steps, cached = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
if name == "yolov5n":
    from freezert.models import yolov5
    model, x, freeze = yolov5("n", nc=3), torch.randn(4, 3, 128, 128), 10
    call = lambda fm: fm(x)
elif name == "encoder":
    from freezert.models import transformer_encoder
    model = transformer_encoder(vocab_size=100, d_model=64, nhead=4, num_layers=6, dim_ff=128, num_classes=3)
    x, freeze = torch.randint(0, 100, (8, 32)), 4
    call = lambda fm: fm(x)
elif name == "resnet18":
    import torchvision
    model, x, freeze = torchvision.models.resnet18(num_classes=5), torch.randn(4, 3, 96, 96), 3
    call = lambda fm: fm(x)
else:
    import transformers
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                  intermediate_size=128)
    model = transformers.BertForSequenceClassification(cfg)
    x, freeze = torch.randint(0, 100, (8, 32)), 4
    call = lambda fm: fm(input_ids=x).logits
fm = freezert.wrap(model, freeze, **({"cache": "fp16"} if cached else {})).train()
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

def out_sum(o):
    o = o[0] if isinstance(o, (list, tuple)) else o
    return o.float().sum() if isinstance(o, torch.Tensor) else sum(t.float().sum() for t in o)

for _ in range(3):
    out_sum(call(fm)).backward(); opt.step(); opt.zero_grad()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    out_sum(call(fm)).backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(times)))
"""


def _median(tree: str, name: str, steps: int, cached: bool) -> float:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, name, str(steps), "1" if cached else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="another freezert source tree")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cache", action="store_true", help="with cache='fp16' (epochs 2+ on the same batch)")
    a = p.parse_args(argv)
    this = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"{'model':<10} {'this ms':>9} {'other ms':>9} {'ratio med':>10} {'q1':>6} {'q3':>6}")
    for name in a.models.split(","):
        mine, theirs, ratios = [], [], []
        for r in range(a.rounds):
            order = [(this, mine), (a.other, theirs)] if r % 2 == 0 else [(a.other, theirs), (this, mine)]
            got = {}
            for tree, sink in order:
                got[tree] = _median(tree, name, a.steps, a.cache)
                sink.append(got[tree])
            ratios.append(got[this] / got[a.other])
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        print(
            f"{name:<10} {1e3 * statistics.median(mine):>9.2f} {1e3 * statistics.median(theirs):>9.2f} "
            f"{med:>9.3f}x {q1:>6.3f} {q3:>6.3f}"
        )


if __name__ == "__main__":
    main()
