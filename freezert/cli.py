"""``freezert`` command line: ``inspect`` a model's blocks, ``demo`` and ``bench`` freezert against naive freezing.

The three training variants start from one deep-copied initial model and see the same synthetic batches:

* ``full fine-tune``: every parameter trains;
* ``naive freeze``: YOLOv5's ``--freeze N`` (``requires_grad=False`` on ``model.0.`` .. ``model.{N-1}.``,
  every parameter still handed to the optimizer, frozen BatchNorm still in training mode);
* ``freezert``: ``freezert.wrap(model, freeze=N)``, optimizer over ``fm.trainable_parameters()``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

FULL, NAIVE, FREEZERT = "full fine-tune", "naive freeze", "freezert"
VARIANTS = (FULL, NAIVE, FREEZERT)
MODELS = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x", "cnn", "encoder")
_DEFAULT_FREEZE = {"cnn": 3, "encoder": 6}  # yolov5*: 10 (the backbone)


# --- models and data -------------------------------------------------------------------------------------


def build_model(name: str) -> nn.Module:
    """A built-in example model by CLI name (``yolov5n``..``yolov5x``, ``cnn``, ``encoder``)."""
    from . import models

    if name.startswith("yolov5") and len(name) == 7:
        return models.yolov5(name[-1])
    if name == "cnn":
        return models.cnn_classifier()
    if name == "encoder":
        return models.transformer_encoder()
    raise SystemExit(f"freezert: unknown model {name!r}; choose from {', '.join(MODELS)}")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("freezert: --device cuda was asked for but CUDA is not available")
    return torch.device(device)


def _synthetic_batches(model: nn.Module, n: int, batch: int, img: int, device: torch.device, seed: int = 0):
    """``n`` (images, targets) pairs with the shapes of the detector's per-level outputs."""
    from .models import synthetic_images

    det = model.model[-1]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = synthetic_images(batch, img, g)
        t = [
            torch.rand(batch, det.na, img // int(s), img // int(s), det.no, generator=g)
            for s in det.stride.tolist()
        ]
        out.append((x.to(device), [ti.to(device) for ti in t]))
    return out


# --- the three variants ---------------------------------------------------------------------------------


def yolo_optimizer(model: nn.Module, params=None, lr: float = 0.01, momentum: float = 0.937, decay: float = 5e-4):
    """YOLOv5's ``smart_optimizer`` (SGD, nesterov; decay on conv/linear weights only), over ``params``.

    ``params=None`` hands every parameter to the optimizer, frozen ones included, as YOLOv5 does.
    """
    keep = None if params is None else {id(p) for p in params}
    groups: list[list[nn.Parameter]] = [[], [], []]  # decayed weights, norm weights, biases
    seen: set[int] = set()
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (keep is not None and id(p) not in keep):
                continue
            seen.add(id(p))
            if name == "bias":
                groups[2].append(p)
            elif name == "weight" and isinstance(module, norms):
                groups[1].append(p)
            else:
                groups[0].append(p)
    spec = [(groups[2], 0.0), (groups[0], decay), (groups[1], 0.0)]
    spec = [(g, d) for g, d in spec if g]
    if not spec:
        raise SystemExit("freezert: nothing to optimize (every parameter is frozen)")
    opt = torch.optim.SGD(spec[0][0], lr=lr, momentum=momentum, nesterov=True, weight_decay=spec[0][1])
    for g, d in spec[1:]:
        opt.add_param_group({"params": g, "weight_decay": d})
    return opt


def naive_freeze(model: nn.Module, n: int) -> nn.Module:
    """YOLOv5's ``--freeze N``: ``requires_grad=False`` on parameters named ``model.0.`` .. ``model.{N-1}.``."""
    prefixes = tuple(f"model.{x}." for x in range(n))
    for k, v in model.named_parameters():
        v.requires_grad = not k.startswith(prefixes)
    return model


@dataclass
class VariantResult:
    name: str
    trainable: int
    step_ms: list[float] = field(default_factory=list)  # one median per repeat (bench) or every step (demo)
    peak_bytes: int | None = None
    loss: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")


class _Variant:
    """One training setup: model, optimizer, a step function and its bookkeeping."""

    def __init__(self, name: str, initial: nn.Module, args, device: torch.device):
        self.name = name
        model = copy.deepcopy(initial).to(device).train()
        if name == FULL:
            for p in model.parameters():
                p.requires_grad_(True)
            self.module, self.opt = model, yolo_optimizer(model)
        elif name == NAIVE:
            naive_freeze(model, args.freeze)
            self.module, self.opt = model, yolo_optimizer(model)  # all params, as YOLOv5
        else:
            import freezert

            fm = freezert.wrap(
                model, freeze=args.freeze, bn=args.bn, channels_last=args.channels_last, graphs=args.graphs
            )
            self.module, self.opt = fm, yolo_optimizer(model, fm.trainable_parameters())
        self.module.train()
        self.device = device
        self.amp = bool(args.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        trainable = {id(p): p for p in self.module.parameters() if p.requires_grad}
        self.result = VariantResult(name, sum(p.numel() for p in trainable.values()))
        self.static_bytes = 0  # CUDA bytes this variant keeps between steps (weights, optimizer state, ...)

    def step(self, batch) -> float:
        """One optimizer step; returns its wall time in ms (device synchronised)."""
        from .models import detection_loss

        x, t = batch
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = detection_loss(self.module(x), t)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)  # grads do not stay resident between steps
        if cuda:
            torch.cuda.synchronize(self.device)
        self.result.loss = float(loss.detach())
        return (time.perf_counter() - t0) * 1e3


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr if tqdm is importable, else a plain counter; ``update()``/``close()``."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass

    class _Counter:
        def __init__(self):
            self.n, self.every = 0, max(total // 4, 1)

        def update(self, k=1):
            self.n += k
            if enabled and (self.n % self.every == 0 or self.n == total):
                print(f"  {desc}: {self.n}/{total}", file=sys.stderr, flush=True)

        def close(self):
            pass

    return _Counter()


# --- report ---------------------------------------------------------------------------------------------


def _ratio(a, b) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def format_table(results: dict[str, VariantResult], device: torch.device) -> str:
    """The comparison table: median step time, peak memory, trainable parameters, ratios (<1 is better)."""
    cuda = device.type == "cuda"
    head = (
        f"{'variant':<16} {'median ms':>10} {'peak MiB':>10} {'trainable':>12}"
        f" {'time/naive':>11} {'time/full':>10} {'mem/naive':>10} {'mem/full':>9}"
    )
    lines = [head, "-" * len(head)]
    naive, full = results.get(NAIVE), results.get(FULL)
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        mem = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
        lines.append(
            f"{name:<16} {r.median_ms:>10.1f} {mem:>10} {r.trainable:>12,}"
            f" {_ratio(r.median_ms, naive and naive.median_ms):>11} {_ratio(r.median_ms, full and full.median_ms):>10}"
            f" {_ratio(r.peak_bytes, naive and naive.peak_bytes):>10} {_ratio(r.peak_bytes, full and full.peak_bytes):>9}"
        )
    lines.append("ratios are variant / baseline: below 1.00x is faster or leaner")
    if not cuda:
        lines.append("peak memory: not measured on CPU")
    else:
        lines.append("peak memory: torch.cuda.max_memory_allocated of each variant (weights, optimizer state included)")
    return "\n".join(lines)


def _results_json(results: dict[str, VariantResult], config: dict) -> dict:
    naive, full = results.get(NAIVE), results.get(FULL)

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    out = {"config": config, "variants": {}}
    for name, r in results.items():
        out["variants"][name] = {
            "median_ms": r.median_ms,
            "step_ms": r.step_ms,
            "peak_bytes": r.peak_bytes,
            "trainable_params": r.trainable,
            "final_loss": r.loss,
            "time_vs_naive": ratio(r.median_ms, naive and naive.median_ms),
            "time_vs_full": ratio(r.median_ms, full and full.median_ms),
            "mem_vs_naive": ratio(r.peak_bytes, naive and naive.peak_bytes),
            "mem_vs_full": ratio(r.peak_bytes, full and full.peak_bytes),
        }
    return out


# --- subcommands ----------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    import freezert

    model = build_model(args.model)
    freeze = args.freeze if args.freeze is not None else _DEFAULT_FREEZE.get(args.model, 10)
    print(freezert.inspect(model, freeze=freeze))
    return 0


def _pick(args, cpu: dict, gpu: dict, device: torch.device) -> list[str]:
    """Fills options left unset with the CPU or GPU default; returns descriptions of what was chosen."""
    chosen = []
    table = gpu if device.type == "cuda" else cpu
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value}")
    return chosen


def _check_yolo(args) -> None:
    if not args.model.startswith("yolov5"):
        raise SystemExit(f"freezert: demo/bench train the built-in detector; --model {args.model} is not a yolov5*")
    if args.freeze < 1:
        raise SystemExit("freezert: --freeze must be at least 1 to compare freezing variants")
    if args.img < 64 or args.img % 32:
        raise SystemExit(f"freezert: --img {args.img} must be a multiple of 32 and at least 64 (the detector's stride)")
    if args.batch < 1 or args.steps < 1:
        raise SystemExit("freezert: --batch and --steps must be at least 1")


def _check_depth(model: nn.Module, args) -> None:
    n = len(model.model)
    if args.freeze >= n:
        raise SystemExit(
            f"freezert: --freeze {args.freeze} would freeze every block of {args.model} ({n} blocks, 0..{n - 1}); "
            f"pass at most {n - 1}"
        )


def _header(title: str, args, device: torch.device, chosen: list[str]) -> None:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"freezert {title}: {args.model}, img {args.img}, batch {args.batch}, freeze {args.freeze}, on {dev}")
    if chosen:
        print(f"defaults chosen for {device.type}: {', '.join(chosen)}")


def cmd_demo(args) -> int:
    device = _resolve_device(args.device)
    chosen = _pick(
        args,
        cpu={"model": "yolov5n", "steps": 30, "img": 128, "batch": 8, "warmup": 3},
        gpu={"model": "yolov5s", "steps": 200, "img": 128, "batch": 8, "warmup": 5},
        device=device,
    )
    _check_yolo(args)
    _header("demo", args, device, chosen)
    torch.manual_seed(args.seed)
    initial = build_model(args.model)
    _check_depth(initial, args)
    batches = _synthetic_batches(initial, 2, args.batch, args.img, device, args.seed)
    if args.budget is None:
        args.budget = 30.0 if device.type == "cpu" else 0.0  # keeps the CPU demo under ~2 minutes even when busy
    results: dict[str, VariantResult] = {}
    stopped: list[str] = []
    for name in VARIANTS:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        v = _Variant(name, initial, args, device)
        total = args.warmup + args.steps
        bar = _progress(total, name, not args.quiet)
        t0 = time.perf_counter()
        for i in range(total):
            ms = v.step(batches[i % len(batches)])
            if i >= args.warmup:
                v.result.step_ms.append(ms)
            bar.update()
            if args.budget and len(v.result.step_ms) >= 3 and time.perf_counter() - t0 > args.budget:
                stopped.append(f"{name} after {len(v.result.step_ms)} timed steps")
                break
        bar.close()
        if device.type == "cuda":
            v.result.peak_bytes = torch.cuda.max_memory_allocated(device)
        results[name] = v.result
        del v
    print(format_table(results, device))
    if stopped:
        print(f"time budget ({args.budget:.0f} s per variant) reached: stopped {'; '.join(stopped)}")
    _cache_variant(args)
    if args.json:
        _write_json(args.json, _results_json(results, _config(args, device)))
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    device = _resolve_device(args.device)
    chosen = _pick(
        args,
        cpu={"model": "yolov5n", "img": 128, "batch": 4, "steps": 10, "repeats": 3, "warmup": 2},
        gpu={"model": "yolov5m", "img": 512, "batch": 48, "steps": 30, "repeats": 3, "warmup": 5},
        device=device,
    )
    _check_yolo(args)
    _header("bench", args, device, chosen)
    print(f"{args.repeats} repeats x {args.steps} steps per variant, round-robin, {args.warmup} warmup steps excluded")
    torch.manual_seed(args.seed)
    initial = build_model(args.model)
    _check_depth(initial, args)
    batches = _synthetic_batches(initial, 2, args.batch, args.img, device, args.seed)
    cuda = device.type == "cuda"

    # Set every variant up (and warm it up) first; on CUDA, note what it keeps resident between steps, so
    # that its peak can be told apart from the other variants living on the same device.
    variants = []
    for name in VARIANTS:
        before = torch.cuda.memory_allocated(device) if cuda else 0
        v = _Variant(name, initial, args, device)
        for i in range(args.warmup):
            v.step(batches[i % len(batches)])
        if cuda:
            v.static_bytes = torch.cuda.memory_allocated(device) - before
        variants.append(v)

    peaks: dict[str, list[int]] = {v.name: [] for v in variants}
    bar = _progress(args.repeats * len(variants) * args.steps, "bench", not args.quiet)
    for _ in range(args.repeats):
        for v in variants:
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(args.steps):
                times.append(v.step(batches[i % len(batches)]))
                bar.update()
            v.result.step_ms.append(statistics.median(times))
            if cuda:
                peaks[v.name].append(torch.cuda.max_memory_allocated(device) - base + v.static_bytes)
    bar.close()
    results = {v.name: v.result for v in variants}
    if cuda:
        for v in variants:
            v.result.peak_bytes = max(peaks[v.name])
    print(format_table(results, device))
    cache = _cache_variant(args)
    if args.json:
        data = _results_json(results, _config(args, device))
        data["cache"] = cache
        _write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


def _cache_variant(args) -> dict | None:
    """The ``--cache`` variant (freezert with the feature cache). Not wired yet: says so and returns None."""
    if not getattr(args, "cache", False):
        return None
    print("--cache: the feature-cache variant is not available yet (the cache is not wired into wrap); skipped")
    return None


def _config(args, device: torch.device) -> dict:
    keys = ("model", "img", "batch", "steps", "repeats", "warmup", "freeze", "bn", "amp", "graphs", "channels_last")
    cfg = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    cfg["device"] = str(device)
    cfg["torch"] = torch.__version__
    if device.type == "cuda":
        cfg["device_name"] = torch.cuda.get_device_name(device)
    return cfg


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# --- argument parsing -----------------------------------------------------------------------------------


def _train_options(p: argparse.ArgumentParser, steps_help: str) -> None:
    p.add_argument("--model", default=None, choices=[m for m in MODELS if m.startswith("yolov5")],
                   help="detector size (default: yolov5n on CPU; see the subcommand for GPU)")
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--img", type=int, default=None, help="square image size in pixels (a multiple of 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--freeze", type=int, default=10, help="freeze blocks 0..N-1 (default: 10, the backbone)")
    p.add_argument("--bn", default="frozen", choices=["frozen", "train"], help="freezert's frozen BatchNorm mode")
    p.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA only), as YOLOv5 trains")
    p.add_argument("--graphs", action="store_true", help="freezert: capture the frozen segment in a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="freezert: channels_last frozen segment")
    p.add_argument("--cache", action="store_true", help="also run freezert with the feature cache (not available yet)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freezert",
        description="Inspect a model's blocks; compare full fine-tuning, naive freezing and freezert.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a model's block table and where freeze=N cuts it")
    p.add_argument("--model", default="yolov5s", choices=MODELS)
    p.add_argument("--freeze", type=int, default=None, help="blocks to freeze (default: 10 for yolov5*, 3 cnn, 6 encoder)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "demo",
        help="train the built-in YOLOv5 on synthetic data: full fine-tune vs naive freeze vs freezert",
        description="Defaults: GPU yolov5s, 200 steps, batch 8, 128 px; CPU yolov5n, 30 steps, batch 8, 128 px.",
    )
    _train_options(p, "timed steps per variant (default: 200 on GPU, 30 on CPU)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop a variant's timed steps after this long (default: 30 on CPU, none on GPU; 0 = none)")
    p.set_defaults(func=cmd_demo, repeats=1)

    p = sub.add_parser(
        "bench",
        help="the same comparison at the paper's scale, variants alternated round-robin",
        description="Defaults: GPU yolov5m, 512 px, batch 48, 30 steps x 3 repeats; CPU yolov5n, 128 px, batch 4, "
        "10 steps x 3 repeats.",
    )
    _train_options(p, "timed steps per variant and repeat (default: 30 on GPU, 10 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="round-robin repeats; the median is reported")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freezert`` console script and ``python -m freezert``."""
    from ._errors import FreezeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FreezeError as e:  # a bad --freeze for this model: say what exists, no traceback
        print(f"freezert: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
