"""What ``freezert demo`` and ``freezert bench`` run and print, given the parsed arguments (the parser, ``inspect``
and the model loader are :mod:`freezert.cli`)."""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from .. import bench
from .._errors import FreezeError
from .catalog import DEFAULT_FREEZE, VARIANTS, YOLOS, options_mode
from .loading import example_input, load_model, parse_freeze

_ENCODER_FREEZE = 8  # bench --cache --model encoder: 8 of its 12 layers
# bench --cache options left unset, by model family and device: CPU sizes finish in well under a minute on two cores.
_CACHE_DEFAULTS = {
    ("yolo", "cpu"): {"img": 64, "batch": 2, "dataset_size": 24, "epochs": 3, "warmup": 2},
    ("yolo", "cuda"): {"img": 512, "batch": 48, "dataset_size": 384, "epochs": 3, "warmup": 3},
    ("encoder", "cpu"): {"seq_len": 64, "batch": 8, "dataset_size": 64, "epochs": 3, "warmup": 2},
    ("encoder", "cuda"): {"seq_len": 256, "batch": 32, "dataset_size": 512, "epochs": 3, "warmup": 3},
}


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
    n = torch.get_num_threads()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({n} thread{'s' if n > 1 else ''})"


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


@contextlib.contextmanager
def _threads(n: int | None):
    """``--threads``: torch's CPU threads for the run; the caller's setting comes back after (tests run in-process).

    The CPU default of every comparison is one thread: two OpenMP threads on a shared machine stall whenever another
    process takes a core, each stall lands on one variant's step, and the demo's step-time IQR grew to 5-7x its
    median (yolov5n, two threads, load ~5); with one thread it stays within 0.4x and the run takes a third as long.
    """
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise SystemExit(f"freezert: --threads {n} must be at least 1")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compare(args, title: str, cpu: dict, gpu: dict, *, stepwise: bool, monitor_steps, budget_s) -> int:
    """demo and bench: the three variants alternated, the table, the monitors, the verdict, JSON and plot."""
    if args.plot:
        bench.require_plot()  # before the run, not after it
    device = _resolve_device(args.device)
    chosen = _pick(args, {**cpu, "threads": 1}, gpu, device)
    with _threads(args.threads):
        return _run_compare(
            args, title, device, chosen, stepwise=stepwise, monitor_steps=monitor_steps, budget_s=budget_s
        )


def _run_compare(args, title: str, device, chosen, *, stepwise: bool, monitor_steps, budget_s) -> int:
    _check_yolo(args)
    plot_title = _header(title, args, device, chosen)
    # demo alternates step by step; bench in --repeats round-robin blocks of --steps steps
    steps, block = (args.steps, 1) if stepwise else (args.steps * args.repeats, args.steps)
    mon = monitor_steps(args)
    budget = budget_s(args, device)
    how = "step by step" if stepwise else f"round-robin, {args.repeats} repeats x {args.steps} steps"
    limit = f", or until {budget:g} s have passed" if budget else ""
    print(
        f"{steps} timed steps per variant{limit}, alternated {how}, after {args.warmup} warm-up steps; "
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
            bench.TrainConfig.from_args(args),
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
        print(f"note: {run.stopped}; the medians and the verdict cover the steps run")
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
    if options_mode(args):
        return cmd_bench_options(args)  # the user's model: what each option saves
    return _compare(
        args,
        "bench",
        cpu={"model": "yolov5n", "img": 128, "batch": 4, "steps": 10, "repeats": 3, "warmup": 2},
        gpu={"model": "yolov5m", "img": 512, "batch": 48, "steps": 30, "repeats": 3, "warmup": 5},
        stepwise=False,
        monitor_steps=lambda a: max(a.steps, 2),
        budget_s=lambda a, d: a.budget or None,
    )


def cmd_bench_cache(args) -> int:
    """``freezert bench --cache``: the feature-cache benchmark (variants across epochs, floor, bandwidth)."""
    if args.plot:
        raise SystemExit("freezert: --plot draws demo/bench's step times; bench --cache has no plot, drop --plot")
    if args.threads is None and _resolve_device(args.device).type == "cpu":
        args.threads = 1  # as every CPU comparison (_threads)
    with _threads(args.threads):
        data = _run_cache(args)
    if args.json:
        bench.write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


# bench --model MODEL --input SHAPE: defaults by device. The budget keeps ResNet-50 at 8x3x160x160 freeze 3 under
# three minutes on two cores, setup included (about 20 rounds on a quiet machine).
_OPTIONS_DEFAULTS = {
    "cpu": {"steps": 30, "warmup": 1, "budget": 140.0, "threads": 1},
    "cuda": {"steps": 100, "warmup": 3},
}


def cmd_bench_options(args) -> int:
    """``freezert bench --model M --input SHAPE``: naive freezing, freezert's defaults, the cache and each memory
    option on the user's model, alternated step by step; the table and a verdict."""
    start = time.perf_counter()
    unsupported = [f"--{k.replace('_', '-')}" for k in ("plot", "amp", "graphs", "channels_last") if getattr(args, k)]
    if args.img is not None or args.batch is not None:
        unsupported.append("--img/--batch (the shape comes from --input)")
    if unsupported:
        raise SystemExit(
            f"freezert: bench --model ... --input compares wrap()'s options on your model and does not take "
            f"{', '.join(unsupported)}; drop them"
        )
    device = _resolve_device(args.device)
    chosen = []
    for key, value in _OPTIONS_DEFAULTS[device.type].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            chosen.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    with _threads(args.threads):
        return _run_options(args, device, chosen, start)


def _run_options(args, device: torch.device, chosen: list[str], start: float) -> int:
    args.model = args.model or "yolov5n"
    model = load_model(args.model)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"freezert: --steps {args.steps} and --warmup {args.warmup} must both be at least 1")
    default = DEFAULT_FREEZE.get(args.model, 10 if args.model in YOLOS else 0.5)
    freeze = parse_freeze(args.freeze) if args.freeze is not None else default
    x = example_input(args.model, args.input)
    if x is None:
        raise FreezeError(
            "bench --model runs your model on synthetic inputs; give their shape with --input, e.g. 8,3,224,224"
        )
    gen = torch.Generator().manual_seed(args.seed + 1)
    second = (
        torch.randint_like(x, 0, 100, generator=gen)
        if not x.is_floating_point()
        else torch.rand(x.shape, generator=gen)
    )
    batches = [(x.to(device),), (second.to(device),)]
    shape = "x".join(map(str, x.shape))
    print(
        f"freezert bench: {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters), input {shape} {str(x.dtype).replace('torch.', '')}, freeze {freeze!r}, on {_device_name(device)}"
    )
    if chosen:
        print(f"defaults chosen for {device.type}: {', '.join(chosen)}")
    budget = args.budget or None
    until = f", or until {budget:g} s have passed since the start" if budget else ""
    print(
        "each option on its own copy of the model: SGD over what trains, loss = mean square of the outputs, the same "
        f"{len(batches)} synthetic batches; one checked forward and {args.warmup} warm-up step each, then up to "
        f"{args.steps} rounds of one step per option, the order rotated every round{until}"
    )
    print("naive freeze: requires_grad=False on the parameters freezert freezes, their modules in eval mode")
    options = bench.default_options(device)
    bar = _progress(len(options) * (args.warmup + args.steps), "bench", not args.quiet)
    try:
        run = bench.measure(
            model,
            batches,
            freeze,
            device,
            options=options,
            rounds=args.steps,
            warmup=args.warmup,
            deadline=None if budget is None else start + budget,
            bn=args.bn,
            seed=args.seed,
            progress=bar,
        )
    finally:
        bar.close()
    frozen = f"{run.frozen_params:,} of {run.total_params:,} parameters frozen"
    print(f"{frozen} ({100 * run.frozen_params / max(run.total_params, 1):.1f}%); {run.rounds} rounds timed")
    print(bench.format_options_table(run, device))
    if run.stopped:
        print(f"note: {run.stopped}; the medians and the verdict cover the rounds run")
    line = bench.options_verdict(run)
    if args.json:
        config = dict(_config(args, device), input=list(x.shape), freeze=repr(freeze), budget=budget)
        bench.write_json(args.json, bench.options_json(run, config, line))
        print(f"wrote {args.json}")
    print(line)
    print(f"({time.perf_counter() - start:.0f} s in all)")
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
            bench.TrainConfig.from_args(args),
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
