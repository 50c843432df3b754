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
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Self

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

    # The example models stand in for pretrained networks: BatchNorm statistics measured on synthetic images,
    # so frozen BatchNorm normalises as a trained backbone's would (fresh statistics would mis-scale it).
    g = torch.Generator().manual_seed(0)
    if name.startswith("yolov5") and len(name) == 7:
        return models.calibrate_batchnorm(models.yolov5(name[-1]), torch.rand(4, 3, 128, 128, generator=g))
    if name == "cnn":
        return models.calibrate_batchnorm(models.cnn_classifier(), torch.rand(4, 3, 64, 64, generator=g))
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
    monitor: dict | None = None  # _Monitors.data: what the memory and gradient monitors saw (plain data)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class _Monitors:
    """One variant's ``MemoryMonitor`` and ``GradientMonitor`` (over its blocks), as a context manager.

    On exit, ``data`` holds plain numbers only (no reference to the model survives, so a finished variant's
    weights can be freed): the memory summary, per-step block norms, window means and CVs, the events, and a
    memory trace (the monitor's latest sample after each step) for ``--plot``.
    """

    def __init__(self, blocks, freeze: int, device: torch.device, reset_peak: bool = True):
        from .monitor import GradientMonitor, MemoryMonitor

        self.grad = GradientMonitor(blocks)
        self.mem = MemoryMonitor(device=device, reset_peak=reset_peak)
        self.freeze = freeze  # blocks 0..freeze-1: frozen in the naive and freezert variants, trained in full
        self.trace: list[tuple[float, int]] = []
        self.skipped = 0  # AMP steps the GradScaler skipped (non-finite gradients): not recorded
        self.data: dict | None = None

    def __enter__(self) -> Self:
        self.mem.start()
        return self

    def __exit__(self, *exc) -> None:
        memory = self.mem.stop()
        g = self.grad.summary()
        self.data = {
            "memory": memory,
            "frozen_blocks": f"0..{self.freeze - 1}",
            "grad_norm_frozen_blocks": _mean(g["mean"][: self.freeze]),  # None: no gradient reached them
            "grad_norm_trainable_blocks": _mean(g["mean"][self.freeze :]),
            "cv_mean": _mean(g["cv"]),
            "window": self.grad.window,
            "amp_skipped_steps": self.skipped,
            "gradients": g,  # steps, blocks, last, mean, cv (per block, over the window), ratio, event kinds
            "norms": self.grad.history,  # per step, per block (None: no gradient)
            "events": [asdict(e) for e in self.grad.events],
            "memory_trace": self.trace,  # (seconds since start, bytes): CUDA allocated, or process RSS on CPU
        }
        self.grad = self.mem = None

    def after_backward(self, skip_nonfinite: bool = False) -> None:
        """Records this step's block norms; with ``skip_nonfinite`` (AMP), not those of a step the GradScaler
        skipped (its first steps usually overflow), which would make the window's means inf."""
        from .monitor import block_grad_norms

        norms = block_grad_norms(self.grad.blocks)
        if skip_nonfinite and not all(math.isfinite(x) for x in norms if x is not None):
            self.skipped += 1
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # events are printed in the monitor table instead
            self.grad.record(norms)

    def after_step(self) -> None:
        s = self.mem.summary()
        cur = s["cuda_allocated_bytes"] if self.mem.cuda else s["rss_bytes"]
        if cur is not None and s["duration_s"] is not None:
            self.trace.append((s["duration_s"], cur))


class _Variant:
    """One training setup: model, optimizer, a step function and its bookkeeping."""

    def __init__(self, name: str, initial: nn.Module, args, device: torch.device):
        self.name = name
        model = copy.deepcopy(initial).to(device).train()
        import freezert

        if name == FULL:
            for p in model.parameters():
                p.requires_grad_(True)
            self.module, self.opt = model, yolo_optimizer(model)
            self.blocks = freezert.find_blocks(model)
        elif name == NAIVE:
            naive_freeze(model, args.freeze)
            self.module, self.opt = model, yolo_optimizer(model)  # all params, as YOLOv5
            self.blocks = freezert.find_blocks(model)
        else:
            fm = freezert.wrap(
                model, freeze=args.freeze, bn=args.bn, channels_last=args.channels_last, graphs=args.graphs
            )
            self.module, self.opt = fm, yolo_optimizer(model, fm.trainable_parameters())
            self.blocks = fm.blocks
        self.mon: _Monitors | None = None  # attached around the steps the monitors should see
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
        self.scaler.step(self.opt)  # unscales the gradients in place first: the monitor sees true norms
        self.scaler.update()
        untimed = 0.0
        if self.mon is not None:
            # The gradient norms are read before zero_grad, with the timer paused: their kernels and host sync
            # are subtracted from the step time.
            if cuda:
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            self.mon.after_backward(skip_nonfinite=self.amp)
            untimed = time.perf_counter() - t1
        self.opt.zero_grad(set_to_none=True)  # grads do not stay resident between steps
        if cuda:
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0 - untimed) * 1e3
        self.result.loss = float(loss.detach())
        if self.mon is not None:
            self.mon.after_step()  # a memory sample for --plot, after the timer stopped
        return ms


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


def _mib(b) -> str:
    return f"{b / 2**20:.0f}" if b is not None else "-"


def _norm(x) -> str:
    return "none" if x is None else f"{x:.3g}"


def format_monitor_table(results: dict[str, VariantResult], freeze: int) -> str:
    """One line per variant: peak memory as the monitor saw it, mean gradient norm of blocks 0..freeze-1 and of
    the rest, the mean CV over the window, event names; then the events' messages and the monitor's notes."""
    mons = {n: results[n].monitor for n in VARIANTS if n in results and results[n].monitor}
    if not mons:
        return ""
    frozen, rest = f"grad 0..{freeze - 1}", f"grad {freeze}.."
    # Rows are indented: lines that start with a variant name belong to the comparison table above.
    head = f"{'monitors':<18} {'peak memory':>24} {frozen:>10} {rest:>10} {'CV':>6}  events"
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    window = None
    for name, m in mons.items():
        mem = m["memory"]
        if mem["cuda_peak_allocated_bytes"] is not None:
            peak = f"alloc {_mib(mem['cuda_peak_allocated_bytes'])}"
            if mem["nvml_used_peak_bytes"] is not None:
                peak += f" / NVML {_mib(mem['nvml_used_peak_bytes'])}"
            peak += " MiB"
        else:
            peak = f"RSS {_mib(mem['rss_peak_bytes'])} MiB"
        cv = "-" if m["cv_mean"] is None else f"{m['cv_mean']:.2f}"
        events = ", ".join(f"{e['kind']}@{e['step']}" for e in m["events"]) or "-"
        lines.append(
            f"  {name:<16} {peak:>24} {_norm(m['grad_norm_frozen_blocks']):>10}"
            f" {_norm(m['grad_norm_trainable_blocks']):>10} {cv:>6}  {events}"
        )
        lines += [f"    {name}: {e['kind']}: {e['message']}" for e in m["events"]]
        if m["amp_skipped_steps"]:
            skipped = m["amp_skipped_steps"]
            lines.append(f"    {name}: {skipped} steps skipped by the GradScaler (inf/NaN): not recorded")
        if mem["note"] and mem["note"] not in notes:
            notes.append(mem["note"])
        window = m["window"]
    lines.append(
        f"grad a..b: mean per-block L2 gradient norm over the last <={window} steps (none: no gradient); "
        "CV: std/mean over that window, averaged over blocks"
    )
    lines += [f"monitor note: {n}" for n in notes]
    return "\n".join(lines)


def write_plot(path: str, results: dict[str, VariantResult], freeze: int) -> str:
    """``--plot``: a PNG of each variant's per-block gradient norms over steps (heat maps) and memory over time.

    Returns the line to print; without matplotlib, says so and writes nothing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); nothing written to {path}"
    mons = [(n, results[n].monitor) for n in VARIANTS if n in results and results[n].monitor]
    if not mons:
        return f"--plot: no monitor data; nothing written to {path}"
    grids = []
    for _, m in mons:
        rows = [[math.log10(x) if x is not None and x > 0 else math.nan for x in step] for step in m["norms"]]
        grids.append(np.ma.masked_invalid(np.array(rows, dtype=float).T.reshape(len(m["gradients"]["blocks"]), -1)))
    finite = [g.compressed() for g in grids if g.count()]
    lo, hi = (min(f.min() for f in finite), max(f.max() for f in finite)) if finite else (0.0, 1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    fig, axes = plt.subplots(len(mons) + 1, 1, figsize=(9, 2.4 * (len(mons) + 1)), constrained_layout=True)
    im = None
    for ax, (name, m), grid in zip(axes, mons, grids):
        nb, ns = grid.shape
        im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi,
                       extent=(0.5, ns + 0.5, -0.5, nb - 0.5))
        ax.axhline(freeze - 0.5, color="white", linestyle="--", linewidth=1)
        for e in m["events"]:
            ax.axvline(e["step"], color="red", linestyle=":", linewidth=1)
        ax.set_title(f"{name}: log10 gradient L2 norm per block (grey: no gradient; dashed: freeze {freeze})",
                     fontsize=9)
        ax.set_ylabel("block")
        ax.set_xlabel("step")
    if im is not None:
        fig.colorbar(im, ax=list(axes[:-1]), label="log10 norm")
    ax = axes[-1]
    cuda = any(m["memory"]["cuda_peak_allocated_bytes"] is not None for _, m in mons)
    for name, m in mons:
        if m["memory_trace"]:
            ts, bs = zip(*m["memory_trace"])
            ax.plot(ts, [b / 2**20 for b in bs], label=name, linewidth=1)
    ax.set_xlabel("seconds since the variant's monitor started")
    ax.set_ylabel("CUDA allocated MiB" if cuda else "process RSS MiB")
    ax.set_title("memory as the monitor sampled it, after each step", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def _report_monitors(args, results: dict[str, VariantResult]) -> None:
    table = format_monitor_table(results, args.freeze)
    if table:
        print(table)
    if args.plot:
        print(write_plot(args.plot, results, args.freeze))


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
            "monitor": r.monitor,
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
        # Every step (warm-up included) runs under the monitors. The gradient norms are taken with the step's
        # timer paused (see _Variant.step); the memory sampler is a daemon thread waking every 50 ms, which
        # does run during the timed steps (microseconds per sample). The allocator peaks were reset just above,
        # before the variant was built: the monitor keeps them (reset_peak=False), so its peak is the table's.
        v.mon = _Monitors(v.blocks, args.freeze, device, reset_peak=False)
        t0 = time.perf_counter()
        with v.mon:
            for i in range(total):
                ms = v.step(batches[i % len(batches)])
                if i >= args.warmup:
                    v.result.step_ms.append(ms)
                bar.update()
                if args.budget and len(v.result.step_ms) >= 3 and time.perf_counter() - t0 > args.budget:
                    stopped.append(f"{name} after {len(v.result.step_ms)} timed steps")
                    break
        bar.close()
        v.result.monitor, v.mon = v.mon.data, None
        if device.type == "cuda":
            v.result.peak_bytes = torch.cuda.max_memory_allocated(device)
        results[name] = v.result
        del v
    print(format_table(results, device))
    if stopped:
        print(f"time budget ({args.budget:.0f} s per variant) reached: stopped {'; '.join(stopped)}")
    _report_monitors(args, results)
    _cache_variant(args)
    if args.json:
        _write_json(args.json, _results_json(results, _config(args, device)))
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    if args.cache and args.plot:
        print("--plot: bench --cache runs no monitors; nothing written")
    if args.cache:  # the feature-cache benchmark: its own epochs, variants and table
        return cmd_bench_cache(args)
    device = _resolve_device(args.device)
    chosen = _pick(
        args,
        cpu={"model": "yolov5n", "img": 128, "batch": 4, "steps": 10, "repeats": 3, "warmup": 2},
        gpu={"model": "yolov5m", "img": 512, "batch": 48, "steps": 30, "repeats": 3, "warmup": 5},
        device=device,
    )
    _check_yolo(args)
    _header("bench", args, device, chosen)
    mon_steps = max(args.steps, 2)  # the CV needs two steps
    print(
        f"{args.repeats} repeats x {args.steps} steps per variant, round-robin, {args.warmup} warmup steps excluded; "
        f"then {mon_steps} untimed steps per variant under the monitors"
    )
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
    bar = _progress((args.repeats * args.steps + mon_steps) * len(variants), "bench", not args.quiet)
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
    # The monitors get a pass of their own after the timed repeats: untimed steps, so neither the gradient
    # norms nor the memory sampler thread touch the timings above. All three variants stay resident here, so
    # the monitor's memory is the process's (the table's peak is per variant).
    for v in variants:
        loss = v.result.loss
        v.mon = _Monitors(v.blocks, args.freeze, device)
        with v.mon:
            for i in range(mon_steps):
                v.step(batches[i % len(batches)])
                bar.update()
        v.result.monitor, v.mon = v.mon.data, None
        v.result.loss = loss  # the reported loss stays the timed run's
    bar.close()
    results = {v.name: v.result for v in variants}
    if cuda:
        for v in variants:
            v.result.peak_bytes = max(peaks[v.name])
    print(format_table(results, device))
    _report_monitors(args, results)
    cache = _cache_variant(args)
    if args.json:
        data = _results_json(results, _config(args, device))
        data["cache"] = cache
        _write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


# --- bench --cache: the feature cache across epochs -------------------------------------------------------
#
# A fixed synthetic dataset (no augmentation) is iterated in batches for several epochs. Variants:
#   full fine-tune, naive freeze, freezert (freeze=N, no cache): every epoch costs the same;
#   freezert+cache: epoch 1 runs the frozen prefix and fills the cache, epochs 2+ read it back (hits);
#   floor: the boundary features are precomputed once into device memory (outside the timed epochs) and only
#          the trainable part trains on them: what a perfect cache could at best do.

CACHED, FLOOR = "freezert+cache", "floor"
CACHE_VARIANTS = (FULL, NAIVE, FREEZERT, CACHED, FLOOR)
_ENCODER_LAYERS, _ENCODER_FREEZE = 12, 8
# Options left unset, by model family and device: CPU sizes finish in well under a minute on two cores.
_CACHE_DEFAULTS = {
    ("yolo", "cpu"): {"img": 64, "batch": 2, "dataset_size": 24, "epochs": 3, "warmup": 2},
    ("yolo", "cuda"): {"img": 512, "batch": 48, "dataset_size": 384, "epochs": 3, "warmup": 3},
    ("encoder", "cpu"): {"seq_len": 64, "batch": 8, "dataset_size": 64, "epochs": 3, "warmup": 2},
    ("encoder", "cuda"): {"seq_len": 256, "batch": 32, "dataset_size": 512, "epochs": 3, "warmup": 3},
}
# BERT-base shape on GPU; a narrow encoder on CPU.
_ENCODER_SIZES = {
    "cpu": {"vocab_size": 1000, "d_model": 128, "nhead": 4, "dim_ff": 256},
    "cuda": {"vocab_size": 30522, "d_model": 768, "nhead": 12, "dim_ff": 3072},
}


class _Unset(int):
    """An option's default value, told apart from the same value given on the command line."""


class _YoloTask:
    """The built-in detector on uniform images with random per-level targets; the toy detection loss."""

    family = "yolo"

    def __init__(self, args, device: torch.device):
        from .models import synthetic_images

        self.initial = build_model(args.model)
        _check_depth(self.initial, args)
        det = self.initial.model[-1]
        strides = [int(s) for s in det.stride.tolist()]

        def data(n: int, g: torch.Generator):
            x = synthetic_images(n, args.img, g)
            t = [torch.rand(n, det.na, args.img // s, args.img // s, det.no, generator=g) for s in strides]
            return x.to(device), [ti.to(device) for ti in t]

        self.x, self.t = data(args.dataset_size, torch.Generator().manual_seed(args.seed))
        self.warm = data(args.batch, torch.Generator().manual_seed(args.seed + 1))  # not in the dataset
        self.describe = f"{args.model}, img {args.img}"

    def batch(self, s: slice):
        return self.x[s], [t[s] for t in self.t]

    def forward(self, module: nn.Module, b, ids=None):
        return module(b[0]) if ids is None else module(b[0], cache_ids=ids)

    def loss(self, out, b) -> torch.Tensor:
        from .models import detection_loss

        return detection_loss(out, b[1])

    def naive(self, model: nn.Module, n: int) -> None:
        naive_freeze(model, n)

    def optimizer(self, model: nn.Module, params=None):
        return yolo_optimizer(model, params)

    def floor_features(self, fm, b) -> dict[int, torch.Tensor]:
        return {j: t.detach() for j, t in fm.segment.run(b[0]).items()}  # the driven path: {block: output}

    def floor_forward(self, fm, feats, b):
        return fm._run_tail(dict(feats))  # _run_tail adds the tail's saved outputs to the dict it is given


class _EncoderTask:
    """``transformer_encoder(num_layers=12)`` on token batches (B, L) with padding masks; cross-entropy."""

    family = "encoder"

    def __init__(self, args, device: torch.device):
        from .models import transformer_encoder

        self.sizes = dict(_ENCODER_SIZES[device.type])
        self.classes = 4
        self.initial = transformer_encoder(
            num_layers=_ENCODER_LAYERS, num_classes=self.classes, max_len=max(512, args.seq_len), **self.sizes
        )
        if args.freeze >= _ENCODER_LAYERS:
            raise SystemExit(
                f"freezert: --freeze {args.freeze} would freeze every layer of the encoder ({_ENCODER_LAYERS}); "
                f"pass at most {_ENCODER_LAYERS - 1}"
            )
        self.k = args.freeze
        vocab, seq = self.sizes["vocab_size"], args.seq_len

        def data(n: int, g: torch.Generator):
            ids = torch.randint(1, vocab, (n, seq), generator=g)
            lengths = torch.randint(max(seq // 2, 1), seq + 1, (n,), generator=g)
            mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
            labels = torch.randint(0, self.classes, (n,), generator=g)
            return ids.mul(mask).to(device), mask.to(device), labels.to(device)  # padding is token 0

        self.data = data(args.dataset_size, torch.Generator().manual_seed(args.seed))
        self.warm = data(args.batch, torch.Generator().manual_seed(args.seed + 1))
        self.describe = (
            f"encoder ({_ENCODER_LAYERS} layers, d_model {self.sizes['d_model']}, vocab {vocab}), L {seq}"
        )

    def batch(self, s: slice):
        return tuple(t[s] for t in self.data)

    def forward(self, module: nn.Module, b, ids=None):
        if ids is None:
            return module(b[0], attention_mask=b[1])
        return module(b[0], attention_mask=b[1], cache_ids=ids)

    def loss(self, out, b) -> torch.Tensor:
        return nn.functional.cross_entropy(out.float(), b[2])

    def naive(self, model: nn.Module, n: int) -> None:
        # the same set freezert freezes: the embeddings (its stem) and layers 0..n-1
        prefixes = ("embed.",) + tuple(f"layers.{i}." for i in range(n))
        for k, v in model.named_parameters():
            v.requires_grad = not k.startswith(prefixes)

    def optimizer(self, model: nn.Module, params=None):
        params = list(model.parameters()) if params is None else list(params)  # naive: frozen ones included
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def floor_features(self, fm, b) -> torch.Tensor:
        """The output of the last frozen layer, computed with the model's own modules."""
        model = fm.model
        keep = b[1].to(torch.bool)[:, None, None, :]
        x = model.embed(b[0])
        for layer in model.layers[: self.k]:
            x = layer(x, keep)
        return x.detach()

    def floor_forward(self, fm, feats, b):
        """Layers k.., norm, masked mean pooling and the head: the model's forward after the boundary."""
        model = fm.model
        keep = b[1].to(torch.bool)
        mask = keep[:, None, None, :]
        x = feats
        for layer in model.layers[self.k:]:
            x = layer(x, mask)
        x = model.norm(x)
        w = keep.to(x.dtype).unsqueeze(-1)
        return model.head((x * w).sum(1) / w.sum(1).clamp_min(1.0))


@dataclass
class EpochResult:
    name: str
    trainable: int
    epochs: list[dict] = field(default_factory=list)  # per epoch: step_ms, epoch_s, cache (counter deltas)
    peak_bytes: int | None = None  # CUDA: max allocated during the variant, less what was resident before
    loss: float | None = None
    setup_s: float | None = None  # floor: the one-off precompute of the boundary features

    @property
    def first_ms(self) -> float:
        return statistics.median(self.epochs[0]["step_ms"]) if self.epochs else float("nan")

    @property
    def rest_ms(self) -> float:
        steps = [t for e in self.epochs[1:] for t in e["step_ms"]]
        return statistics.median(steps) if steps else float("nan")

    @property
    def first_s(self) -> float:
        return self.epochs[0]["epoch_s"] if self.epochs else float("nan")

    @property
    def rest_s(self) -> float:
        rest = [e["epoch_s"] for e in self.epochs[1:]]
        return statistics.median(rest) if rest else float("nan")


_COUNTERS = ("lookups", "hits", "misses", "stores", "skipped", "evictions")


class _EpochVariant:
    """One variant of the cache benchmark: its model copy, optimizer and a timed training step."""

    def __init__(self, name: str, task, args, device: torch.device, batches: list):
        import freezert

        self.name, self.task, self.device = name, task, device
        self.cuda = device.type == "cuda"
        model = copy.deepcopy(task.initial).to(device).train()
        self.fm = None
        if name == FULL:
            for p in model.parameters():
                p.requires_grad_(True)
            self.module, self.opt = model, task.optimizer(model)
        elif name == NAIVE:
            task.naive(model, args.freeze)
            self.module, self.opt = model, task.optimizer(model)  # every parameter, as YOLOv5 does
        else:
            cache = None
            if name == CACHED:
                from .cache import FeatureCache

                cache = FeatureCache(codec=args.codec, where=args.where)
            self.fm = freezert.wrap(
                model, freeze=args.freeze, bn=args.bn, channels_last=args.channels_last, graphs=args.graphs,
                cache=cache,
            )
            self.module, self.opt = self.fm, task.optimizer(model, self.fm.trainable_parameters())
        self.module.train()
        self.amp = bool(args.amp) and self.cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ids = name == CACHED and args.ids
        self.n = args.dataset_size
        trainable = {id(p): p for p in self.module.parameters() if p.requires_grad}
        self.result = EpochResult(name, sum(p.numel() for p in trainable.values()))
        self.features: list = []
        if name == FLOOR:
            self._precompute(batches)

    def _precompute(self, batches: list) -> None:
        """The floor's boundary features for every batch, once, into device memory (timed as setup)."""
        with torch.no_grad():
            self.task.forward(self.fm, self.task.warm)  # builds the segment (and folds BN) on a warm-up batch
            self._sync()
            t0 = time.perf_counter()
            self.features = [self.task.floor_features(self.fm, b) for _, b in batches]
            self._sync()
        self.result.setup_s = time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _kernel_context(self, b):
        # The floor trains the tail with the same freezert.ops substitutions the wrapped variants get.
        import contextlib

        plan = self.fm._kernels_for([b[0]])
        if not plan:
            return contextlib.nullcontext()
        from .ops.substitute import swapped

        return swapped(self.fm.model, plan)

    def _forward(self, i: int | None, s: slice | None, b):
        if self.name == FLOOR:
            if i is None:  # a warm-up batch: its features on the fly (untimed)
                with torch.no_grad():
                    feats = self.task.floor_features(self.fm, b)
            else:
                feats = self.features[i]
            with self._kernel_context(b):
                return self.task.floor_forward(self.fm, feats, b)
        ids = None
        if self.ids:
            ids = torch.arange(s.start, s.stop) if s is not None else torch.arange(self.n, self.n + len(b[0]))
        return self.task.forward(self.module, b, ids)

    def step(self, i: int | None, s: slice | None, b) -> float:
        """One optimizer step on batch ``i`` (slice ``s`` of the dataset; None: the warm-up batch), in ms."""
        self._sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.task.loss(self._forward(i, s, b), b)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        self.result.loss = float(loss.detach())
        return (time.perf_counter() - t0) * 1e3

    def counters(self) -> dict[str, int]:
        if self.fm is None or self.fm.cache is None:
            return {}
        st = self.fm.cache.stats()
        return {k: int(st.get(k, 0)) for k in _COUNTERS}


def _cache_defaults(args, device: torch.device) -> tuple[str, list[str]]:
    """Fills unset options for ``bench --cache``; returns the model family and the defaults chosen."""
    chosen = []
    if getattr(args, "model", None) is None:
        args.model = "yolov5m" if device.type == "cuda" else "yolov5n"
        chosen.append(f"model={args.model}")
    family = "encoder" if args.model == "encoder" else "yolo"
    if not (family == "encoder" or args.model.startswith("yolov5")):
        raise SystemExit(f"freezert: bench --cache trains yolov5n..yolov5x or encoder, not --model {args.model}")
    for key, value in _CACHE_DEFAULTS[(family, device.type)].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value}")
    defaults = {"codec": "fp16", "where": "auto", "ids": False, "seq_len": None, "img": None}
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if family == "encoder" and isinstance(args.freeze, _Unset):
        args.freeze = _ENCODER_FREEZE
        chosen.append(f"freeze={_ENCODER_FREEZE}")
    return family, chosen


def _check_cache_args(args, family: str, device: torch.device) -> None:
    if args.freeze < 1:
        raise SystemExit("freezert: --freeze must be at least 1: the cache keeps the frozen prefix's outputs")
    if args.epochs < 2:
        raise SystemExit(f"freezert: --epochs {args.epochs}: need at least 2 (epoch 1 fills the cache, 2+ hit it)")
    if args.batch < 1 or args.dataset_size < args.batch:
        raise SystemExit(
            f"freezert: --dataset-size {args.dataset_size} must hold at least one --batch {args.batch} (batch >= 1)"
        )
    if args.warmup < 0:
        raise SystemExit("freezert: --warmup must be at least 0")
    if family == "yolo" and (args.img < 64 or args.img % 32):
        raise SystemExit(f"freezert: --img {args.img} must be a multiple of 32 and at least 64 (the detector's stride)")
    if family == "encoder" and not 1 <= args.seq_len <= 4096:
        raise SystemExit(f"freezert: --seq-len {args.seq_len} must be between 1 and 4096")
    if args.bn != "frozen":
        raise SystemExit(
            "freezert: --cache needs --bn frozen (batch statistics make a sample's features batch-dependent)"
        )
    if args.where == "cuda" and device.type != "cuda":
        raise SystemExit("freezert: --where cuda keeps the cache in CUDA memory, but this run is on the CPU")


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _sum_counts(epochs: list[dict]) -> dict[str, int]:
    out = dict.fromkeys(_COUNTERS, 0)
    for e in epochs:
        for k, v in e.get("cache", {}).items():
            out[k] += v
    return out


def _cache_ratios(results: dict[str, EpochResult]) -> dict[str, float | None]:
    def ratio(a, b):
        return None if a is None or b is None or not b or a != a or b != b else a / b

    c, floor, full, naive, unc = (results.get(n) for n in (CACHED, FLOOR, FULL, NAIVE, FREEZERT))
    get = lambda r, attr: getattr(r, attr) if r is not None else None  # noqa: E731
    # Median steps rather than epoch sums: every epoch has the same steps, and a median shrugs off the odd
    # preempted step on a shared machine. Epoch times are in the table and the JSON.
    return {
        "cached_vs_floor": ratio(get(c, "rest_ms"), get(floor, "rest_ms")),
        "full_vs_cached": ratio(get(full, "rest_ms"), get(c, "rest_ms")),
        "naive_vs_cached": ratio(get(naive, "rest_ms"), get(c, "rest_ms")),
        "uncached_vs_cached": ratio(get(unc, "rest_ms"), get(c, "rest_ms")),
        "fill_vs_uncached": ratio(get(c, "first_ms"), get(unc, "rest_ms")),
        "cached_epoch_vs_floor": ratio(get(c, "rest_s"), get(floor, "rest_s")),
        "full_epoch_vs_cached_epoch": ratio(get(full, "rest_s"), get(c, "rest_s")),
    }


def format_cache_table(results: dict[str, EpochResult], device: torch.device) -> str:
    """Per variant: epoch 1 and epoch 2+ median step ms and epoch s, peak memory, ratios of epoch 2+ steps."""
    head = (
        f"{'variant':<15} {'ep1 ms':>9} {'ep2+ ms':>9} {'ep1 s':>8} {'ep2+ s':>8} {'peak MiB':>9} {'trainable':>11}"
        f" {'/floor':>7} {'/full':>7} {'/naive':>7}"
    )
    lines = [head, "-" * len(head)]
    floor, full, naive = (results.get(n) for n in (FLOOR, FULL, NAIVE))
    for name in CACHE_VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        mem = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
        lines.append(
            f"{name:<15} {r.first_ms:>9.1f} {r.rest_ms:>9.1f} {r.first_s:>8.2f} {r.rest_s:>8.2f} {mem:>9}"
            f" {r.trainable:>11,} {_ratio(r.rest_ms, floor and floor.rest_ms):>7}"
            f" {_ratio(r.rest_ms, full and full.rest_ms):>7} {_ratio(r.rest_ms, naive and naive.rest_ms):>7}"
        )
    lines.append(
        "ms: median step; s: epoch time (ep2+: median over epochs 2..); /floor /full /naive: ep2+ median step "
        "ratios (below 1.00x is faster)"
    )
    if device.type == "cuda":
        lines.append("peak memory: torch.cuda.max_memory_allocated per variant, less the resident dataset "
                     "(cache device tier and floor features included)")
    else:
        lines.append("peak memory: not measured on CPU")
    return "\n".join(lines)


def _cache_summary(results: dict[str, EpochResult], stats: dict | None, ratios: dict, family: str) -> str:
    lines = []
    c = results.get(CACHED)
    if c is not None and stats is not None:
        fill, rest = c.epochs[0].get("cache", {}), _sum_counts(c.epochs[1:])
        tiers = ", ".join(f"{t} {_fmt_bytes(stats.get(f'bytes_{t}', 0))}" for t in ("device", "host", "disk"))
        lines.append(
            f"cache ({stats.get('codec')}, where={stats.get('where')}): epoch 1 (fill): {fill.get('hits', 0)} hits, "
            f"{fill.get('misses', 0)} misses, {fill.get('stores', 0)} stores; epochs 2+: {rest['hits']} hits, "
            f"{rest['misses']} misses; {stats.get('rows')} rows, {_fmt_bytes(stats.get('bytes'))} ({tiers}); "
            f"{stats.get('evictions', 0)} evictions, {stats.get('skipped', 0)} skipped"
        )
    f = results.get(FLOOR)
    if f is not None and f.setup_s is not None:
        lines.append(f"floor: boundary features precomputed once, kept in the model's device memory, in "
                     f"{f.setup_s:.2f} s (outside its timed epochs)")

    def r(key, fmt="{:.2f}x"):
        v = ratios.get(key)
        return "-" if v is None else fmt.format(v)

    lines.append("ratios of median steps, epochs 2+ (every epoch has the same steps):")
    lines.append(f"  cached / floor: {r('cached_vs_floor')} (goal on H100/H200: <= 1.15x)")
    goal = " (goal on H100/H200, encoder freeze 8 of 12: >= 4x)" if family == "encoder" else ""
    lines.append(f"  full fine-tune / cached: {r('full_vs_cached')} faster{goal}")
    lines.append(f"  naive freeze / cached: {r('naive_vs_cached')} faster")
    lines.append(f"  freezert (no cache) / cached: {r('uncached_vs_cached')} faster")
    lines.append(f"  cache fill (epoch 1) / freezert (no cache): {r('fill_vs_uncached')} (the fill's overhead)")
    lines.append(f"  epoch times: cached / floor {r('cached_epoch_vs_floor')}, "
                 f"full fine-tune / cached {r('full_epoch_vs_cached_epoch')} faster")
    return "\n".join(lines)


_IO_FOR_CODEC = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}


def host_bandwidth(device: torch.device, codec: str = "fp16", mib: int = 512, reps: int = 10) -> dict:
    """Pinned-host->device copy bandwidth vs the native host-tier gather (``_native.gather_decode`` reading a
    pinned store from the GPU), in GB/s of bytes read; CUDA events, synchronised before reading them."""
    from . import _native

    info = _native.native_info()
    if not info.get("cuda_available"):
        return {"skipped": "the native CUDA kernels are not usable here: "
                           f"{info.get('cuda_reason') or info.get('reason') or 'not compiled with CUDA'}"}
    with torch.cuda.device(device):
        return _host_bandwidth(device, codec, mib, reps)


def _host_bandwidth(device: torch.device, codec: str, mib: int, reps: int) -> dict:
    from . import _native

    nbytes = mib * 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn) -> float:
        fn()  # warm-up (allocations, first-touch)
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    copy_s = timed(lambda: host.to(device, non_blocking=True))
    host = None  # free the pinned buffer before the store is allocated

    # The host tier's gather: a batch of whole rows picked at random from a pinned store of the codec's dtype.
    store_dtype = _native.CODECS[codec]
    esize = torch.empty((), dtype=store_dtype).element_size()
    dim = 128 * 1024  # elements per row (a boundary row of a mid-size model)
    rows = max(nbytes // (dim * esize), 2)
    batch = max(rows // 4, 1)
    store = torch.empty(rows, dim, dtype=store_dtype, pin_memory=True)
    store.view(torch.uint8).fill_(0x30)  # finite in every codec
    scales = torch.ones(rows, dtype=torch.float32, pin_memory=True) if codec == "fp8" else None
    index = torch.randperm(rows)[:batch].to(device)
    out = torch.empty(batch, dim, dtype=_IO_FOR_CODEC[codec], device=device)
    gather_s = timed(lambda: _native.gather_decode(store, scales, index, out, codec))
    read = batch * dim * esize + (batch * 4 if codec == "fp8" else 0)
    copy_gbs, gather_gbs = nbytes / copy_s / 1e9, read / gather_s / 1e9
    return {
        "copy_bytes": nbytes,
        "copy_GBps": copy_gbs,
        "gather_bytes_read": read,
        "gather_rows": batch,
        "gather_row_bytes": dim * esize,
        "gather_GBps": gather_gbs,
        "codec": codec,
        "ratio": gather_gbs / copy_gbs,
    }


def _bandwidth_report(device: torch.device, codec: str) -> tuple[str, dict]:
    if device.type != "cuda":
        return "host-tier bandwidth check: needs a GPU (this run is on the CPU); skipped", {"skipped": "no GPU"}
    bw = host_bandwidth(device, codec)
    if "skipped" in bw:
        return f"host-tier bandwidth check: skipped ({bw['skipped']})", bw
    return (
        f"host-tier bandwidth check ({codec}): pinned host->device copy {bw['copy_GBps']:.1f} GB/s, native gather "
        f"from the pinned store {bw['gather_GBps']:.1f} GB/s of rows read ({bw['gather_rows']} rows of "
        f"{bw['gather_row_bytes'] / 2**10:.0f} KiB): {100 * bw['ratio']:.0f}% of the copy (goal >= 80%)",
        bw,
    )


def _cache_variant(args) -> dict | None:
    """``--cache``: the feature-cache benchmark (variants across epochs, the floor, the host-tier bandwidth).

    Prints its table and returns its numbers as a JSON-ready dict; None without ``--cache``.
    """
    if not getattr(args, "cache", False):
        return None
    import gc

    device = _resolve_device(args.device)
    family, chosen = _cache_defaults(args, device)
    _check_cache_args(args, family, device)
    try:
        import freezert.cache  # noqa: F401
    except ImportError as e:
        print(f"--cache: freezert.cache is not importable ({e}); skipped")
        return None
    torch.manual_seed(args.seed)
    task = _YoloTask(args, device) if family == "yolo" else _EncoderTask(args, device)
    steps = args.dataset_size // args.batch
    slices = [slice(i * args.batch, (i + 1) * args.batch) for i in range(steps)]
    batches = [(s, task.batch(s)) for s in slices]
    cuda = device.type == "cuda"
    dev = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    keys = "explicit ids (--ids)" if args.ids else "content hashes"
    print(
        f"freezert bench --cache: {task.describe}, batch {args.batch}, dataset {steps * args.batch} samples "
        f"({steps} steps/epoch), {args.epochs} epochs, freeze {args.freeze}, cache {args.codec} where={args.where} "
        f"keyed by {keys}, {args.warmup} warm-up steps on other data, on {dev}"
    )
    if chosen:
        print(f"defaults chosen for {device.type}: {', '.join(chosen)}")

    results: dict[str, EpochResult] = {}
    stats = None
    bar = _progress(len(CACHE_VARIANTS) * (args.warmup + args.epochs * steps), "bench --cache", not args.quiet)
    for name in CACHE_VARIANTS:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)  # the dataset and anything else already resident
            torch.cuda.reset_peak_memory_stats(device)
        v = _EpochVariant(name, task, args, device, batches)
        for _ in range(args.warmup):
            v.step(None, None, task.warm)
            bar.update()
        for _ in range(args.epochs):
            before = v.counters()
            v._sync()
            t0 = time.perf_counter()
            times = []
            for i, (s, b) in enumerate(batches):
                times.append(v.step(i, s, b))
                bar.update()
            v._sync()
            epoch_s = time.perf_counter() - t0
            after = v.counters()
            v.result.epochs.append(
                {"step_ms": times, "epoch_s": epoch_s, "cache": {k: after[k] - before.get(k, 0) for k in after}}
            )
        if cuda:
            torch.cuda.synchronize(device)
            v.result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        if name == CACHED:
            stats = v.fm.cache.stats()
        results[name] = v.result
        del v
    bar.close()
    gc.collect()

    ratios = _cache_ratios(results)
    print(format_cache_table(results, device))
    print(_cache_summary(results, stats, ratios, family))
    bw_line, bw = _bandwidth_report(device, args.codec)
    print(bw_line)
    out: dict = {
        "config": dict(
            _config(args, device), family=family, epochs=args.epochs, dataset_size=args.dataset_size,
            steps_per_epoch=steps, codec=args.codec, where=args.where, ids=bool(args.ids),
            seq_len=args.seq_len if family == "encoder" else None,
            encoder=task.sizes if family == "encoder" else None,
        ),
        "variants": {},
        "ratios": ratios,
        "cache_stats": _jsonable(stats),
        "bandwidth": bw,
    }
    for name, r in results.items():
        out["variants"][name] = {
            "trainable_params": r.trainable,
            "epoch1_median_step_ms": r.first_ms,
            "epoch2plus_median_step_ms": r.rest_ms,
            "epoch1_s": r.first_s,
            "epoch2plus_median_s": r.rest_s,
            "epochs": r.epochs,
            "peak_bytes": r.peak_bytes,
            "final_loss": r.loss,
            "setup_s": r.setup_s,
        }
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def cmd_bench_cache(args) -> int:
    """``freezert bench --cache``: the feature-cache benchmark alone (see ``_cache_variant``)."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"freezert: --threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        data = _cache_variant(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
    if data is None:
        return 1
    if args.json:
        _write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


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


def _train_options(p: argparse.ArgumentParser, steps_help: str, models=None) -> None:
    yolos = [m for m in MODELS if m.startswith("yolov5")]
    p.add_argument("--model", default=None, choices=models or yolos,
                   help="detector size (default: yolov5n on CPU; see the subcommand for GPU)"
                   + ("; encoder with --cache" if models else ""))
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--img", type=int, default=None, help="square image size in pixels (a multiple of 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--freeze", type=int, default=_Unset(10),
                   help="freeze blocks 0..N-1 (default: 10, the backbone; 8 of 12 layers for --cache --model encoder)")
    p.add_argument("--bn", default="frozen", choices=["frozen", "train"], help="freezert's frozen BatchNorm mode")
    p.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA only), as YOLOv5 trains")
    p.add_argument("--graphs", action="store_true", help="freezert: capture the frozen segment in a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="freezert: channels_last frozen segment")
    p.add_argument("--cache", action="store_true",
                   help="bench: the feature-cache benchmark instead: full fine-tune, naive freeze, freezert, "
                   "freezert with the cache (epoch 1 fills, epochs 2+ hit) and the floor (the trainable part on "
                   "precomputed features) over --epochs of a fixed --dataset-size, plus the host-tier gather "
                   "bandwidth on a GPU; demo: the same after its table")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of per-block gradient norms over steps and memory over time (needs "
                   "matplotlib; not with bench --cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cache_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--cache", "the feature-cache benchmark (defaults by model and device)")
    g.add_argument("--epochs", type=int, default=None, help="epochs over the dataset (default: 3; at least 2)")
    g.add_argument("--dataset-size", type=int, default=None, metavar="N",
                   help="samples in the fixed synthetic dataset (default: yolo 24 CPU / 384 GPU; encoder 64 / 512)")
    g.add_argument("--codec", default="fp16", choices=["fp16", "bf16", "fp8", "fp32"], help="the cache's codec")
    g.add_argument("--where", default="auto", choices=["auto", "cuda", "host", "disk"], help="the cache's tier")
    g.add_argument("--ids", action="store_true", help="key the cache by dataset index (cache_ids=) instead of content")
    g.add_argument("--seq-len", type=int, default=None, help="encoder: tokens per sample (default: 64 CPU, 256 GPU)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the run (default: torch's); 1 keeps a shared, busy CPU from stalling")


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
    _train_options(p, "timed steps per variant and repeat (default: 30 on GPU, 10 on CPU)",
                   models=[m for m in MODELS if m.startswith("yolov5")] + ["encoder"])
    p.add_argument("--repeats", type=int, default=None, help="round-robin repeats; the median is reported")
    _cache_options(p)
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
