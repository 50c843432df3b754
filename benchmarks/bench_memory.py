"""Memory beyond naive freezing (issues 12, 15), measured: lean trainable part, recomputation, one-byte weights.

    python benchmarks/bench_memory.py [--sections lean recompute quant converge] [--models yolov8n resnet50 ...]
                                      [--rounds 12] [--threads 1] [--steps 300]

Bytes saved for backward are counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages,
parameters and buffers excluded, saves made during backward not counted) over one training step; the lean
section does it on the real configurations people fine-tune (float64, so every gradient can be compared bit
for bit with naive freezing's), names what the lean plan still keeps (by the op that made each kept tensor),
and times both in float32: variants alternate step by step, each step's thread CPU time and wall time are
taken, and the per-round ratio lean / naive is reported as median and interquartile range. The quant section
measures one-byte frozen weights at the frozen part's output, against fp16/bf16 weights on the same model.
Prints markdown tables (docs/OPS.md, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from freezert.bench.zoo import naive_freeze_modules
from freezert.memory import SavedMeter, checkpointed, forward_flops, plan_recompute, saved_bytes
from freezert.models import calibrate_batchnorm, cnn_classifier, detection_loss, detection_targets_like, yolov5
from freezert.ops import _exact, lean_plan, plan_substitutions, swapped
from freezert.quant import quantize_frozen_, quantized_bytes

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _skip(frozen: list[str]) -> Callable[[str], bool]:
    return lambda n: any(n == f or n.startswith(f + ".") or f.startswith(n + ".") for f in frozen)


def _freeze(model: nn.Module, frozen: list[str]) -> nn.Module:
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    return model


# --- the zoo: (model, frozen block names, input, loss) ------------------------------------------------------


def _yolo(size="n", px=128, batch=4):
    torch.manual_seed(0)
    m = yolov5(size).to(DEV)
    x = torch.rand(batch, 3, px, px, device=DEV)
    with torch.no_grad():
        t = detection_targets_like(m(x), torch.Generator().manual_seed(1))
    return m, [f"model.{i}" for i in range(10)], (lambda mm: detection_loss(mm(x), t))


def _cnn(px=64, batch=8):
    torch.manual_seed(0)
    m = cnn_classifier(width=32).to(DEV)
    x = torch.rand(batch, 3, px, px, device=DEV)
    y = torch.randint(0, 10, (batch,), device=DEV)
    return m, [f"features.{i}" for i in range(3)], (lambda mm: nn.functional.cross_entropy(mm(x), y))


def _mobilenet(px=96, batch=4):
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10, dropout=0.0).to(DEV)
    x = torch.rand(batch, 3, px, px, device=DEV)
    y = torch.randint(0, 10, (batch,), device=DEV)
    return m, [f"features.{i}" for i in range(10)], (lambda mm: nn.functional.cross_entropy(mm(x), y))


def _gpt2(layers=6, frozen=4):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=512,
        n_embd=128,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    m = transformers.GPT2LMHeadModel(cfg).to(DEV)
    ids = torch.randint(0, 512, (4, 64), device=DEV)
    names = ["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}" for i in range(frozen)]
    return m, names, (lambda mm: mm(ids, labels=ids).loss)


def _llama(layers=6, frozen=4):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    m = transformers.LlamaForCausalLM(cfg).to(DEV)
    ids = torch.randint(0, 512, (4, 64), device=DEV)
    names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(frozen)]
    return m, names, (lambda mm: mm(ids, labels=ids).loss)


ZOO = {
    "yolov5n freeze=10 (128 px, batch 4)": _yolo,
    "cnn_classifier w32, 3 of 6 stages frozen (64 px, batch 8)": _cnn,
    "torchvision mobilenet_v2, features[:10] frozen (96 px, batch 4)": _mobilenet,
    "GPT-2 config (6 x 128, 4 layers frozen, 4 x 64 tokens)": _gpt2,
    "Llama config (6 x 128, 4 layers frozen, 4 x 64 tokens)": _llama,
}


def _params(*models):
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


def _max_rel_grad_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()) if q.grad is not None]
    scale = max(q.abs().max().item() for _, q in pairs)
    return max((p - q).abs().max().item() for p, q in pairs) / scale


def _step(model, loss_fn, plan=None, ckpt=()):
    def run():
        model.zero_grad(set_to_none=True)
        with swapped(model, plan or []), checkpointed(model, ckpt):
            loss = loss_fn(model)
        loss.backward()

    return run


def _peak(fn) -> int | None:
    if DEV.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _alternate(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for k, f in fns.items():
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


# --- the models people fine-tune: (model, frozen block names, loss of one step, frozen part's output) ----------


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = [v for k, v in out.items() if k != "feats"]  # Ultralytics' training dict: feats are the inputs
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def _ultralytics(cfg: str, px: int, batch: int):
    from ultralytics.nn.tasks import DetectionModel

    with contextlib.redirect_stdout(io.StringIO()):
        m = DetectionModel(cfg, verbose=False)
    x = torch.rand(batch, 3, px, px)
    frozen = [f"model.{i}" for i in range(10)]
    saved = sorted({j for layer in m.model[10:] for j in ([layer.f] if isinstance(layer.f, int) else layer.f)})
    saved = [j for j in saved if 0 <= j < 10] + [9]

    def loss(mm):
        return sum(t.float().square().mean() for t in _flat(mm(x.to(next(mm.parameters()).dtype))))

    def boundary(mm):  # what the head reads from the frozen blocks (layers 4, 6, 9 of YOLOv8n)
        got, hs = [], [mm.model[j].register_forward_hook(lambda _m, _a, o: got.append(o)) for j in sorted(set(saved))]
        mm(x.to(next(mm.parameters()).dtype))
        for h in hs:
            h.remove()
        return torch.cat([t.flatten() for t in got])

    return m, frozen, loss, boundary


def _torchvision(name: str, frozen: list[str], stem: list[str], px: int, batch: int):
    import torchvision

    m = getattr(torchvision.models, name)()
    x, y = torch.rand(batch, 3, px, px), torch.randint(0, 1000, (batch,))

    def loss(mm):
        return nn.functional.cross_entropy(mm(x.to(next(mm.parameters()).dtype)), y)

    def boundary(mm):
        h = x.to(next(mm.parameters()).dtype)
        for n in stem:
            h = mm.get_submodule(n)(h)
        return h

    return m, frozen, loss, boundary


def _hf(kind: str, seq: int, batch: int, k: int = 8):
    import transformers

    if kind == "bert":
        m = transformers.BertForSequenceClassification(transformers.BertConfig())
        ids, lab = torch.randint(0, 30000, (batch, seq)), torch.randint(0, 2, (batch,))
        frozen = ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(k)]
        return m, frozen, (lambda mm: mm(input_ids=ids, labels=lab).loss), None
    if kind == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        ids = torch.randint(0, 50000, (batch, seq))
        frozen = ["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}" for i in range(k)]
        return (
            m,
            frozen,
            (lambda mm: mm(input_ids=ids, labels=ids).loss),
            (lambda mm: mm(input_ids=ids, output_hidden_states=True).hidden_states[k]),
        )
    if kind == "vit":
        m = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))
        x, y = torch.rand(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
        names = {n for n, _ in m.named_modules()}
        stack = "vit.encoder.layer" if "vit.encoder.layer.0" in names else "vit.layers"
        frozen = ["vit.embeddings"] + [f"{stack}.{i}" for i in range(k)]

        def pixels(mm):
            return x.to(next(mm.parameters()).dtype)

        return (
            m,
            frozen,
            (lambda mm: mm(pixel_values=pixels(mm), labels=y).loss),
            (lambda mm: mm(pixel_values=pixels(mm), output_hidden_states=True).hidden_states[k]),
        )
    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4
    )
    cfg.num_key_value_heads = 2
    m = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 2048, (batch, seq))
    frozen = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)]
    return m, frozen, (lambda mm: mm(input_ids=ids, labels=ids).loss), None


RESNET_FROZEN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]  # freezert's freeze=3 on a ResNet
TARGETS: dict[str, tuple[str, Callable]] = {
    "yolov8n": ("YOLOv8n (yolov8n.yaml), freeze=10, 320 px, batch 2", lambda: _ultralytics("yolov8n.yaml", 320, 2)),
    "yolo11n": ("YOLO11n (yolo11n.yaml), freeze=10, 320 px, batch 2", lambda: _ultralytics("yolo11n.yaml", 320, 2)),
    "resnet50": (
        "resnet50, stem + layer1 + layer2 frozen, 224 px, batch 4",
        lambda: _torchvision("resnet50", RESNET_FROZEN, RESNET_FROZEN, 224, 4),
    ),
    "mobilenet_v3": (
        "mobilenet_v3_large, features 0-7 frozen, 224 px, batch 4",
        lambda: _torchvision(
            "mobilenet_v3_large", [f"features.{i}" for i in range(8)], [f"features.{i}" for i in range(8)], 224, 4
        ),
    ),
    "bert": ("BERT-base, 8 of 12 layers frozen, 2 x 128 tokens, dropout 0.1", lambda: _hf("bert", 128, 2)),
    "gpt2": ("GPT-2 (124M), 8 of 12 layers frozen, 2 x 128 tokens, dropout 0.1", lambda: _hf("gpt2", 128, 2)),
    "vit": ("ViT-B/16, 8 of 12 layers frozen, 224 px, batch 2", lambda: _hf("vit", 0, 2)),
    "llama": ("Llama config 6 x 256, 4 of 6 layers frozen, 2 x 128 tokens", lambda: _hf("llama", 128, 2)),
}


def _kept(step, exclude) -> SavedMeter:
    """What one step keeps for backward (``.total``, ``.per_op``)."""
    with SavedMeter(exclude=exclude) as meter:
        step()
    return meter


def _lean_step(model, loss_fn, plan, seed=3):
    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with swapped(model, plan):
            value = loss_fn(model)
        value.backward()

    return run


def _paired(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict]:
    """Alternate the variants step by step; per-variant medians and per-round ratios to the first variant."""
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()  # warm-up (the exactness probes, allocator)
    for _ in range(rounds):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            f()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    first = next(iter(fns))
    out = {}
    for k in fns:
        r = [a / b for a, b in zip(cpu[k], cpu[first])]
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0], r[0], r[0]]
        out[k] = {
            "cpu_ms": statistics.median(cpu[k]) * 1e3,
            "wall_ms": statistics.median(wall[k]) * 1e3,
            "ratio": statistics.median(r),
            "iqr": (q[0], q[2]),
        }
    return out


def section_lean(rounds: int, names: list[str]) -> None:
    print("\n### Lean trainable part on the models people fine-tune (`lean_plan` + `swapped`)\n")
    print("bytes saved for backward in one step, float64; time: float32, thread CPU time, lean / naive per round\n")
    print(
        "| model | naive freeze | lean | lean / naive | gradients vs naive | step CPU ms naive / lean "
        "| ratio median [IQR] |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    remains = {}
    for key in names:
        label, build = TARGETS[key]
        torch.manual_seed(0)
        try:
            base, frozen, loss_fn, _ = build()
        except ImportError as e:
            print(f"| {label} | skipped: {e} |")
            continue
        naive = naive_freeze_modules(base.double(), frozen)
        lean = copy.deepcopy(naive)
        plan = lean_plan(lean, skip=_skip(frozen))
        ex = _params(naive, lean)
        k_naive = _kept(_lean_step(naive, loss_fn, []), ex)
        k_lean = _kept(_lean_step(lean, loss_fn, plan), ex)
        pairs = [(a.grad, b.grad) for a, b in zip(lean.parameters(), naive.parameters()) if b.grad is not None]
        identical = all(_exact.same_bits(a, b) for a, b in pairs)
        diff = 0.0 if identical else _max_rel_grad_diff(lean, naive)
        naive.float()
        lean.float()
        t = _paired({"naive": _lean_step(naive, loss_fn, []), "lean": _lean_step(lean, loss_fn, plan)}, rounds)
        lo, hi = t["lean"]["iqr"]
        print(
            f"| {label} | {k_naive.total / 2**20:.1f} MiB | {k_lean.total / 2**20:.1f} MiB "
            f"| {k_lean.total / k_naive.total:.2f}x | {'bit-identical' if identical else f'max rel {diff:.1e}'} "
            f"| {t['naive']['cpu_ms']:.0f} / {t['lean']['cpu_ms']:.0f} "
            f"| {t['lean']['ratio']:.3f} [{lo:.3f}, {hi:.3f}] |"
        )
        remains[label] = (k_naive.per_op, k_lean.per_op)
    print("\n#### What the lean plan still keeps (MiB, by the op that made the kept tensor; naive alongside)\n")
    for label, (cn, cl) in remains.items():
        top = sorted(set(cn) | set(cl), key=lambda k: -cl.get(k, 0))
        parts = [f"{k} {cl.get(k, 0) / 2**20:.1f} ({cn.get(k, 0) / 2**20:.1f})" for k in top if cl.get(k, 0) > 0]
        print(f"* {label}: " + ", ".join(parts))


def section_recompute(rounds: int) -> None:
    print("\n### Budgeted recomputation: yolov5n freeze=10 (128 px, batch 4), head blocks 10-24\n")
    full, frozen, loss_fn = _yolo()
    naive = _freeze(full, frozen)
    head = {str(i): naive.model[i] for i in range(10, len(naive.model))}
    ex = _params(naive)
    with SavedMeter(head, ex) as meter:
        _step(naive, loss_fn)()
    per = meter.per_block
    fixed = per.pop(None, 0)
    total = fixed + sum(per.values())
    ref = [p.grad.clone() for p in naive.parameters() if p.grad is not None]
    flops = forward_flops(lambda: loss_fn(naive), head)
    every = [f"model.{k}" for k, v in per.items() if v > 0]
    variants = {"none": []}
    variants["every block"] = every
    for frac in (0.75, 0.6):
        budget = int(total * frac)
        chosen = plan_recompute(per, budget, cost=flops, inputs=meter.inputs, outputs=meter.outputs, fixed=fixed)
        variants[f"planned, budget {frac:.2f}x none ({budget:,} B)"] = sorted(
            (f"model.{k}" for k in chosen), key=lambda s: int(s.split(".")[1])
        )
    rows, fns = [], {}
    for label, names in variants.items():
        fn = _step(naive, loss_fn, ckpt=names)
        b = saved_bytes(fn, exclude=ex)
        got = [p.grad for p in naive.parameters() if p.grad is not None]
        diff = max((a - r).abs().max().item() for a, r in zip(got, ref)) / max(r.abs().max().item() for r in ref)
        recompute = sum(flops[n.split(".")[1]] for n in names)
        rows.append((label, names, b, diff, recompute))
        fns[label] = fn
    ms = _alternate(fns, rounds)
    print("| checkpointed | blocks | saved bytes | / none | recomputed fwd GFLOP | max grad diff | step ms | / none |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, names, b, diff, rc in rows:
        short = ", ".join(n.split(".")[1] for n in names) if names else "-"
        print(
            f"| {label} | {short} | {b:,} | {b / rows[0][2]:.2f}x | {rc / 1e9:.3f} | {diff:.1e} "
            f"| {ms[label]:.1f} | {ms[label] / ms['none']:.2f}x |"
        )
    try:
        plan_recompute(per, fixed, inputs=meter.inputs, outputs=meter.outputs, fixed=fixed)
    except Exception as e:  # the refusal a too-small budget gets
        print(f"\nbudget = the loss's own bytes ({fixed:,} B): `{type(e).__name__}: {e}`")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b - mean(b)||: relative to the output's spread, not to a constant offset (YOLO's biases)."""
    b = b.float()
    return ((a.float() - b).norm() / (b - b.mean()).norm()).item()


def _fold_pairs(model: nn.Module) -> None:
    """Fold each Conv2d into the BatchNorm right after it (convN/bnN, conv/bn, Sequential neighbours), with
    freezert.fold as the frozen segment folds its private copy."""
    from freezert.fold import after_fold, fold_

    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, n in enumerate(names):
            conv = parent._modules[n]
            if not isinstance(conv, nn.Conv2d):
                continue
            if n.startswith("conv") and "bn" + n[4:] in parent._modules:
                bn_name = "bn" + n[4:]
            elif i + 1 < len(names) and isinstance(parent._modules[names[i + 1]], nn.BatchNorm2d):
                bn_name = names[i + 1]
            else:
                continue
            bn = parent._modules[bn_name]
            rep = after_fold(bn) if isinstance(bn, nn.BatchNorm2d) else None
            if rep is not None:
                fold_(conv, bn)
                parent._modules[bn_name] = rep


def _cast_weights(model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
    for name in names:
        for m in model.get_submodule(name).modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(m).__name__ == "Conv1D":
                m._parameters["weight"] = nn.Parameter(w.detach().to(dtype).float(), requires_grad=False)


SMALL = 16384  # layers with fewer weights kept in float by the "+ small kept" variants (min_weights)
QUANT_VARIANTS = {
    "fp16 weights": ("cast", torch.float16, 0),
    "bf16 weights": ("cast", torch.bfloat16, 0),
    "int8 per channel": ("int8", None, 0),
    "int8 groups of 32": ("int8", 32, 0),
    "int8 g32 + small kept": ("int8", 32, SMALL),
    "fp8 per channel": ("fp8", None, 0),
    "fp8 g32 + small kept": ("fp8", 32, SMALL),
}


def section_quant(names: list[str]) -> None:
    print("\n### One-byte frozen weights: error at the frozen part's output (what the trainable part reads)\n")
    print(
        "random weights, BatchNorm statistics calibrated on the input then folded into the convolutions (as the "
        "frozen segment does); every Linear / Conv of the frozen part quantized (weight only, dequantize path); "
        "error = ||out_q - out|| / ||out - mean(out)||; fp16 / bf16 weights show how much this model amplifies "
        f"a weight perturbation; small kept: layers under {SMALL} weights stay in float (`min_weights`)\n"
    )
    print(
        "| model | frozen layers | "
        + " | ".join(QUANT_VARIANTS)
        + " | int8 bytes (+ scales, per ch / g32) | weights kept in float |"
    )
    print("|---|---:|" + "---:|" * len(QUANT_VARIANTS) + "---:|---:|")
    for key in names:
        label, build = TARGETS[key]
        torch.manual_seed(0)
        try:
            model, frozen, _, boundary = build()
        except ImportError as e:
            print(f"| {label} | skipped: {e} |")
            continue
        if boundary is None:
            continue
        _calibrate(model, boundary)
        _fold_pairs(model)
        with torch.no_grad():
            ref = boundary(model)
        row, nbytes = [], []
        count, small = 0, 0.0
        for kind, arg, least in QUANT_VARIANTS.values():
            q = copy.deepcopy(model)
            if kind == "cast":
                _cast_weights(q, frozen, arg)
            else:
                inside = _skip(frozen)
                done = quantize_frozen_(q, kind, group_size=arg, min_weights=least, filter=lambda n, _m, f=inside: f(n))
                if least:
                    layers = [m for n, m in model.named_modules() if inside(n) and hasattr(m, "weight")]
                    layers = [
                        m for m in layers if isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "Conv1D"
                    ]
                    total = sum(m.weight.numel() for m in layers)
                    small = sum(m.weight.numel() for m in layers if m.weight.numel() < least) / max(1, total)
                else:
                    count = len(done)
                if kind == "int8" and not least:
                    nbytes.append(quantized_bytes(q))
            with torch.no_grad():
                row.append(f"{_rel(boundary(q), ref) * 100:.2f}%")
        w = nbytes[0]["weights"]
        sizes = f"{w / 2**20:.1f} MiB (+{nbytes[0]['scales'] / 2**10:.0f} / {nbytes[1]['scales'] / 2**10:.0f} KiB)"
        print(f"| {label} | {count} | " + " | ".join(row) + f" | {sizes} | {small * 100:.1f}% |")


def _calibrate(model: nn.Module, boundary: Callable) -> None:
    """Running statistics of the activations the frozen part makes (a cumulative average over one pass), as a
    pretrained network's BatchNorms would hold: fresh ones (mean 0, var 1) would mis-scale every activation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        boundary(model)
    model.eval()


def section_converge(steps: int, optimizer: str = "adam") -> None:
    opt_label = "Adam 1e-3" if optimizer == "adam" else "SGD 0.01 momentum 0.9"
    print(f"\n### Demo loss over {steps} steps: yolov5n freeze=10, 64 px, batch 4, 8 fixed batches, {opt_label}\n")
    torch.manual_seed(0)
    base = yolov5("n").to(DEV)
    gen = torch.Generator().manual_seed(2)
    data = [torch.rand(4, 3, 64, 64, generator=gen).to(DEV) for _ in range(8)]
    calibrate_batchnorm(base, torch.cat(data))
    with torch.no_grad():
        targets = [detection_targets_like(base(x), gen) for x in data]
    frozen = [f"model.{i}" for i in range(10)]

    def variant(kind):
        m = _freeze(copy.deepcopy(base), frozen)
        for name in frozen:  # frozen BatchNorm in eval mode, as freezert's default bn="frozen"
            m.get_submodule(name).eval()
        plan = []
        if kind == "lean":
            plan = plan_substitutions(m, skip=_skip(frozen), impl="lean")
        elif kind in ("int8", "fp8"):
            for name in frozen:
                quantize_frozen_(m.get_submodule(name), kind)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = (
            torch.optim.Adam(params, lr=1e-3) if optimizer == "adam" else torch.optim.SGD(params, lr=0.01, momentum=0.9)
        )
        return m, plan, opt

    runs = {k: variant(k) for k in ("naive", "lean", "int8", "fp8")}
    curves = {k: [] for k in runs}
    for s in range(steps):
        x, t = data[s % 8], targets[s % 8]
        for k, (m, plan, opt) in runs.items():
            m.train()
            for name in frozen:
                m.get_submodule(name).eval()
            with swapped(m, plan):
                loss = detection_loss(m(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curves[k].append(loss.item())
    print("| variant | loss, first 8 steps | loss, last 8 steps | last / first | last 8 vs naive |")
    print("|---|---:|---:|---:|---:|")
    ref = statistics.mean(curves["naive"][-8:])
    for k, c in curves.items():
        first, last = statistics.mean(c[:8]), statistics.mean(c[-8:])
        print(f"| {k} | {first:.5f} | {last:.5f} | {last / first:.3f} | {last / ref:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="*", default=["lean", "recompute", "quant", "converge"])
    ap.add_argument("--models", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--rounds", type=int, default=12, help="alternating timing rounds per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the convergence check")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="of the convergence check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, device {DEV}, {torch.get_num_threads()} threads")
    if "lean" in args.sections:
        section_lean(args.rounds, args.models)
    if "recompute" in args.sections:
        section_recompute(args.rounds)
    if "quant" in args.sections:
        section_quant([m for m in args.models if m in ("resnet50", "yolov8n", "vit", "gpt2", "mobilenet_v3")])
    if "converge" in args.sections:
        section_converge(args.steps, args.optimizer)


if __name__ == "__main__":
    main()
