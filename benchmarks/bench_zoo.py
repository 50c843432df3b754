"""The zoo against naive freezing on CPU: bytes saved for backward and step time (issue 9).

    python benchmarks/bench_zoo.py [--models tv_resnet50 hf_gpt2 ...] [--steps 60] [--quick] [--json PATH]

For each zoo model (torchvision, timm, Ultralytics, transformers; random weights, nothing downloaded; float32,
small CPU sizes) and one or two freeze depths:

* **saved bytes**: bytes autograd saves for backward in one training forward (+ loss), counted with
  ``freezert.memory.SavedMeter`` (``saved_tensors_hooks``, unique storages, parameters and buffers excluded), for
  naive freezing, freezert (uncached, and with ``cache="fp16"`` on a hit) and full fine-tuning;
* **step time**: forward + loss + backward + SGD step, naive vs freezert vs freezert with ``cache="fp16"``
  (its fill epoch untimed: every timed step is all hits, checked), all resident in one process and stepped in
  turn, one step each per round, the order rotated every round, so a shared machine's drift hits all alike;
  medians, the ratio of medians to naive and the quartiles of the per-round ratio (quartiles of the times in the
  JSON); a case's timed rounds stop at ``--budget`` seconds once it has ``--min-steps``;
* **plan**: how many frozen blocks freezert ran eagerly (``fm.eager_blocks``) and how many BatchNorms it folded
  (``fm.segment.folded``).

Naive freezing is the reference the zoo tests use (tests/zoo/_conformance.py): the parameters freezert froze
(read after its first forward) get ``requires_grad=False`` on a copy of the model, and every module whose
parameters are all frozen goes to eval mode (frozen BatchNorm uses its running statistics). Dropout and drop-path
are off in every variant (freezert's prefix is an inference segment). The optimizer is plain SGD over the
trainable parameters. BatchNorm statistics are calibrated once on a sample (a pretrained net's would match its
activations). A failure in one model is recorded with its traceback and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from freezert.bench.zoo import naive_freeze, no_dropout, output_tensors

NAIVE, FREEZERT, CACHED, FULL = "naive", "freezert", "freezert+fp16", "full"
TIMED = (NAIVE, FREEZERT, CACHED)


# --- the zoo ---------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One zoo model: how to build it, its inputs (positional tuple, keyword dict) and its freeze depths."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple[tuple, dict]]  # (batch, generator) -> (args, kwargs)
    freezes: tuple[int, ...]
    batch: int
    size: str  # what the inputs are, for the table
    opts: dict = field(default_factory=dict)  # freezert.wrap options (also_freeze=...)


def _images(px: int):
    return lambda b, g: ((torch.randn(b, 3, px, px, generator=g),), {})


def _tokens(vocab: int, seq: int):
    return lambda b, g: (
        (),
        {
            "input_ids": torch.randint(0, vocab, (b, seq), generator=g),
            "attention_mask": torch.ones(b, seq, dtype=torch.long),
        },
    )


def _pixels(px: int):
    return lambda b, g: ((), {"pixel_values": torch.randn(b, 3, px, px, generator=g)})


def _seq2seq(vocab: int, seq: int):
    """Source tokens, their mask and decoder tokens of half the length (teacher forcing)."""
    return lambda b, g: (
        (),
        {
            "input_ids": torch.randint(0, vocab, (b, seq), generator=g),
            "attention_mask": torch.ones(b, seq, dtype=torch.long),
            "decoder_input_ids": torch.randint(0, vocab, (b, seq // 2), generator=g),
        },
    )


def _tv(name: str, **kw):
    """A torchvision builder by its name under ``torchvision.models`` (``segmentation.lraspp_mobilenet_v3_large``)."""

    def build():
        import torchvision

        fn = torchvision.models
        for part in name.split("."):
            fn = getattr(fn, part)
        return fn(**kw)

    return build


def _timm(name: str, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, **kw)

    return build


def _yolo(cfg: str):
    def build():
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(cfg, nc=3, verbose=False)

    return build


H, L, V, SEQ = 128, 6, 512, 64  # the transformers configs: hidden size, layers, vocabulary, sequence length


def _hf(kind: str):
    def build():
        import transformers

        transformers.logging.set_verbosity_error()
        if kind == "bert":
            return transformers.BertForSequenceClassification(
                transformers.BertConfig(
                    vocab_size=V,
                    hidden_size=H,
                    num_hidden_layers=L,
                    num_attention_heads=4,
                    intermediate_size=4 * H,
                    max_position_embeddings=SEQ,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                )
            )
        if kind == "vit":
            return transformers.ViTForImageClassification(
                transformers.ViTConfig(
                    hidden_size=H,
                    num_hidden_layers=L,
                    num_attention_heads=4,
                    intermediate_size=4 * H,
                    image_size=64,
                    patch_size=8,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                )
            )
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=V,
                    n_positions=SEQ,
                    n_embd=H,
                    n_layer=L,
                    n_head=4,
                    use_cache=False,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                )
            )
        if kind == "t5":
            return transformers.T5ForConditionalGeneration(
                transformers.T5Config(
                    vocab_size=V,
                    d_model=H,
                    d_kv=H // 4,
                    d_ff=4 * H,
                    num_layers=L,
                    num_heads=4,
                    dropout_rate=0.0,
                    decoder_start_token_id=0,
                )
            )
        if kind == "llama":
            return transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=V,
                    hidden_size=H,
                    intermediate_size=2 * H + 64,
                    num_hidden_layers=L,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=SEQ,
                    use_cache=False,
                )
            )
        raise ValueError(kind)

    return build


VIT_POS = ["cls_token", "pos_embed"]

ZOO: dict[str, Spec] = {
    "tv_resnet50": Spec(_tv("resnet50"), _images(64), (2, 4), 4, "64 px"),
    "tv_convnext_tiny": Spec(_tv("convnext_tiny", stochastic_depth_prob=0.0), _images(64), (2, 5), 4, "64 px"),
    "tv_vit_b_16": Spec(_tv("vit_b_16", image_size=64), _images(64), (6,), 4, "64 px (16 patches)"),
    "timm_vit_small": Spec(_timm("vit_small_patch16_224", img_size=64), _images(64), (6,), 8, "64 px (16 patches)"),
    "timm_vit_small_af": Spec(
        _timm("vit_small_patch16_224", img_size=64),
        _images(64),
        (6,),
        8,
        "64 px (16 patches)",
        {"also_freeze": VIT_POS},
    ),
    "timm_resnet18": Spec(_timm("resnet18"), _images(64), (2, 4), 8, "64 px"),
    "timm_efficientnet_b0": Spec(_timm("efficientnet_b0"), _images(64), (2, 5), 8, "64 px"),
    "yolov8n": Spec(_yolo("yolov8n.yaml"), _images(96), (4, 10), 4, "96 px"),
    "hf_bert": Spec(_hf("bert"), _tokens(V, SEQ), (2, 4), 4, f"seq {SEQ}"),
    "hf_vit": Spec(_hf("vit"), _pixels(64), (4,), 4, "64 px (64 patches)"),
    "hf_gpt2": Spec(_hf("gpt2"), _tokens(V, SEQ), (4,), 4, f"seq {SEQ}"),
    "hf_llama": Spec(_hf("llama"), _tokens(V, SEQ), (4,), 4, f"seq {SEQ}"),
    # the blocks of a segmentation model are its backbone's stages; an encoder-decoder's, the encoder's layers first
    # (freeze=6: the whole encoder, the decoder trains)
    "tv_lraspp": Spec(
        _tv("segmentation.lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3),
        _images(128),
        (6, 13),
        4,
        "128 px",
    ),
    "hf_t5": Spec(_hf("t5"), _seq2seq(V, SEQ), (L,), 4, f"seq {SEQ}, decoder {SEQ // 2}"),
}
DEFAULT = tuple(ZOO)
# Not in the default run: a tiny model for the test of this script.
ZOO["tv_resnet18_tiny"] = Spec(_tv("resnet18", num_classes=10), _images(32), (2,), 2, "32 px")
QUICK_FREEZES = 1  # --quick: the first depth of each model only


# --- building the variants ---------------------------------------------------------------------------------------


def calibrate(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """Every BatchNorm's running statistics set to those of the activations it sees on the sample."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()
        model(*args, **kwargs)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model


def loss_of(out) -> torch.Tensor:
    """Mean square of every floating output that requires grad (logits, YOLO's per-level maps)."""
    terms = [t.float().square().mean() for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not terms:
        raise RuntimeError("no output requires grad: nothing trains")
    return torch.stack(terms).sum()


class Runner:
    """One variant: a module, its SGD optimizer over the trainable parameters, a timed step."""

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter], model: nn.Module):
        self.name, self.module, self.model = name, module, model
        self.opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        self.ms: list[float] = []

    def step(self, args: tuple, kwargs: dict) -> float:
        t0 = time.perf_counter()
        loss = loss_of(self.module(*args, **kwargs))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1e3
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: the loss is not finite ({loss.item()})")
        return ms

    def saved(self, args: tuple, kwargs: dict) -> int:
        """Bytes saved for backward by one forward + loss (the graph is then dropped, nothing steps)."""
        from freezert.memory import SavedMeter

        exclude = [*self.model.parameters(), *self.model.buffers()]
        with SavedMeter(exclude=exclude) as meter:
            loss = loss_of(self.module(*args, **kwargs))
        del loss
        return meter.total


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    from freezert.bench import quartiles

    return quartiles(xs)


# --- one (model, freeze) ---------------------------------------------------------------------------------------


def run_case(
    key: str,
    spec: Spec,
    base: nn.Module,
    freeze: int,
    steps: int,
    batches: list,
    *,
    budget_s: float | None = None,
    min_steps: int = 10,
) -> dict:
    import freezert

    row: dict[str, Any] = {
        "model": key,
        "freeze": freeze,
        "opts": {k: v for k, v in spec.opts.items()},
        "batch": spec.batch,
        "input": spec.size,
    }
    args0, kw0 = batches[0]
    # freezert first: its first forward (the record) says which parameters it froze; naive freezes exactly those.
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    wrapped: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, cache in ((FREEZERT, None), (CACHED, "fp16")):
            model = copy.deepcopy(base).train()
            fm = freezert.wrap(model, freeze, cache=cache, **spec.opts)
            fm.train()
            loss_of(fm(*args0, **kw0))  # the record (and the segment's first, unfolded call): untimed, dropped
            wrapped[name] = (fm, model)
    row["warnings"] = sorted({str(w.message) for w in caught if "freezert" in str(w.message).lower()})
    fm, model = wrapped[FREEZERT]
    frozen = {n for n, p in model.named_parameters() if before[n] and not p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    row["frozen_params"] = sum(p.numel() for n, p in model.named_parameters() if n in frozen) / total
    row["prefix_length"] = fm.prefix_length
    row["eager_blocks"] = dict(fm.eager_blocks)
    row["eager"] = len(row["eager_blocks"])
    seg = fm.segment
    row["folded"] = getattr(seg, "folded", None) if seg is not None else 0
    row["bns_frozen"] = sum(
        1
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and any(f"{n}.{k}" in frozen for k, _ in m.named_parameters(recurse=False))
    )

    naive = naive_freeze(copy.deepcopy(base).train(), frozen)
    runners = {
        NAIVE: Runner(NAIVE, naive, [p for p in naive.parameters() if p.requires_grad], naive),
        FREEZERT: Runner(FREEZERT, fm, fm.trainable_parameters(), model),
        CACHED: Runner(CACHED, wrapped[CACHED][0], wrapped[CACHED][0].trainable_parameters(), wrapped[CACHED][1]),
    }
    # Warm-up, untimed: one epoch each over the batches (the cached variant's fill epoch).
    for r in runners.values():
        for a, k in batches:
            r.step(a, k)
    cache = runners[CACHED].module.cache
    filled = dict(cache.stats())

    # Saved bytes: naive, freezert, freezert on cache hits, full fine-tuning (built for this only).
    saved = {n: runners[n].saved(args0, kw0) for n in TIMED}
    full_model = copy.deepcopy(base).train().requires_grad_(True)
    saved[FULL] = Runner(FULL, full_model, list(full_model.parameters()), full_model).saved(args0, kw0)
    del full_model
    row["saved"] = saved

    # Step time: every variant resident, one step each per round, the order rotated each round.
    order = list(TIMED)
    t0 = time.perf_counter()
    for i in range(steps):
        a, k = batches[i % len(batches)]
        rot = order[i % len(order) :] + order[: i % len(order)]
        for n in rot:
            runners[n].ms.append(runners[n].step(a, k))
        if budget_s and i + 1 >= min_steps and i + 1 < steps and time.perf_counter() - t0 > budget_s:
            row["stopped"] = f"time budget of {budget_s:g} s reached after {i + 1} of {steps} rounds"
            break
    st = cache.stats()
    row["cache"] = {k: st[k] - filled[k] for k in ("lookups", "hits", "misses")}
    row["cache"]["fill_misses"] = filled["misses"]
    if row["cache"]["misses"]:
        raise RuntimeError(f"the cached variant missed {row['cache']['misses']} rows after its fill epoch")
    row["ms"] = {n: _quartiles(r.ms) for n, r in runners.items()}
    row["median_ms"] = {n: statistics.median(r.ms) for n, r in runners.items()}
    # per round, variant / naive (the same round's inputs, seconds apart): quartiles of those paired ratios
    row["paired_ratio"] = {
        n: _quartiles([x / y for x, y in zip(runners[n].ms, runners[NAIVE].ms)]) for n in (FREEZERT, CACHED)
    }
    row["steps"] = len(runners[NAIVE].ms)
    for r in runners.values():
        r.module = r.model = r.opt = None
    return row


def run_model(key: str, steps: int, quick: bool, log, budget_s: float | None = None, min_steps: int = 10) -> list[dict]:
    spec = ZOO[key]
    g = torch.Generator().manual_seed(0)
    batches = [spec.inputs(spec.batch, g) for _ in range(2)]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        base = no_dropout(spec.build()).float()
        calibrate(base, *batches[0])
        base.train()
    except ImportError as e:
        log(f"{key}: skipped ({e})")
        return [{"model": key, "skipped": str(e)}]
    rows = []
    for freeze in spec.freezes[:QUICK_FREEZES] if quick else spec.freezes:
        t1 = time.perf_counter()
        try:
            row = run_case(key, spec, base, freeze, steps, batches, budget_s=budget_s, min_steps=min_steps)
        except Exception as e:
            row = {
                "model": key,
                "freeze": freeze,
                "opts": dict(spec.opts),
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            log(f"{key} freeze={freeze}: FAILED ({row['error']}; traceback at the end)")
        row["seconds"] = round(time.perf_counter() - t1, 1)
        rows.append(row)
        gc.collect()
        if "error" not in row:
            log(f"{key} freeze={freeze}: {row['seconds']} s")
    del base
    gc.collect()
    log(f"{key}: {time.perf_counter() - t0:.1f} s in all")
    return rows


# --- the report ------------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | freeze | input | saved MiB naive | freezert | / naive | full | full / naive "
        "| ms naive | freezert | / naive | per round q1–q3 | +fp16 cache | / naive | rounds | eager | folded BN |"
    )
    lines = [head, "| --- | ---: | --- |" + " ---: |" * 14]
    for r in rows:
        name = r["model"] + (
            "" if not r.get("opts") else " (" + ", ".join(f"{k}={v}" for k, v in r["opts"].items()) + ")"
        )
        if "skipped" in r:
            lines.append(f"| {name} | | | skipped: {r['skipped']} |" + " |" * 13)
            continue
        if "error" in r:
            lines.append(f"| {name} | {r['freeze']} | | FAILED: {r['error'][:120]} |" + " |" * 13)
            continue
        s, t, q = r["saved"], r["median_ms"], r["paired_ratio"][FREEZERT]
        nb = max(s[NAIVE], 1)
        lines.append(
            f"| {name} | {r['freeze']} | b{r['batch']}, {r['input']} | {_mib(s[NAIVE])} | {_mib(s[FREEZERT])} "
            f"| {s[FREEZERT] / nb:.2f}× | {_mib(s[FULL])} | {s[FULL] / nb:.2f}× "
            f"| {t[NAIVE]:.1f} | {t[FREEZERT]:.1f} | **{t[FREEZERT] / t[NAIVE]:.2f}×** | {q[0]:.2f}–{q[2]:.2f} "
            f"| {t[CACHED]:.1f} | {t[CACHED] / t[NAIVE]:.2f}× | {r['steps']} | {r['eager']} "
            f"| {r['folded']}/{r['bns_frozen']} |"
        )
    return "\n".join(lines)


def header(threads: int) -> dict:
    import importlib.metadata as md

    def version(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "missing"

    return {
        "device": "cpu",
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "packages": {p: version(p) for p in ("torchvision", "timm", "ultralytics", "transformers")},
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        nargs="+",
        choices=sorted(ZOO),
        default=list(DEFAULT),
        metavar="MODEL",
        help=f"subset of: {', '.join(ZOO)} (default: all but tv_resnet18_tiny)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed rounds (one step per variant each) at most (default 60; --quick 5)",
    )
    ap.add_argument("--quick", action="store_true", help="first freeze depth of each model only, 5 rounds, 8 s budget")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="stop a case's timed rounds after S seconds, once it has --min-steps (default 30; --quick 8)",
    )
    ap.add_argument(
        "--min-steps", type=int, default=None, help="rounds before --budget may stop (default 10; --quick 3)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a loaded machine)")
    ap.add_argument("--json", metavar="PATH", help="write every number (and any traceback) here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (5 if a.quick else 60)
    if steps < 1:
        ap.error("--steps must be at least 1")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    budget = a.budget if a.budget is not None else (8.0 if a.quick else 30.0)
    min_steps = a.min_steps if a.min_steps is not None else (3 if a.quick else 10)
    info = header(a.threads)
    if argv is not None:
        info["command"] = "python benchmarks/bench_zoo.py " + " ".join(argv)
    info.update(steps=steps, budget_s=budget, min_steps=min_steps)
    t0 = time.perf_counter()
    rows: list[dict] = []
    try:
        for key in a.models:
            rows += run_model(key, steps, a.quick, log, budget, min_steps)
    finally:
        torch.set_num_threads(threads)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print(
        f"CPU ({info['cpus']} cores, {a.threads} thread(s)), torch {info['torch']}, {info['date']}, "
        f"up to {steps} timed steps per variant (budget {budget:g} s a case), {info['seconds']} s"
    )
    print(table(rows))
    for r in rows:
        if "error" in r:
            print(f"\n{r['model']} freeze={r['freeze']} failed:\n{r['traceback']}")
    result = {"info": info, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
