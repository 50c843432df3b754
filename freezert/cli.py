"""``freezert`` command line: ``inspect`` a model's blocks, ``demo`` and ``bench`` freezert against naive freezing.

Argument parsing and printing only; the harness (variants, tasks, runners, reports) is :mod:`freezert.bench`.
torch is imported by the commands, not by the parser: ``freezert --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from . import bench
from ._errors import FreezeError
from .bench.catalog import DEFAULT_FREEZE, MODELS, YOLOS, options_mode
from .bench.loading import example_input, load_model, parse_freeze

if TYPE_CHECKING:
    pass

_YOLOS = list(YOLOS)
# --- inspect --------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    from .wrapper import inspect, wrap

    if args.plot:
        if not args.memory:
            raise FreezeError(f"--plot {args.plot} draws the memory report; add --memory (and --input SHAPE)")
        bench.require_plot()  # before the model is built and stepped, not after
    model = load_model(args.model)
    freeze = (
        parse_freeze(args.freeze)
        if args.freeze is not None
        else DEFAULT_FREEZE.get(args.model, 10 if args.model in _YOLOS else None)
    )
    example = example_input(args.model, args.input)
    if args.memory:
        if example is None:
            raise FreezeError("--memory runs one training step; give its input shape with --input, e.g. 2,3,224,224")
        fm = wrap(model, freeze).train()
        fm.plan(example)
        print(fm.inspect())
        print()
        print(fm.memory_report(example, plot=args.plot))
        fm.unwrap()
        return 0
    print(inspect(model, freeze, example_inputs=example))
    return 0


# --- argument parsing -----------------------------------------------------------------------------------


def _train_options(
    p: argparse.ArgumentParser,
    *,
    models: list[str] | None,
    model_help: str,
    steps: str,
    freeze_help: str,
) -> None:
    p.add_argument("--model", default=None, choices=models, metavar=None if models else "MODEL", help=model_help)
    p.add_argument("--steps", type=int, default=None, help=steps)
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--img", type=int, default=None, help="square image size in pixels, a multiple of 32")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant before measuring")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--freeze", default=None, metavar="FREEZE", help=freeze_help)
    p.add_argument("--bn", default="frozen", choices=["frozen", "train"], help="freezert's frozen BatchNorm mode")
    p.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA only), as YOLOv5 trains")
    p.add_argument("--graphs", action="store_true", help="freezert: capture the frozen segment in a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="freezert: channels_last segment (default: auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the run (default: torch's); 1 keeps a shared, busy CPU from stalling",
    )
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
        model_help="the built-in model (default: yolov5n on CPU, yolov5s on GPU)",
        steps="timed steps per variant (default: 30 on CPU, 200 on GPU)",
        freeze_help="freeze blocks 0..N-1 (default: 10, the backbone)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end the timed steps after this long in all (default: 60 on CPU, none on GPU; 0 = none)",
    )
    _plot_option(p)
    p.set_defaults(func=_command("cmd_demo"), repeats=1, cache=False)

    p = sub.add_parser(
        "bench",
        help="what each option saves on your model (--model M --input SHAPE); the built-in YOLOv5 comparison at "
        "the seed paper's scale; --cache: the feature cache",
        description="With --input SHAPE or a model of your own (package.module:factory or a checkpoint, as "
        "inspect takes): naive freezing, freezert's defaults, the feature cache and each memory option "
        "(kernels='lean', memory_budget, dtype='int8'; dtype=float16 on CUDA), each on a copy of your model, "
        "alternated step by step on synthetic inputs; per option the median and IQR of step times, the ratio to "
        "naive freezing with its interval, bytes saved for backward, the CUDA peak, the largest output "
        "difference from naive freezing, and a verdict when the spread allows one. Defaults: CPU at most 30 "
        "rounds within 150 s in all; GPU 100 rounds. "
        "Else, on the built-in YOLOv5: full fine-tune vs naive freeze vs freezert, all resident, alternated in "
        "round-robin repeats of --steps steps, then untimed steps under the monitors (GPU yolov5m, 512 px, batch "
        "48, 3 repeats of 30 steps; CPU yolov5n, 128 px, batch 4, 3 repeats of 10 steps). With --cache: the "
        "feature-cache benchmark instead (full fine-tune, naive freeze, freezert, freezert with the cache, and "
        "the floor: the trainable part on precomputed features) over --epochs of a fixed dataset, plus the "
        "host-tier gather bandwidth on a GPU.",
    )
    _train_options(
        p,
        models=None,
        model_help=f"a built-in model ({', '.join(MODELS)}), package.module:factory (a function returning an "
        "nn.Module; torchvision.models:resnet50 works) or a checkpoint file holding a pickled nn.Module, as "
        "inspect takes (default: yolov5n on CPU, yolov5m on GPU; encoder only with --cache or --input)",
        steps="timed steps per variant and repeat (default: 10 on CPU, 30 on GPU); with --input: the most rounds "
        "(default: 30 on CPU, 100 on GPU)",
        freeze_help="what freeze= takes with --input (10, 0.5, layer3, 0,1,2; default: half the blocks, 3 for "
        "cnn); else blocks 0..N-1 (default: 10, the backbone; 8 of 12 layers for --cache --model encoder)",
    )
    p.add_argument(
        "--input",
        default=None,
        metavar="SHAPE",
        help="the shape of your model's input, e.g. 8,3,160,160 (random floats; integer tokens for the built-in "
        "encoder): compare wrap()'s options on your model",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="end the timed rounds once this long has passed since the start (default with --input: 150 on "
        "CPU, none on GPU; else none; 0 = none)",
    )
    p.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default: 3)")
    _plot_option(p, "; not with --cache or --input")
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
    p.set_defaults(func=_command("cmd_bench"))
    return parser


def _command(name: str):
    """A command of :mod:`freezert.bench.commands`, imported when it runs (it imports torch)."""

    def run(args) -> int:
        from .bench import commands

        return getattr(commands, name)(args)

    return run


def _fill_freeze(args) -> None:
    if options_mode(args):
        return  # any form freeze= takes, parsed when the model is known
    if args.command in ("demo", "bench") and args.freeze is not None:
        try:
            args.freeze = int(args.freeze)
        except ValueError:
            raise SystemExit(
                f"freezert: --freeze {args.freeze!r}: {args.command} on the built-in models takes a block count "
                "(blocks 0..N-1); other forms work with bench --input SHAPE"
            ) from None
    # demo/bench: 10 (the backbone); bench --cache chooses by model family
    if args.command in ("demo", "bench") and args.freeze is None and not getattr(args, "cache", False):
        args.freeze = 10
    if args.command == "bench" and not args.cache:
        if args.repeats is not None and args.repeats < 1:
            raise SystemExit(f"freezert: --repeats {args.repeats} must be at least 1")
    if args.command == "bench" and args.cache and args.model not in (None, "encoder", *_YOLOS):
        raise SystemExit(
            f"freezert: bench --cache --model {args.model}: the cache benchmark runs the built-in models "
            f"({', '.join([*_YOLOS, 'encoder'])}); for your own model drop --cache and pass --input SHAPE"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freezert`` console script and ``python -m freezert``."""
    args = build_parser().parse_args(argv)
    _fill_freeze(args)
    try:
        return args.func(args)
    except FreezeError as e:  # a bad --freeze for this model, a setting the harness refuses: no traceback
        print(f"freezert: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
