"""Issue 15's table: naive freezing against ``wrap(model, freeze)`` and each option, on the models people fine-tune.

    python benchmarks/bench_defaults.py [--models yolov8n yolo11n resnet50 mobilenet_v3 bert gpt2 vit ...]
                                        [--rounds 30] [--budget 150] [--threads 1] [--json PATH]
                                        [--no-check | --check-only] [--options "kernels=False" ...]

Per model (real configurations, random weights, nothing downloaded; BatchNorm statistics calibrated on the input
as a pretrained network's would be):

* ``freezert.bench.measure`` (what ``freezert bench --model M --input SHAPE`` runs) over naive freezing, the
  defaults, ``kernels="lean"`` (the lean path on every tensor, not only the large ones), ``kernels=False``,
  ``cache="fp16"`` (timed steps all served from the cache: the second epoch), ``memory_budget``
  (``BUDGET_FRACTION`` of naive freezing's saved bytes: about half the defaults'), ``weights="int8"``,
  ``weights="fp8"`` and ``dtype=torch.bfloat16``, each on its own copy, stepped in turn one step per round (order
  rotated), float32: saved-for-backward bytes, step time, the largest output difference;
* the exactness check, float64 on a smaller input: the defaults, ``kernels="lean"``, ``kernels=False`` and naive
  freezing over two calls (the second one trains): every trainable gradient, output and buffer compared bit for
  bit, and the bytes each saves for backward; "unfolded" (the defaults with the frozen BatchNorm folding patched
  out) tells the folding's rounding from the lean path's;
* what naive freezing and the defaults keep for backward, by the op that made each saved tensor;
* the output error of the lossy options at the model output, float32 on the benchmark input:
  ``||out - naive|| / ||naive - mean(naive)||`` (the max-based figure is in the table).

The factories (``yolov8n``, ``resnet50``, ...) also serve ``freezert bench --model benchmarks.bench_defaults:yolov8n
--input 2,3,320,320 --freeze 10`` from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import time
import warnings
from contextlib import nullcontext as _nothing
from unittest import mock

import torch
from torch import nn

import freezert
from freezert.bench import Option, format_options_table, loss_of, measure, options_json
from freezert.bench.catalog import NAIVE
from freezert.bench.zoo import naive_freeze, output_tensors
from freezert.memory import SavedMeter
from freezert.models import calibrate_batchnorm

# --- the models: no-argument factories (also for ``freezert bench --model benchmarks.bench_defaults:NAME``) -----


def _ultralytics(cfg: str) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        return DetectionModel(cfg, verbose=False)


def yolov8n() -> nn.Module:
    """Ultralytics YOLOv8n from its yaml (80 classes), random weights."""
    return _ultralytics("yolov8n.yaml")


def yolo11n() -> nn.Module:
    """Ultralytics YOLO11n from its yaml (80 classes), random weights."""
    return _ultralytics("yolo11n.yaml")


def resnet50() -> nn.Module:
    """torchvision ResNet-50, random weights."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50()


def mobilenet_v3() -> nn.Module:
    """torchvision MobileNetV3-Large, random weights."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_large()


def bert() -> nn.Module:
    """transformers BERT-base (BertConfig() defaults, dropout 0.1) with a 2-class sequence classifier."""
    import transformers

    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig())


def gpt2() -> nn.Module:
    """transformers GPT-2 124M (GPT2Config() defaults, dropout 0.1) with its tied LM head; no KV cache returned."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False))


def gpt2_no_embd_dropout() -> nn.Module:
    """GPT-2 as :func:`gpt2` with ``embd_pdrop=0``: the embedding dropout (``transformer.drop``, outside every
    block, so in train mode under naive freezing too) makes the frozen layers' input random, so no cache can
    serve it; attention and residual dropout stay at 0.1."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False, embd_pdrop=0.0))


def vit() -> nn.Module:
    """transformers ViT-B/16 at 224 px (ViTConfig() defaults) with a 10-class classifier."""
    import transformers

    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))


# name -> (label, factory, freeze, bench input shape, check input shape, token vocabulary or None for images)
MODELS = {
    "yolov8n": ("YOLOv8n (yolov8n.yaml)", yolov8n, 10, (2, 3, 320, 320), (1, 3, 128, 128), None),
    "yolo11n": ("YOLO11n (yolo11n.yaml)", yolo11n, 10, (2, 3, 320, 320), (1, 3, 128, 128), None),
    "resnet50": ("resnet50 (stem+layer1+layer2)", resnet50, 3, (4, 3, 160, 160), (2, 3, 64, 64), None),
    "mobilenet_v3": ("mobilenet_v3_large (features 0-7)", mobilenet_v3, 8, (4, 3, 224, 224), (2, 3, 96, 96), None),
    "bert": ("BERT-base (8 of 12 layers)", bert, 8, (4, 64), (2, 16), 30000),
    "gpt2": ("GPT-2 124M (8 of 12 layers)", gpt2, 8, (4, 64), (2, 16), 50000),
    "gpt2_no_embd_dropout": (
        "GPT-2 124M, embd_pdrop=0 (8 of 12 layers)",
        gpt2_no_embd_dropout,
        8,
        (4, 64),
        (2, 16),
        50000,
    ),
    "vit": ("ViT-B/16 (8 of 12 layers)", vit, 8, (2, 3, 224, 224), (1, 3, 224, 224), None),
}

OPTIONS = [
    Option(NAIVE, naive=True),
    Option("freezert"),  # wrap(model, freeze): kernels="auto", the exact lean path on tensors of 2**17+ elements
    Option("kernels='lean'", {"kernels": "lean"}),  # the exact lean path on every tensor
    Option("kernels=False", {"kernels": False}),
    Option("cache='fp16'", {"cache": "fp16"}),
    Option("memory_budget", budget_fraction=0.5),
    Option("weights='int8'", {"weights": "int8"}),
    Option("weights='fp8'", {"weights": "fp8"}),
    Option("dtype=bfloat16", {"dtype": torch.bfloat16}),
]
# memory_budget= this fraction of naive freezing's saved bytes (measure()'s reference since c984c3b; the loss's own
# saves included, though the budget does not count them): the budgets of the recorded run (benchmarks/RESULTS.md,
# issue 15), about half of what the defaults' forward saves, so that each checkpoints some trainable blocks. measure()
# falls back to 0.75 and 0.9 where one is below the all-checkpointed minimum. The option runs on the defaults (the
# lean ops), as wrap(model, freeze, memory_budget=...) does.
BUDGET_FRACTION = {
    "yolov8n": 0.344,
    "yolo11n": 0.337,
    "resnet50": 0.30,
    "mobilenet_v3": 0.162,
    "bert": 0.335,
    "gpt2": 0.25,
    "gpt2_no_embd_dropout": 0.25,
    "vit": 0.311,
}
LOSSY = {
    "weights='int8'": {"weights": "int8"},
    "weights='fp8'": {"weights": "fp8"},
    "dtype=bfloat16": {"dtype": torch.bfloat16},
}


def _batch(shape: tuple, vocab: int | None, seed: int, dtype=torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if vocab is not None:
        return (torch.randint(0, vocab, shape, generator=g),)
    return (torch.rand(shape, generator=g, dtype=dtype),)


def _build(name: str) -> tuple[nn.Module, list[tuple]]:
    """The model (BatchNorm calibrated on the first batch) and the two benchmark batches."""
    _, factory, _, shape, _, vocab = MODELS[name]
    model = factory().train()
    batches = [_batch(shape, vocab, 1), _batch(shape, vocab, 2)]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        with torch.no_grad():
            calibrate_batchnorm(model, batches[0])
    return model, batches


def _forward(module: nn.Module, batch: tuple, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # dropout in the trainable part draws the same masks in every variant
    return [t.detach() for t in output_tensors(module(*batch))]


# --- exactness: float64, a smaller input ---------------------------------------------------------------------


def _first_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, float]:
    """How many entries differ at all, and the largest |a - b| over the largest |b| of all entries (a global
    scale: a gradient that is zero up to rounding, 1e-18, would make a per-tensor ratio meaningless)."""
    n, diff, scale = 0, 0.0, 0.0
    for k, t in b.items():
        u = a[k]
        if t is not None and t.numel():
            scale = max(scale, float(t.double().abs().max()))
        if u is None and t is None:
            continue
        if u is None or t is None or not torch.equal(u, t):
            n += 1
            both = u is not None and t is not None
            diff = max(diff, float((u.double() - t.double()).abs().max()) if both else float("inf"))
    return n, diff / scale if scale else diff


def check(name: str, model: nn.Module) -> dict:
    """Defaults, kernels="lean" and kernels=False against naive freezing and one another, float64: outputs,
    gradients, buffers, saved bytes.

    "unfolded" is the defaults with the frozen segment's BatchNorm folding turned off (a diagnostic through the
    private ``freezert.segment.after_fold``): it tells the folding's rounding from the lean path's."""
    _, _, freeze, _, shape, vocab = MODELS[name]
    base = copy.deepcopy(model).double().train()
    x = _batch(shape, vocab, 3, torch.float64)
    runs: dict[str, tuple[nn.Module, nn.Module]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", freezert.FreezeWarning)
        variants = (("freezert", {}), ("kernels='lean'", {"kernels": "lean"}), ("kernels=False", {"kernels": False}))
        for label, kwargs in (*variants, ("unfolded", {})):
            plain = copy.deepcopy(base)
            runs[label] = (freezert.wrap(plain, freeze, **kwargs), plain)
            with mock.patch("freezert.segment.after_fold", lambda bn: None) if label == "unfolded" else _nothing():
                _forward(runs[label][0], x)  # the recording call (its trainable BatchNorms move once, as naive's)
        frozen = {n for n, p in runs["freezert"][1].named_parameters() if not p.requires_grad}
        plain = naive_freeze(copy.deepcopy(base), frozen)
        runs[NAIVE] = (plain, plain)
        _forward(plain, x)
    got = {}
    for label, (module, plain) in runs.items():
        torch.manual_seed(0)
        with SavedMeter(exclude=[*module.parameters(), *module.buffers()]) as meter:
            out = module(*x)
            loss = loss_of(out)
        loss.backward()
        got[label] = {
            "saved": meter.total,
            "out": {str(i): t.detach() for i, t in enumerate(output_tensors(out))},
            "grad": {n: p.grad for n, p in plain.named_parameters() if p.requires_grad},
            "buf": {n: b.clone() for n, b in plain.named_buffers()},
        }
    res = {"input": list(shape), "trainable": len(got[NAIVE]["grad"]), "saved": {k: v["saved"] for k, v in got.items()}}
    pairs = (
        ("freezert", NAIVE),
        ("freezert", "kernels=False"),
        ("kernels='lean'", "kernels=False"),
        ("kernels=False", NAIVE),
        ("unfolded", NAIVE),
    )
    res["folded"] = runs["freezert"][0].segment.folded if runs["freezert"][0].segment is not None else 0
    for a, b in pairs:
        key = f"{a} vs {b}"
        res[key] = {part: _first_diff(got[a][part], got[b][part]) for part in ("out", "grad", "buf")}
    return res


# --- the lossy options' error at the model output, float32 on the benchmark input --------------------------


def output_errors(model: nn.Module, freeze, batch: tuple) -> dict[str, float]:
    ref_model = None
    errs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", freezert.FreezeWarning)
        for label, kwargs in LOSSY.items():
            plain = copy.deepcopy(model).train()
            fm = freezert.wrap(plain, freeze, **kwargs)
            _forward(fm, batch)  # records the plan (runs the segment unconverted)
            outs = _forward(fm, batch)
            if ref_model is None:
                frozen = {n for n, p in plain.named_parameters() if not p.requires_grad}
                ref_model = naive_freeze(copy.deepcopy(model).train(), frozen)
                _forward(ref_model, batch)  # the trainable BatchNorms move as often as the wrapped model's
                ref = _forward(ref_model, batch)
            num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, ref))
            den = sum(float((r.double() - r.double().mean()).pow(2).sum()) for r in ref)
            errs[label] = (num / den) ** 0.5
    return errs


# --- what each variant keeps, by the op that made each saved tensor (float32, the benchmark input) -------------


def saved_by_op(model: nn.Module, freeze, batch: tuple) -> dict[str, dict[str, int]]:
    """Naive freezing and the defaults: bytes saved for backward in one step, by the op that made each tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", freezert.FreezeWarning)
        plain = copy.deepcopy(model).train()
        fm = freezert.wrap(plain, freeze)
        _forward(fm, batch)
        frozen = {n for n, p in plain.named_parameters() if not p.requires_grad}
        naive = naive_freeze(copy.deepcopy(model).train(), frozen)
    out = {}
    for label, module in ((NAIVE, naive), ("freezert", fm)):
        torch.manual_seed(0)
        with SavedMeter(exclude=[*module.parameters(), *module.buffers()]) as meter:
            loss = loss_of(module(*batch))
        loss.backward()
        out[label] = meter.per_op
    return out


# --- the run -----------------------------------------------------------------------------------------------


def _row(name: str, data: dict) -> list[str]:
    """Markdown rows: option | saved MiB (x naive) | step ms median [IQR] | x naive median (95% interval) | err."""
    opts = data["bench"]["options"]
    naive = opts[NAIVE]
    rows = []
    for label, o in opts.items():
        if (
            o["wrap_options"] and "memory_budget" in o["wrap_options"]
        ):  # measure's label may name kernels it did not set
            b = int(o["wrap_options"]["memory_budget"])
            extra = "".join(f", {k}={v}" for k, v in o["wrap_options"].items() if k != "memory_budget")
            label = f"memory_budget={b / 2**20:.2f} MiB{extra}"
        if o["skipped"]:
            rows.append(f"| {name} | {label} | not run: {o['skipped']} | | | |")
            continue
        saved = f"{o['saved_bytes'] / 2**20:.1f} ({o['saved_bytes'] / naive['saved_bytes']:.2f}x)"
        step = f"{o['median_ms']:.0f} [{o['q1_ms']:.0f}-{o['q3_ms']:.0f}]"
        c = o["time_call_vs_naive"]
        if c is None:
            ratio = "1.00x"
        elif c["low"] is None:
            ratio = f"{c['median']:.2f}x (too few rounds)"
        else:
            ratio = f"{c['median']:.2f}x ({c['low']:.2f}-{c['high']:.2f})"
        err = "-" if o["rel_error"] is None else ("0" if o["max_error"] == 0 else f"{o['rel_error']:.1e}")
        norm = data.get("norm_errors", {}).get(label)
        if norm is not None:
            err += f" / {100 * norm:.2f}%"
        rows.append(f"| {name} | {label} | {saved} | {step} | {ratio} | {err} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per model, setup included (timed rounds end)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--options",
        nargs="+",
        default=None,
        choices=[o.label for o in OPTIONS[2:]],
        help="only these options beside naive freezing and the defaults (more rounds in the same time: the time "
        "target is read from a run of naive / defaults / kernels=False alone)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-check", action="store_true", help="skip the float64 exactness check")
    ap.add_argument("--check-only", action="store_true", help="only the float64 exactness check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    everything = {}
    if args.check_only:
        for name in args.models:
            model, batches = _build(name)
            by_op = saved_by_op(model, MODELS[name][2], batches[0])
            for variant, ops in by_op.items():
                top = ", ".join(f"{op} {n / 2**20:.1f}" for op, n in list(ops.items())[:10])
                print(f"{name} saved by op, MiB, {variant} ({sum(ops.values()) / 2**20:.1f} in all): {top}")
            everything[name] = {"by_op": by_op, "check": check(name, model)}
            print(f"{name} float64 check: {json.dumps(everything[name]['check'])}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everything, f, indent=1)
        return
    for name in args.models:
        label, _, freeze, shape, _, _ = MODELS[name]
        t0 = time.perf_counter()
        model, batches = _build(name)
        print(f"\n## {name}: {label}, freeze={freeze}, input {'x'.join(map(str, shape))}", flush=True)
        run = measure(
            model,
            batches,
            freeze,
            torch.device("cpu"),
            options=[
                Option(o.label, budget_fraction=BUDGET_FRACTION[name]) if o.budget_fraction else o
                for i, o in enumerate(OPTIONS)
                if i < 2 or args.options is None or o.label in args.options
            ],
            rounds=args.rounds,
            deadline=t0 + args.budget,
        )
        print(format_options_table(run, torch.device("cpu")))
        data = {"label": label, "freeze": freeze, "bench": options_json(run, {"input": list(shape)}, "")}
        ratios = {
            r.label: statistics.quantiles([a / b for a, b in zip(r.step_ms, run.results[0].step_ms)], n=4)
            for r in run.results[1:]
            if r.skipped is None and len(r.step_ms) >= 2
        }
        data["ratio_quartiles"] = ratios
        t1 = time.perf_counter()
        data["norm_errors"] = output_errors(model, freeze, batches[0])
        print(
            "output error ||out - naive|| / ||naive - mean||:", {k: f"{v:.2e}" for k, v in data["norm_errors"].items()}
        )
        data["by_op"] = saved_by_op(model, freeze, batches[0])
        for variant, ops in data["by_op"].items():
            top = ", ".join(f"{op} {n / 2**20:.1f}" for op, n in list(ops.items())[:10])
            print(f"saved by op, MiB, {variant}: {top}")
        if not args.no_check:
            data["check"] = check(name, model)
            print("float64 check:", json.dumps(data["check"]))
        data["seconds"] = {"bench": t1 - t0, "errors+check": time.perf_counter() - t1}
        print("\n".join(_row(name, data)), flush=True)
        everything[name] = data
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everything, f, indent=1, default=str)
    print("\n| model | option | saved MiB (x naive) | step ms median [IQR] | x naive (95% interval) | rel err |")
    print("|---|---|---:|---:|---:|---:|")
    for name, data in everything.items():
        print("\n".join(_row(name, data)))


if __name__ == "__main__":
    main()
