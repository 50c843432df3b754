"""``freezert`` command line: ``inspect`` a model's blocks, ``demo`` and ``bench`` freezert against naive freezing.

Argument parsing and printing only; the harness (variants, tasks, runners, reports) is :mod:`freezert.bench`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn as nn

from . import bench
from ._errors import FreezeError
from .bench import MODELS, VARIANTS, TrainConfig

_YOLOS = [m for m in MODELS if m.startswith("yolov5")]
_ENCODER_FREEZE = 8  # bench --cache --model encoder: 8 of its 12 layers
# bench --cache options left unset, by model family and device: CPU sizes finish in well under a minute on two cores.
_CACHE_DEFAULTS = {
    ("yolo", "cpu"): {"img": 64, "batch": 2, "dataset_size": 24, "epochs": 3, "warmup": 2},
    ("yolo", "cuda"): {"img": 512, "batch": 48, "dataset_size": 384, "epochs": 3, "warmup": 3},
    ("encoder", "cpu"): {"seq_len": 64, "batch": 8, "dataset_size": 64, "epochs": 3, "warmup": 2},
    ("encoder", "cuda"): {"seq_len": 256, "batch": 32, "dataset_size": 512, "epochs": 3, "warmup": 3},
}


# --- inspect --------------------------------------------------------------------------------------------


def load_model(spec: str) -> nn.Module:
    """A built-in model name, ``package.module:factory`` (called with no arguments) or a checkpoint path."""
    if spec in MODELS:
        return bench.build_model(spec)
    if os.path.isfile(spec):
        # A pickled module: unpickling runs code from the file, as torch.load(weights_only=False) always does.
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(obj, dict):  # Ultralytics/YOLOv5 checkpoints keep the module under "model" (or "ema")
            obj = next((obj[k] for k in ("model", "ema", "module") if isinstance(obj.get(k), nn.Module)), obj)
        if isinstance(obj, nn.Module):
            return obj
        what = "a state_dict (weights only)" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise SystemExit(
            f"freezert: --model {spec} holds {what}, not a pickled nn.Module; save the module itself "
            "(torch.save(model, path)) or pass --model package.module:factory that builds it"
        )
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path:  # the console script's path lacks the working directory; python -m has it
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(mod_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"freezert: --model {spec}: cannot import it ({e}); pass package.module:factory") from None
        model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
        if not isinstance(model, nn.Module):
            raise SystemExit(
                f"freezert: --model {spec} gave a {type(model).__name__}, not an nn.Module; "
                "point it at a module or a function that returns one"
            )
        return model
    raise SystemExit(
        f"freezert: --model {spec!r} is neither a built-in model ({', '.join(MODELS)}), a package.module:factory "
        "nor an existing checkpoint file"
    )


def _freeze_item(s: str):
    if s.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_freeze(text: str):
    """``--freeze`` as ``freeze=`` takes it: ``10``, ``0.5``, ``model.3``, ``none``; a comma makes a list
    (``0,1,2``, ``model.1,model.2``; ``3,`` is the one-item list [3])."""
    if "," not in text:
        return _freeze_item(text.strip())
    items = [_freeze_item(s.strip()) for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"freezert: --freeze {text!r} lists nothing; pass e.g. 0,1,2 or model.1,model.2")
    return items


def cmd_inspect(args) -> int:
    import freezert

    model = load_model(args.model)
    freeze = (
        parse_freeze(args.freeze)
        if args.freeze is not None
        else bench.DEFAULT_FREEZE.get(args.model, 10 if args.model in _YOLOS else None)
    )
    example = _example_input(args, model)
    if args.memory:
        if example is None:
            raise FreezeError("--memory runs one training step; give its input shape with --input, e.g. 2,3,224,224")
        fm = freezert.wrap(model, freeze).train()
        fm.plan(example)
        print(fm.inspect())
        print()
        print(fm.memory_report(example, plot=args.plot))
        fm.unwrap()
        return 0
    print(freezert.inspect(model, freeze, example_inputs=example))
    return 0


def _example_input(args, model: nn.Module) -> torch.Tensor | None:
    """A random batch of ``--input``'s shape (float images; integer tokens for the built-in encoder), or None."""
    shape = args.input
    if shape is None:
        shape = {"cnn": "2,3,64,64", "encoder": "2,32"}.get(args.model, "2,3,128,128" if args.model in _YOLOS else None)
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape.split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise FreezeError(f"--input {shape!r} is not a shape; pass positive sizes such as 2,3,224,224")
    g = torch.Generator().manual_seed(0)
    if args.model == "encoder":
        return torch.randint(0, 100, dims, generator=g)
    return torch.rand(dims, generator=g)


# --- demo and bench -------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"freezert: --device {device} was asked for but CUDA is not available; pass --device cpu")
    return torch.device(device)


def _pick(args, cpu: dict, gpu: dict, device: torch.device) -> list[str]:
    """Fills options left unset with the CPU or GPU default; returns descriptions of what was chosen."""
    chosen = []
    for key, value in (gpu if device.type == "cuda" else cpu).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value}")
    return chosen


def _check_yolo(args) -> None:
    if args.freeze < 1:
        raise SystemExit(f"freezert: --freeze {args.freeze}: must be at least 1 to compare freezing variants")
    if args.img < 64 or args.img % 32:
        raise SystemExit(f"freezert: --img {args.img} must be a multiple of 32 and at least 64 (the detector's stride)")
    if args.batch < 1 or args.steps < 1:
        raise SystemExit(f"freezert: --batch {args.batch} and --steps {args.steps} must both be at least 1")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def _header(title: str, args, device: torch.device, chosen: list[str]) -> str:
    print(
        f"freezert {title}: {args.model}, img {args.img}, batch {args.batch}, freeze {args.freeze}, "
        f"on {_device_name(device)}"
    )
    if chosen:
        print(f"defaults chosen for {device.type}: {', '.join(chosen)}")
    return f"{args.model}, {args.img} px, batch {args.batch}, freeze {args.freeze}, on {_device_name(device)}"


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


def _config(args, device: torch.device) -> dict:
    keys = ("model", "img", "batch", "steps", "repeats", "warmup", "freeze", "bn", "amp", "graphs", "channels_last")
    cfg = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    cfg["device"] = str(device)
    cfg["torch"] = torch.__version__
    if device.type == "cuda":
        cfg["device_name"] = torch.cuda.get_device_name(device)
    return cfg


def _compare(args, title: str, cpu: dict, gpu: dict, *, stepwise: bool, monitor_steps, budget_s) -> int:
    """demo and bench: the three variants alternated, the table, the monitors, the verdict, JSON and plot."""
    if args.plot:
        bench.require_plot()  # before the run, not after it
    device = _resolve_device(args.device)
    chosen = _pick(args, cpu, gpu, device)
    _check_yolo(args)
    plot_title = _header(title, args, device, chosen)
    # demo alternates step by step; bench in --repeats round-robin blocks of --steps steps
    steps, block = (args.steps, 1) if stepwise else (args.steps * args.repeats, args.steps)
    mon = monitor_steps(args)
    budget = budget_s(args, device)
    how = "step by step" if stepwise else f"round-robin, {args.repeats} repeats x {args.steps} steps"
    print(
        f"{steps} timed steps per variant, alternated {how}, after {args.warmup} warm-up steps; "
        f"then {mon} untimed steps per variant under the monitors"
    )
    torch.manual_seed(args.seed)
    initial = bench.build_model(args.model)
    bench.check_depth(initial, args.freeze, args.model)
    batches = bench.synthetic_batches(initial, 2, args.batch, args.img, device, args.seed)
    bar = _progress(len(VARIANTS) * (args.warmup + steps + mon), title, not args.quiet)
    try:
        run = bench.compare(
            initial,
            batches,
            TrainConfig.from_args(args),
            device,
            steps=steps,
            warmup=args.warmup,
            block=block,
            monitor_steps=mon,
            budget_s=budget,
            progress=bar,
        )
    finally:
        bar.close()
    results = run.results
    print(bench.format_table(results, device))
    if run.stopped:
        print(f"{run.stopped}: the medians cover the steps run")
    table = bench.format_monitor_table(results, args.freeze)
    if table:
        print(table)
    line = bench.verdict(results)
    if args.plot:
        print(bench.write_plot(args.plot, results, device, f"freezert {title}: {plot_title}"))
    if args.json:
        bench.write_json(args.json, bench.results_json(results, _config(args, device), line))
        print(f"wrote {args.json}")
    print(line)
    return 0


def cmd_demo(args) -> int:
    return _compare(
        args,
        "demo",
        cpu={"model": "yolov5n", "steps": 30, "img": 128, "batch": 8, "warmup": 3},
        gpu={"model": "yolov5s", "steps": 200, "img": 128, "batch": 8, "warmup": 5},
        stepwise=True,
        monitor_steps=lambda a: max(2, min(a.steps, 10)),  # the CV needs two steps
        # a CPU demo stays under about two minutes even on a busy machine
        budget_s=lambda a, d: (60.0 if d.type == "cpu" else 0.0) if a.budget is None else a.budget,
    )


def cmd_bench(args) -> int:
    if args.cache:  # the feature-cache benchmark: its own epochs, variants and table
        return cmd_bench_cache(args)
    return _compare(
        args,
        "bench",
        cpu={"model": "yolov5n", "img": 128, "batch": 4, "steps": 10, "repeats": 3, "warmup": 2},
        gpu={"model": "yolov5m", "img": 512, "batch": 48, "steps": 30, "repeats": 3, "warmup": 5},
        stepwise=False,
        monitor_steps=lambda a: max(a.steps, 2),
        budget_s=lambda a, d: None,
    )


def cmd_bench_cache(args) -> int:
    """``freezert bench --cache``: the feature-cache benchmark (variants across epochs, floor, bandwidth)."""
    if args.plot:
        raise SystemExit("freezert: --plot draws demo/bench's step times; bench --cache has no plot, drop --plot")
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"freezert: --threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        data = _run_cache(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back
    if args.json:
        bench.write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


def _cache_defaults(args, device: torch.device) -> tuple[str, list[str]]:
    chosen = []
    if args.model is None:
        args.model = "yolov5m" if device.type == "cuda" else "yolov5n"
        chosen.append(f"model={args.model}")
    family = "encoder" if args.model == "encoder" else "yolo"
    for key, value in _CACHE_DEFAULTS[(family, device.type)].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value}")
    if args.freeze is None:
        args.freeze = _ENCODER_FREEZE if family == "encoder" else 10
        if family == "encoder":
            chosen.append(f"freeze={_ENCODER_FREEZE}")
    return family, chosen


def _check_cache_args(args, family: str, device: torch.device) -> None:
    if args.freeze < 1:
        raise SystemExit(
            f"freezert: --freeze {args.freeze}: must be at least 1 (the cache keeps the frozen prefix's outputs)"
        )
    if args.epochs < 2:
        raise SystemExit(f"freezert: --epochs {args.epochs}: need at least 2 (epoch 1 fills the cache, 2+ hit it)")
    if args.batch < 1 or args.dataset_size < args.batch:
        raise SystemExit(
            f"freezert: --dataset-size {args.dataset_size} must hold at least one --batch {args.batch} (batch >= 1)"
        )
    if args.warmup < 0:
        raise SystemExit(f"freezert: --warmup {args.warmup} must be at least 0")
    if family == "yolo" and (args.img < 64 or args.img % 32):
        raise SystemExit(f"freezert: --img {args.img} must be a multiple of 32 and at least 64 (the detector's stride)")
    if family == "encoder" and not 1 <= args.seq_len <= 4096:
        raise SystemExit(f"freezert: --seq-len {args.seq_len} must be between 1 and 4096")
    if args.bn != "frozen":
        raise SystemExit(
            f"freezert: --bn {args.bn}: --cache needs --bn frozen "
            "(batch statistics make a sample's features batch-dependent)"
        )
    if args.where == "cuda" and device.type != "cuda":
        raise SystemExit(
            "freezert: --where cuda keeps the cache in CUDA memory, but this run is on the CPU; pass --where auto"
        )


def _run_cache(args) -> dict:
    device = _resolve_device(args.device)
    family, chosen = _cache_defaults(args, device)
    _check_cache_args(args, family, device)
    torch.manual_seed(args.seed)
    common = dict(batch=args.batch, dataset_size=args.dataset_size, freeze=args.freeze, device=device, seed=args.seed)
    if family == "yolo":
        task = bench.YoloTask(model=args.model, img=args.img, **common)
    else:
        task = bench.EncoderTask(seq_len=args.seq_len, **common)
    batches = bench.epoch_batches(task, args.batch, args.dataset_size)
    steps = len(batches)
    keys = "explicit ids (--ids)" if args.ids else "content hashes"
    print(
        f"freezert bench --cache: {task.describe}, batch {args.batch}, dataset {steps * args.batch} samples "
        f"({steps} steps/epoch), {args.epochs} epochs, freeze {args.freeze}, cache {args.codec} where={args.where} "
        f"keyed by {keys}, {args.warmup} warm-up steps on other data, on {_device_name(device)}"
    )
    if chosen:
        print(f"defaults chosen for {device.type}: {', '.join(chosen)}")
    cache = bench.CacheConfig(codec=args.codec, where=args.where, ids=bool(args.ids))
    bar = _progress(len(bench.CACHE_VARIANTS) * (args.warmup + args.epochs * steps), "bench --cache", not args.quiet)
    try:
        results, stats = bench.run_epochs(
            task,
            batches,
            TrainConfig.from_args(args),
            cache,
            device,
            epochs=args.epochs,
            warmup=args.warmup,
            progress=bar,
        )
    finally:
        bar.close()
    ratios = bench.cache_ratios(results)
    print(bench.format_cache_table(results, device))
    print(bench.cache_summary(results, stats, ratios, family))
    bw = bench.host_bandwidth(device, args.codec)
    print(bench.bandwidth_line(bw, args.codec))
    config = dict(
        _config(args, device),
        family=family,
        epochs=args.epochs,
        dataset_size=args.dataset_size,
        steps_per_epoch=steps,
        codec=args.codec,
        where=args.where,
        ids=bool(args.ids),
        seq_len=args.seq_len if family == "encoder" else None,
        encoder=getattr(task, "sizes", None),
    )
    return bench.cache_results_json(results, stats, ratios, bw, config)


# --- argument parsing -----------------------------------------------------------------------------------


def _train_options(
    p: argparse.ArgumentParser, *, models: list[str], model_default: str, steps: str, freeze_default: str
) -> None:
    p.add_argument("--model", default=None, choices=models, help=f"the built-in model (default: {model_default})")
    p.add_argument("--steps", type=int, default=None, help=steps)
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--img", type=int, default=None, help="square image size in pixels, a multiple of 32")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant before measuring")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--freeze", type=int, default=None, help=f"freeze blocks 0..N-1 (default: {freeze_default})")
    p.add_argument("--bn", default="frozen", choices=["frozen", "train"], help="freezert's frozen BatchNorm mode")
    p.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA only), as YOLOv5 trains")
    p.add_argument("--graphs", action="store_true", help="freezert: capture the frozen segment in a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="freezert: channels_last frozen segment")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers to PATH as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the synthetic data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _plot_option(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG of the step times (median, IQR) and the memory of each variant; needs "
        f"matplotlib (pip install 'freezert[plot]'){extra}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freezert",
        description="Inspect a model's blocks; compare full fine-tuning, naive freezing and freezert.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect",
        help="print a model's block table and where a freeze= cuts it",
        description="Print the block table of a built-in model, your own model or a checkpoint, and the cut "
        "that --freeze makes (freezert.inspect).",
    )
    p.add_argument(
        "--model",
        default="yolov5s",
        metavar="MODEL",
        help=f"a built-in model ({', '.join(MODELS)}), package.module:factory (a function returning "
        "an nn.Module, imported from the working directory too) or a checkpoint file holding a pickled "
        "nn.Module (unpickling runs code: only files you trust) (default: yolov5s)",
    )
    p.add_argument(
        "--freeze",
        default=None,
        metavar="FREEZE",
        help="what freeze= takes: 10 (blocks 0..9), 0.5 (half the blocks), model.3 (a name prefix), "
        "0,1,2 or model.1,model.2 (lists; 3, is the list [3]), none (default: 10 for yolov5*, 3 cnn, "
        "6 encoder, none for other models)",
    )
    p.add_argument(
        "--input",
        default=None,
        metavar="SHAPE",
        help="the input's shape, e.g. 2,3,224,224: one recorded forward shows the stem, the head and "
        "which frozen blocks must run eagerly (default for the built-in models; else no record)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also run one training step and print where its memory goes and what each option saves (fm.memory_report)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="with --memory: draw the report into this PNG")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "demo",
        help="train the built-in YOLOv5 on synthetic data: full fine-tune vs naive freeze vs freezert",
        description="Trains three copies of the built-in YOLOv5 on the same synthetic batches, alternated step "
        "by step: full fine-tuning, YOLOv5-style naive freezing and freezert.wrap. Prints the median and IQR "
        "of step times, memory and ratios, the gradient monitors, and a one-line verdict. Defaults: GPU "
        "yolov5s, 200 steps, batch 8, 128 px; CPU yolov5n, 30 steps, batch 8, 128 px.",
    )
    _train_options(
        p,
        models=_YOLOS,
        model_default="yolov5n on CPU, yolov5s on GPU",
        steps="timed steps per variant (default: 30 on CPU, 200 on GPU)",
        freeze_default="10, the backbone",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end the timed steps after this long in all (default: 60 on CPU, none on GPU; 0 = none)",
    )
    _plot_option(p)
    p.set_defaults(func=cmd_demo, repeats=1, cache=False)

    p = sub.add_parser(
        "bench",
        help="the same comparison at the seed paper's scale, variants alternated round-robin; "
        "--cache: the feature cache",
        description="Full fine-tune vs naive freeze vs freezert, all resident, alternated in round-robin "
        "repeats of --steps steps; then untimed steps under the monitors. Defaults: GPU yolov5m, 512 px, batch "
        "48, 3 repeats of 30 steps; CPU yolov5n, 128 px, batch 4, 3 repeats of 10 steps. With --cache: the "
        "feature-cache benchmark instead (full fine-tune, naive freeze, freezert, freezert with the cache, and "
        "the floor: the trainable part on precomputed features) over --epochs of a fixed dataset, plus the "
        "host-tier gather bandwidth on a GPU.",
    )
    _train_options(
        p,
        models=_YOLOS + ["encoder"],
        model_default="yolov5n on CPU, yolov5m on GPU; encoder only with --cache",
        steps="timed steps per variant and repeat (default: 10 on CPU, 30 on GPU)",
        freeze_default="10, the backbone; 8 of 12 layers for --cache --model encoder",
    )
    p.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default: 3)")
    _plot_option(p, "; not with --cache")
    g = p.add_argument_group("--cache", "the feature-cache benchmark (defaults by model and device)")
    g.add_argument("--cache", action="store_true", help="run the feature-cache benchmark instead")
    g.add_argument("--epochs", type=int, default=None, help="epochs over the dataset (default: 3; at least 2)")
    g.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        metavar="N",
        help="samples in the fixed synthetic dataset (default: yolo 24 CPU / 384 GPU; encoder 64 / 512)",
    )
    g.add_argument("--codec", default="fp16", choices=["fp16", "bf16", "fp8", "fp32"], help="the cache's codec")
    g.add_argument("--where", default="auto", choices=["auto", "cuda", "host", "disk"], help="the cache's tier")
    g.add_argument("--ids", action="store_true", help="key the cache by dataset index (cache_ids=) instead of content")
    g.add_argument("--seq-len", type=int, default=None, help="encoder: tokens per sample (default: 64 CPU, 256 GPU)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the run (default: torch's); 1 keeps a shared, busy CPU from stalling",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _fill_freeze(args) -> None:
    # demo/bench: 10 (the backbone); bench --cache chooses by model family
    if args.command in ("demo", "bench") and args.freeze is None and not getattr(args, "cache", False):
        args.freeze = 10
    if args.command == "bench" and not args.cache:
        if args.model == "encoder":
            raise SystemExit(
                "freezert: bench --model encoder runs only with --cache; pass a yolov5* model or add --cache"
            )
        if args.repeats is not None and args.repeats < 1:
            raise SystemExit(f"freezert: --repeats {args.repeats} must be at least 1")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freezert`` console script and ``python -m freezert``."""
    from ._errors import FreezeError

    args = build_parser().parse_args(argv)
    _fill_freeze(args)
    try:
        return args.func(args)
    except FreezeError as e:  # a bad --freeze for this model, a setting the harness refuses: no traceback
        print(f"freezert: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
