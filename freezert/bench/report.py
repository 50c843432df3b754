"""Tables, the one-line verdict, the JSON form and the ``--plot`` PNG of what the benchmarks measured."""

from __future__ import annotations

import json

import torch

from .._units import fmt_bytes
from .cache_bench import _COUNTERS, CACHE_VARIANTS, CACHED, FLOOR, EpochResult
from .catalog import FREEZERT, FULL, NAIVE, VARIANTS
from .options import OptionsRun
from .stats import CONFIDENCE, MIN_PAIRS, SAME_WITHIN, call, quartiles
from .variants import BenchError, VariantResult


def _ratio(a, b) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def _div(a, b) -> float | None:
    return None if a is None or b is None or not b or a != a or b != b else a / b


def _mib(b, digits: int = 0) -> str:
    """A table cell in MiB (the column's header says the unit; ``fmt_bytes`` picks its own)."""
    return f"{b / 2**20:.{digits}f}" if b is not None else "-"


def memory_label(device: torch.device) -> str:
    """What the memory column holds on ``device``."""
    if device.type == "cuda":
        return "peak memory: torch.cuda.max_memory_allocated of each variant (weights, optimizer state included)"
    return (
        "memory on CPU: gradients + optimizer state + activations saved for backward, counted in one step "
        "(weights, the same model in every variant, left out)"
    )


def format_table(results: dict[str, VariantResult], device: torch.device) -> str:
    """The comparison table: median and IQR of step times, memory, trainable parameters, ratios (<1 is better)."""
    mem = "peak MiB" if device.type == "cuda" else "train MiB"
    head = (
        f"{'variant':<16} {'median ms':>10} {'IQR ms':>8} {mem:>10} {'trainable':>12}"
        f" {'time/naive':>11} {'time/full':>10} {'mem/naive':>10} {'mem/full':>9}"
    )
    lines = [head, "-" * len(head)]
    naive, full = results.get(NAIVE), results.get(FULL)
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        m, nm, fm = r.memory_bytes, naive and naive.memory_bytes, full and full.memory_bytes
        lines.append(
            f"{name:<16} {r.median_ms:>10.1f} {r.iqr_ms:>8.1f} {_mib(m):>10} {r.trainable:>12,}"
            f" {_ratio(r.median_ms, naive and naive.median_ms):>11} {_ratio(r.median_ms, full and full.median_ms):>10}"
            f" {_ratio(m, nm):>10} {_ratio(m, fm):>9}"
        )
    lines.append(
        "median and IQR (interquartile range) over every timed step; ratios are variant / baseline: "
        "below 1.00x is faster or leaner"
    )
    lines.append(memory_label(device))
    return "\n".join(lines)


def verdict(results: dict[str, VariantResult]) -> str:
    """One line: freezert's step time against naive freezing and full fine-tuning, paired step by step, and its
    memory. A comparison is called only when the interval of the median step-time ratio allows it."""
    f, n, full = results.get(FREEZERT), results.get(NAIVE), results.get(FULL)
    if f is None or n is None or not f.step_ms or not n.step_ms:
        return "verdict: nothing to compare (freezert and naive freeze both need timed steps)"
    parts = [f"freezert vs naive freezing: {call(f.step_ms, n.step_ms).text()}"]
    if full is not None and full.step_ms:
        parts.append(f"vs full fine-tuning: {call(f.step_ms, full.step_ms).text()}")
    mem = _div(f.memory_bytes, n.memory_bytes)
    tail = f"; memory {mem:.2f}x naive freezing's" if mem is not None else ""
    return f"verdict: {'; '.join(parts)}{tail}"


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


def require_plot() -> None:
    """Raises :class:`BenchError` at once when ``--plot`` cannot be drawn (matplotlib missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise BenchError(f"--plot needs matplotlib ({e}); install it with pip install 'freezert[plot]'") from None


def write_plot(path: str, results: dict[str, VariantResult], device: torch.device, title: str) -> str:
    """A PNG of the headline numbers: step times per variant (box: IQR, line: median) and memory per variant.

    Returns the line to print.
    """
    require_plot()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in VARIANTS if n in results]
    colors = {FULL: "#8c8c8c", NAIVE: "#4c72b0", FREEZERT: "#dd8452"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    box = ax_t.boxplot(
        [results[n].step_ms for n in names], showfliers=False, patch_artist=True, medianprops={"color": "black"}
    )
    ax_t.set_xticks(range(1, len(names) + 1), names)
    for patch, n in zip(box["boxes"], names):
        patch.set_facecolor(colors[n])
    naive = results.get(NAIVE)
    for i, n in enumerate(names, start=1):
        vs = f"\n{_ratio(results[n].median_ms, naive.median_ms)} naive" if naive and n != NAIVE else ""
        ax_t.annotate(
            f"{results[n].median_ms:.1f} ms{vs}",
            (i, results[n].median_ms),
            xytext=(24, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax_t.set_ylabel("ms per step")
    ax_t.set_title("training step time (lower is better)\nbox: IQR, line: median, whiskers: 1.5 IQR", fontsize=10)
    ax_t.set_ylim(bottom=0)
    mem = [results[n].memory_bytes for n in names]
    if all(m is not None for m in mem):
        mib = [m / 2**20 for m in mem]
        bars = ax_m.bar(names, mib, color=[colors[n] for n in names])
        ax_m.bar_label(bars, fmt="%.0f" if max(mib) >= 100 else "%.1f", fontsize=8)
        cuda = device.type == "cuda"
        ax_m.set_ylabel("peak allocated MiB" if cuda else "MiB")
        ax_m.set_title(
            "CUDA peak memory (lower is better)"
            if cuda
            else "gradients + optimizer state + saved activations\n(CPU; lower is better)",
            fontsize=10,
        )
    else:
        ax_m.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_m.transAxes)
        ax_m.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def results_json(results: dict[str, VariantResult], config: dict, verdict_line: str | None = None) -> dict:
    """The comparison as JSON-ready data: per variant its step times, spread, memory, ratios and monitors."""
    naive, full = results.get(NAIVE), results.get(FULL)
    out: dict = {"config": config, "variants": {}, "verdict": verdict_line}
    for name, r in results.items():
        q1, _, q3 = quartiles(r.step_ms)
        out["variants"][name] = {
            "median_ms": r.median_ms,
            "q1_ms": q1,
            "q3_ms": q3,
            "step_ms": r.step_ms,
            "peak_bytes": r.peak_bytes,
            "train_bytes": r.train_bytes,
            "trainable_params": r.trainable,
            "final_loss": r.loss,
            "time_vs_naive": _div(r.median_ms, naive and naive.median_ms),
            "time_vs_full": _div(r.median_ms, full and full.median_ms),
            "mem_vs_naive": _div(r.memory_bytes, naive and naive.memory_bytes),
            "mem_vs_full": _div(r.memory_bytes, full and full.memory_bytes),
            "time_call_vs_naive": _call_json(r, naive),
            "time_call_vs_full": _call_json(r, full),
            "monitor": r.monitor,
        }
    return out


def _call_json(r: VariantResult, base: VariantResult | None) -> dict | None:
    c = call(r.step_ms, base.step_ms) if base is not None and base is not r else None
    return None if c is None else {k: getattr(c, k) for k in ("n", "median", "low", "high", "outcome")}


# --- the options benchmark (bench --model ... --input SHAPE) ------------------------------------------------

LOSSY = 1e-3  # a relative output error above this is reported as a change of the model's function


def _err(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def format_options_table(run: OptionsRun, device: torch.device) -> str:
    """Per option: step time (median, IQR), the paired ratio to naive freezing with its interval and call, bytes
    saved for backward, CUDA peak, output error; then each option's notes and why skipped options did not run."""
    rows = [r for r in run.results if r.skipped is None]
    naive = rows[0] if rows and rows[0].label == NAIVE else None
    width = max([len(r.label) for r in run.results] + [16])
    head = (
        f"{'option':<{width}} {'median ms':>10} {'IQR ms':>8} {'vs naive':>9} {'interval':>12} {'time':>10}"
        f" {'saved MiB':>10} {'vs naive':>9} {'peak MiB':>9} {'max |err|':>10} {'rel err':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = call(r.step_ms, naive.step_ms) if naive is not None and r is not naive else None
        ratio = "1.00x" if r is naive else "-" if c is None else f"{c.median:.2f}x"
        lines.append(
            f"{r.label:<{width}} {r.median_ms:>10.1f} {r.iqr_ms:>8.1f} {ratio:>9}"
            f" {(c.interval() if c else '-'):>12} {(c.short if c else '-'):>10}"
            f" {_mib(r.saved_bytes, 1):>10} {_ratio(r.saved_bytes, naive and naive.saved_bytes):>9}"
            f" {_mib(r.peak_bytes):>9} {_err(r.max_error):>10} {_err(r.rel_error):>8}"
        )
    for r in run.results:
        if r.skipped is not None:
            lines.append(f"  {r.label}: not run: {r.skipped}")
        lines += [f"  {r.label}: {n}" for n in r.notes]
    lines.append(
        f"time: median and IQR of every timed step; vs naive: the median of each round's ratio to naive freezing's "
        f"step, its {100 * CONFIDENCE:.0f}% interval and the call it allows (same: within {100 * SAME_WITHIN:.0f}%; "
        f"at least {MIN_PAIRS} rounds needed)"
    )
    lines.append(
        "saved: bytes autograd keeps for backward in one training step (saved_tensors_hooks; parameters and "
        "buffers excluded); peak: CUDA max allocated while the option stepped, plus what it keeps resident"
        + ("" if device.type == "cuda" else " (CUDA only)")
    )
    lines.append(
        "max |err|: the largest difference of an output from naive freezing's on the same inputs and weights; "
        "rel err: over naive's largest output"
    )
    return "\n".join(lines)


def options_verdict(run: OptionsRun) -> str:
    """One line: the fastest option measurably faster than naive freezing, the leanest for backward, the options
    that change the outputs; step times are called only with enough rounds and an interval that allows it."""
    rows = [r for r in run.results if r.skipped is None]
    naive, others = rows[0], rows[1:]
    parts = []
    if run.rounds < MIN_PAIRS:
        parts.append(
            f"step times too noisy to call: {run.rounds} rounds ran, at least {MIN_PAIRS} needed "
            "(raise --budget or --steps, or make --input smaller)"
        )
    else:
        calls = {r.label: call(r.step_ms, naive.step_ms) for r in others}
        faster = sorted((c.median, label) for label, c in calls.items() if c is not None and c.outcome == "faster")
        if faster:
            label = faster[0][1]
            parts.append(f"fastest: {label} vs naive freezing: {calls[label].text()}")
        else:
            noisy = [label for label, c in calls.items() if c is not None and c.outcome in ("noisy", "few")]
            tail = f" ({', '.join(noisy)} too noisy to call)" if noisy else ""
            parts.append(f"no option is measurably faster than naive freezing{tail}")
        slower = [f"{label} ({c.median:.2f}x)" for label, c in calls.items() if c is not None and c.outcome == "slower"]
        if slower:
            parts.append(f"slower than naive freezing: {', '.join(slower)}")
    lean = [r for r in others if r.saved_bytes is not None and naive.saved_bytes]
    if lean:
        best = min(lean, key=lambda r: r.saved_bytes)
        if best.saved_bytes < naive.saved_bytes:
            parts.append(
                f"leanest for backward: {best.label}, {best.saved_bytes / naive.saved_bytes:.2f}x naive freezing's "
                f"saved bytes ({fmt_bytes(naive.saved_bytes - best.saved_bytes)} less a step)"
            )
        else:
            parts.append("no option saves fewer bytes for backward than naive freezing")
    lossy = [r for r in others if r.rel_error is not None and r.rel_error > LOSSY]
    if lossy:
        parts.append(
            "changes the outputs: "
            + ", ".join(f"{r.label} (up to {100 * r.rel_error:.2g}% of the largest)" for r in lossy)
        )
    return "verdict: " + "; ".join(parts)


def options_json(run: OptionsRun, config: dict, verdict_line: str) -> dict:
    """The options benchmark as JSON-ready data: config, rounds, per option its numbers and call."""
    rows = [r for r in run.results if r.skipped is None]
    naive = rows[0] if rows else None
    out: dict = {"config": config, "rounds": run.rounds, "stopped": run.stopped, "verdict": verdict_line}
    out["frozen_params"], out["total_params"] = run.frozen_params, run.total_params
    out["options"] = {}
    for r in run.results:
        q1, med, q3 = quartiles(r.step_ms)
        c = call(r.step_ms, naive.step_ms) if naive is not None and r is not naive and r.step_ms else None
        out["options"][r.label] = {
            "wrap_options": r.kwargs,
            "skipped": r.skipped,
            "median_ms": med if r.step_ms else None,
            "q1_ms": q1 if r.step_ms else None,
            "q3_ms": q3 if r.step_ms else None,
            "step_ms": r.step_ms,
            "saved_bytes": r.saved_bytes,
            "peak_bytes": r.peak_bytes,
            "max_error": r.max_error,
            "rel_error": r.rel_error,
            "trainable_params": r.trainable,
            "notes": r.notes,
            "time_call_vs_naive": None
            if c is None
            else {k: getattr(c, k) for k in ("n", "median", "low", "high", "outcome")},
        }
    return out


# --- the cache benchmark --------------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    return "-" if n is None else fmt_bytes(n)


def _sum_counts(epochs: list[dict]) -> dict[str, int]:
    out = dict.fromkeys(_COUNTERS, 0)
    for e in epochs:
        for k, v in e.get("cache", {}).items():
            out[k] += v
    return out


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
        lines.append(
            f"{name:<15} {r.first_ms:>9.1f} {r.rest_ms:>9.1f} {r.first_s:>8.2f} {r.rest_s:>8.2f} "
            f"{_mib(r.peak_bytes):>9}"
            f" {r.trainable:>11,} {_ratio(r.rest_ms, floor and floor.rest_ms):>7}"
            f" {_ratio(r.rest_ms, full and full.rest_ms):>7} {_ratio(r.rest_ms, naive and naive.rest_ms):>7}"
        )
    lines.append(
        "ms: median step; s: epoch time (ep2+: median over epochs 2..); /floor /full /naive: ep2+ median step "
        "ratios (below 1.00x is faster)"
    )
    if device.type == "cuda":
        lines.append(
            "peak memory: torch.cuda.max_memory_allocated per variant, less the resident dataset "
            "(cache device tier and floor features included)"
        )
    else:
        lines.append("peak memory: not measured on CPU")
    return "\n".join(lines)


def cache_summary(results: dict[str, EpochResult], stats: dict | None, ratios: dict, family: str) -> str:
    """The cache's counters per epoch, the floor's setup time and the ratios, with the GPU goals."""
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
        lines.append(
            f"floor: boundary features precomputed once, kept in the model's device memory, in "
            f"{f.setup_s:.2f} s (outside its timed epochs)"
        )

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
    lines.append(
        f"  epoch times: cached / floor {r('cached_epoch_vs_floor')}, "
        f"full fine-tune / cached {r('full_epoch_vs_cached_epoch')} faster"
    )
    return "\n".join(lines)


def cache_results_json(
    results: dict[str, EpochResult], stats: dict | None, ratios: dict, bandwidth: dict, config: dict
) -> dict:
    """The cache benchmark as JSON-ready data: config, per-variant epochs, ratios, cache stats, bandwidth."""
    out: dict = {
        "config": config,
        "variants": {},
        "ratios": ratios,
        "cache_stats": jsonable(stats),
        "bandwidth": bandwidth,
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


def bandwidth_line(bw: dict, codec: str) -> str:
    """The host-tier bandwidth check, in words (``bw`` from :func:`host_bandwidth`)."""
    if "skipped" in bw:
        return f"host-tier bandwidth check: skipped ({bw['skipped']})"
    return (
        f"host-tier bandwidth check ({codec}): pinned host->device copy {bw['copy_GBps']:.1f} GB/s, native gather "
        f"from the pinned store {bw['gather_GBps']:.1f} GB/s of rows read ({bw['gather_rows']} rows of "
        f"{bw['gather_row_bytes'] / 2**10:.0f} KiB): {100 * bw['ratio']:.0f}% of the copy (goal >= 80%)"
    )


def jsonable(obj):
    """``obj`` with every key a string and every leaf a JSON scalar (others as ``str``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
