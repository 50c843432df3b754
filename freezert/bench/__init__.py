"""The benchmark harness behind ``freezert demo`` and ``freezert bench``: variants, tasks, runners, reports.

* variants: :class:`Variant` (full fine-tune, naive freeze, freezert) over a :class:`TrainConfig`;
* :func:`compare`: every variant resident, stepped in turn (``block=1``: step by step), with monitors after;
* the options benchmark on the user's model: :func:`measure` over :class:`Option` rows (naive, defaults, cache,
  memory options), :func:`format_options_table`, :func:`options_verdict`;
* the cache benchmark: :class:`YoloTask`/:class:`EncoderTask`, :class:`EpochVariant`, :func:`run_epochs`;
* statistics and reports: :func:`call` (paired step-time ratios), tables, :func:`verdict`, :func:`results_json`,
  :func:`write_plot`.

Names are imported on first use, so the command line can build its parser without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "cache_bench": (
        "CACHE_VARIANTS",
        "CACHED",
        "ENCODER_LAYERS",
        "FLOOR",
        "CacheConfig",
        "EncoderTask",
        "EpochResult",
        "EpochVariant",
        "YoloTask",
        "cache_ratios",
        "epoch_batches",
        "host_bandwidth",
        "run_epochs",
    ),
    "catalog": ("DEFAULT_FREEZE", "FREEZERT", "FULL", "MODELS", "NAIVE", "VARIANTS", "YOLOS"),
    "monitors": ("Monitors",),
    "options": ("Option", "OptionResult", "OptionsRun", "default_options", "loss_of", "measure"),
    "report": (
        "bandwidth_line",
        "cache_results_json",
        "cache_summary",
        "format_cache_table",
        "format_monitor_table",
        "format_options_table",
        "format_table",
        "jsonable",
        "memory_label",
        "options_json",
        "options_verdict",
        "require_plot",
        "results_json",
        "verdict",
        "write_json",
        "write_plot",
    ),
    "runner": ("Comparison", "compare"),
    "stats": ("MIN_PAIRS", "Call", "call", "median_interval", "paired_ratios", "quartiles"),
    "variants": (
        "BenchError",
        "TrainConfig",
        "Variant",
        "VariantResult",
        "build_model",
        "check_depth",
        "naive_freeze",
        "synthetic_batches",
        "yolo_optimizer",
    ),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
