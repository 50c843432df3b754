"""Memory beyond naive freezing (issue 12), measured: lean trainable part, recomputation, low-precision frozen weights.

    python benchmarks/bench_memory.py [--sections lean recompute quant converge] [--rounds 20] [--steps 300]

Bytes saved for backward are counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages,
parameters and buffers excluded) over one training step (forward + loss + backward); on CUDA the peak of the
caching allocator is printed too. Every variant's gradients are checked against naive freezing's. Step times
alternate variant by variant, step by step, so a shared machine's drift hits all alike; medians are printed.
Prints markdown tables (the ones in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from freezert.memory import SavedMeter, checkpointed, forward_flops, plan_recompute, saved_bytes
from freezert.models import calibrate_batchnorm, cnn_classifier, detection_loss, detection_targets_like, yolov5
from freezert.ops import plan_substitutions, swapped
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


def section_lean(rounds: int) -> None:
    print("\n### Lean trainable part: saved-for-backward bytes of one step\n")
    print(
        '| model | full fine-tune | naive freeze | lean (`impl="lean"`) | lean / naive | lean / full '
        "| max grad diff / max grad | naive ms | lean ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, build in ZOO.items():
        full, frozen, loss_fn = build()
        naive = _freeze(copy.deepcopy(full), frozen)
        lean = copy.deepcopy(naive)
        plan = plan_substitutions(lean, skip=_skip(frozen), impl="lean")
        ex = _params(full, naive, lean)
        b_full = saved_bytes(_step(full, loss_fn), exclude=ex)
        b_naive = saved_bytes(_step(naive, loss_fn), exclude=ex)
        b_lean = saved_bytes(_step(lean, loss_fn, plan), exclude=ex)
        diff = _max_rel_grad_diff(lean, naive)
        ms = _alternate({"naive": _step(naive, loss_fn), "lean": _step(lean, loss_fn, plan)}, rounds)
        print(
            f"| {name} | {b_full:,} | {b_naive:,} | {b_lean:,} | {b_lean / b_naive:.2f}x | {b_lean / b_full:.2f}x "
            f"| {diff:.1e} | {ms['naive']:.1f} | {ms['lean']:.1f} |"
        )


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


def section_quant() -> None:
    print("\n### Low-precision frozen weights (weight-only, per-output-channel scales, dequantize path)\n")
    print("output error: ||out_q - out|| / ||out - mean(out)||, eval mode\n")
    print(
        "| model | frozen layers | fp32 bytes | int8 bytes (+ scales) | int8 output error | fp8 bytes (+ scales) "
        "| fp8 output error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    cases = {}
    m, frozen, _ = _llama()
    ids = torch.randint(0, 512, (2, 64), device=DEV)
    cases["Llama config 6 x 128, first 4 layers"] = (
        m,
        [f"model.layers.{i}" for i in range(4)],
        lambda mm: mm(ids).logits,
    )
    m, frozen, _ = _gpt2()
    cases["GPT-2 config 6 x 128, first 4 layers"] = (
        m,
        [f"transformer.h.{i}" for i in range(4)],
        lambda mm: mm(ids).logits,
    )
    # the example CNN / YOLO get the BatchNorm statistics a pretrained network would have (as the demo does):
    # fresh ones shrink every activation in eval mode, and the outputs would be the biases alone
    m, frozen, _ = _cnn()
    x = torch.rand(8, 3, 64, 64, device=DEV)
    calibrate_batchnorm(m, x)
    cases["cnn_classifier w32, stages 0-2"] = (m, frozen, lambda mm: mm(x))
    m, frozen, _ = _yolo()
    xy = torch.rand(2, 3, 128, 128, device=DEV)
    calibrate_batchnorm(m, xy)
    cases["yolov5n, blocks 0-9 (raw head outputs)"] = (
        m,
        frozen,
        lambda mm: torch.cat([t.flatten() for t in mm(xy)[1]]),
    )
    for label, (model, names, out) in cases.items():
        model.eval()
        with torch.no_grad():
            ref = out(model)
        row = [label]
        fp32 = None
        for fmt in ("int8", "fp8"):
            q = copy.deepcopy(model)
            done = [n for name in names for n in quantize_frozen_(q.get_submodule(name), fmt)]
            qb = {k: sum(quantized_bytes(q.get_submodule(n))[k] for n in names) for k in ("weights", "scales")}
            if fp32 is None:  # one byte a weight: the fp32 weights are four times the int8 ones
                fp32 = 4 * qb["weights"]
                row += [str(len(done)), f"{fp32:,}"]
            with torch.no_grad():
                err = _rel(out(q), ref)
            row += [f"{qb['weights']:,} (+{qb['scales']:,})", f"{err:.2e}"]
        print("| " + " | ".join(row) + " |")


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
    ap.add_argument("--rounds", type=int, default=20, help="alternating timing rounds per variant")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the convergence check")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="of the convergence check")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {DEV}, {torch.get_num_threads()} threads")
    if "lean" in args.sections:
        section_lean(args.rounds)
    if "recompute" in args.sections:
        section_recompute(args.rounds)
    if "quant" in args.sections:
        section_quant()
    if "converge" in args.sections:
        section_converge(args.steps, args.optimizer)


if __name__ == "__main__":
    main()
