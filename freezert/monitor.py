"""Training monitors: memory (CUDA allocator, NVML via nvidia-ml-py, process RSS) and per-block gradient norms.

Both degrade instead of failing: without CUDA the memory monitor reports process RSS, without nvidia-ml-py it
says so in ``note``; without matplotlib ``GradientMonitor.plot`` warns and returns None.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import FreezeError
from .blocks import as_named_blocks

__all__ = ["GradientMonitor", "MemoryMonitor", "MonitorEvent", "block_grad_norms", "process_rss_bytes"]


# ---------------------------------------------------------------------------------------------------------
# gradient norms


def _as_blocks(blocks: Any) -> list[tuple[str, nn.Module]]:
    if hasattr(blocks, "blocks") and (hasattr(blocks, "set_freeze") or hasattr(blocks, "frozen_blocks")):
        blocks = blocks.blocks  # a FrozenModel or an attached schedule
    if isinstance(blocks, nn.Module):
        raise FreezeError(
            f"blocks={type(blocks).__name__} is a single module; pass its block list "
            "(freezert.blocks.find_blocks(model)) or a FrozenModel"
        )
    return as_named_blocks(blocks, "no blocks to monitor; pass a non-empty block list")


def block_grad_norms(blocks: Sequence[Any]) -> list[float | None]:
    """L2 norm of each block's gradients (all its parameters together); None for a block with no gradients."""
    blk = _as_blocks(blocks)
    norms: list[torch.Tensor | None] = []
    for _, m in blk:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if not grads:
            norms.append(None)
            continue
        per = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads]
        norms.append(torch.linalg.vector_norm(torch.stack([t.to(per[0].device) for t in per])))
    live = [t for t in norms if t is not None]
    if not live:
        return [None] * len(norms)
    dev = live[0].device
    values = torch.stack([t.to(dev) for t in live]).tolist()  # one host sync for all blocks
    it = iter(values)
    return [None if t is None else float(next(it)) for t in norms]


@dataclass(frozen=True)
class MonitorEvent:
    """A warning sign seen during training: ``kind`` is "starvation" or "capacity_collapse"."""

    kind: str
    step: int
    value: float
    message: str


class GradientMonitor:
    """Per-block gradient L2 norms each step, their coefficient of variation over a window, warning events.

    Call ``after_backward()`` after ``loss.backward()`` and before the optimizer clears the gradients.

    Gradient starvation (``kind="starvation"``): while some block is frozen (has no gradient), in the first
    ``early_steps`` steps, the ratio
    ``mean(norm of the first `adjacent` trainable blocks) / mean(norm of the other trainable blocks)``,
    averaged over the last ``window`` steps (at least ``min(window, 5)``), falls below ``starvation_ratio``
    (0.6). The first trainable blocks sit next to the frozen part; when they receive much less gradient than
    the blocks being fine-tuned, the features crossing the freeze boundary barely adapt. The 0.6 threshold and
    the "early in training" window follow the framing of the YOLO freezing study (arXiv 2509.05490); this
    block-level operationalisation is freezert's. Raw block norms are compared (not per parameter).

    Capacity collapse (``kind="capacity_collapse"``, via ``observe_metrics``): the training loss is below its
    value at the best validation metric while the validation metric has fallen from its best by more than
    ``collapse_drop`` (relative to the best's magnitude).

    Each kind is reported once per episode: again only after the condition has cleared.
    """

    def __init__(
        self,
        blocks: Any,
        window: int = 50,
        *,
        starvation_ratio: float = 0.6,
        early_steps: int = 200,
        adjacent: int = 1,
        collapse_drop: float = 0.1,
        higher_is_better: bool = True,
    ):
        self.blocks = _as_blocks(blocks)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise FreezeError(f"window={window!r} must be an integer >= 2 (steps over which the CV is taken)")
        if isinstance(adjacent, bool) or not isinstance(adjacent, int) or adjacent < 1:
            raise FreezeError(f"adjacent={adjacent!r} must be an integer >= 1")
        if not (isinstance(starvation_ratio, (int, float)) and starvation_ratio > 0):
            raise FreezeError(f"starvation_ratio={starvation_ratio!r} must be a positive number such as 0.6")
        if not (isinstance(collapse_drop, (int, float)) and collapse_drop > 0):
            raise FreezeError(f"collapse_drop={collapse_drop!r} must be a positive fraction such as 0.1")
        self.window = window
        self.starvation_ratio = float(starvation_ratio)
        self.early_steps = int(early_steps)
        self.adjacent = adjacent
        self.collapse_drop = float(collapse_drop)
        self.higher_is_better = higher_is_better
        self.step = 0
        self.history: list[list[float | None]] = []  # per step, per block
        self._win: list[deque] = [deque(maxlen=window) for _ in self.blocks]
        self._ratios: deque = deque(maxlen=window)
        self.events: list[MonitorEvent] = []
        self._active: set[str] = set()
        self._metrics: list[tuple[float, float]] = []
        self._best: tuple[float, float] | None = None  # (val_metric, train_loss at it)

    @property
    def names(self) -> list[str]:
        """Block names, in order."""
        return [n for n, _ in self.blocks]

    def after_backward(self) -> list[float | None]:
        """Records this step's per-block gradient norms (None for blocks without gradients) and returns them."""
        norms = block_grad_norms(self.blocks)
        self.record(norms)
        return norms

    def record(self, norms: Sequence[float | None]) -> None:
        """Records per-block norms computed elsewhere (e.g. from a schedule or another process)."""
        if len(norms) != len(self.blocks):
            raise FreezeError(f"got {len(norms)} norms for {len(self.blocks)} blocks; pass one per block")
        self.step += 1
        vals = [None if v is None else float(v) for v in norms]
        self.history.append(vals)
        for w, v in zip(self._win, vals):
            if v is not None:
                w.append(v)
        self._check_starvation(vals)

    def _check_starvation(self, vals: list[float | None]) -> None:
        live = [v for v in vals if v is not None]
        if len(live) == len(vals) or len(live) <= self.adjacent:
            return  # nothing frozen (no frozen/fine-tuned split to judge), or too few trainable blocks
        near, far = live[: self.adjacent], live[self.adjacent :]
        far_mean = sum(far) / len(far)
        if far_mean <= 0:
            return
        self._ratios.append((sum(near) / len(near)) / far_mean)
        if self.step > self.early_steps or len(self._ratios) < min(self.window, 5):
            return
        ratio = sum(self._ratios) / len(self._ratios)
        self._event(
            "starvation",
            ratio < self.starvation_ratio,
            ratio,
            f"step {self.step}: gradient norm of the blocks next to the frozen part is {ratio:.2f}x that of the "
            f"fine-tuned blocks (< {self.starvation_ratio}): the boundary features barely adapt; consider "
            "freezing fewer blocks",
        )

    def _event(self, kind: str, on: bool, value: float, message: str) -> MonitorEvent | None:
        if not on:
            self._active.discard(kind)
            return None
        if kind in self._active:
            return None
        self._active.add(kind)
        ev = MonitorEvent(kind, self.step, float(value), message)
        self.events.append(ev)
        warnings.warn(f"freezert: {message}", RuntimeWarning, stacklevel=3)
        return ev

    def ratio(self) -> float | None:
        """Mean frozen-adjacent / fine-tuned gradient-norm ratio over the window (None before any)."""
        return sum(self._ratios) / len(self._ratios) if self._ratios else None

    def cv(self) -> list[float | None]:
        """Per block: coefficient of variation (population std / mean) of its norms over the window."""
        out: list[float | None] = []
        for w in self._win:
            if len(w) < 2:
                out.append(None)
                continue
            mean = sum(w) / len(w)
            if mean <= 0:
                out.append(None)
                continue
            var = sum((x - mean) ** 2 for x in w) / len(w)
            out.append(math.sqrt(var) / mean)
        return out

    def observe_metrics(self, train_loss: float, val_metric: float) -> MonitorEvent | None:
        """Records an evaluation; returns a "capacity_collapse" event when one starts, else None."""
        tl, vm = float(train_loss), float(val_metric)
        if not (math.isfinite(tl) and math.isfinite(vm)):
            raise FreezeError(f"train_loss={train_loss!r}, val_metric={val_metric!r}: pass finite numbers")
        self._metrics.append((tl, vm))
        better = (lambda a, b: a > b) if self.higher_is_better else (lambda a, b: a < b)
        if self._best is None or better(vm, self._best[0]):
            self._best = (vm, tl)
            self._active.discard("capacity_collapse")
            return None
        best_vm, loss_at_best = self._best
        drop = (best_vm - vm) if self.higher_is_better else (vm - best_vm)
        rel = drop / max(abs(best_vm), 1e-12)
        return self._event(
            "capacity_collapse",
            tl < loss_at_best and rel > self.collapse_drop,
            rel,
            f"step {self.step}: training loss fell to {tl:.4g} (was {loss_at_best:.4g} at the best validation "
            f"metric {best_vm:.4g}) while the validation metric worsened by {rel:.0%} to {vm:.4g}: the trainable "
            "part may be too small for the task; consider unfreezing blocks",
        )

    def summary(self) -> dict:
        """Step count, the last norms, the CV and the mean of each block over the window, the events."""
        means = [sum(w) / len(w) if w else None for w in self._win]
        return {
            "steps": self.step,
            "blocks": self.names,
            "last": self.history[-1] if self.history else None,
            "mean": means,
            "cv": self.cv(),
            "ratio": self.ratio(),
            "events": [e.kind for e in self.events],
        }

    def plot(self, path: str) -> str | None:
        """Writes a plot of the per-block norms to ``path`` (needs matplotlib; otherwise warns, returns None)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn(
                "freezert: GradientMonitor.plot needs matplotlib (pip install matplotlib); no plot written",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = list(range(1, len(self.history) + 1))
        for j, name in enumerate(self.names):
            ys = [h[j] if h[j] is not None else float("nan") for h in self.history]
            ax.plot(steps, ys, label=name, linewidth=1)
        for e in self.events:
            ax.axvline(e.step, color="red", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        ax.set_yscale("log")
        if len(self.names) <= 16:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------------------
# memory


def process_rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process in bytes; either may be None where the OS does not say."""
    cur = None
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = None
    try:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux
    except (OSError, ValueError):
        pass
    return cur, peak


class _Nvml:
    """Thin wrapper over nvidia-ml-py's ``pynvml`` for one device; ``None`` values where a query fails."""

    def __init__(self, torch_index: int | None):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        handle = None
        if torch_index is not None and torch.cuda.is_available():
            # NVML counts physical devices; torch honours CUDA_VISIBLE_DEVICES: match by UUID when we can.
            try:
                uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
                uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                handle = None
        self.handle = handle if handle is not None else pynvml.nvmlDeviceGetHandleByIndex(torch_index or 0)

    def sample(self) -> tuple[int | None, int | None, float | None]:
        total = used = util = None
        try:
            mem = self.nv.nvmlDeviceGetMemoryInfo(self.handle)
            total, used = int(mem.total), int(mem.used)
        except Exception:
            pass
        try:
            util = float(self.nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except Exception:
            pass
        return total, used, util

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


class MemoryMonitor:
    """Samples memory in a background thread every ``interval`` seconds; ``summary()`` reports it.

    On CUDA: the caching allocator's current and peak allocated/reserved bytes (peaks reset at start when
    ``reset_peak``), and, with nvidia-ml-py, NVML's device total, used (all processes) and utilisation. Always:
    this process's RSS. What is unavailable is None in the summary and explained in ``note``. Usable as a
    context manager or with ``start()``/``stop()``.
    """

    def __init__(
        self,
        interval: float = 0.05,
        *,
        device: torch.device | str | int | None = None,
        nvml: bool | None = None,
        reset_peak: bool = True,
    ):
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise FreezeError(f"interval={interval!r} must be a positive number of seconds such as 0.05")
        self.interval = float(interval)
        self.cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise FreezeError(f"device={device!r} is a CUDA device but CUDA is not available; pass device='cpu'")
        if self.cuda:
            d = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
            self.index: int | None = d.index if d.index is not None else torch.cuda.current_device()
        else:
            self.index = None
        self._want_nvml = self.cuda if nvml is None else bool(nvml)
        self.reset_peak = reset_peak
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._notes: list[str] = []
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.samples = 0
        self._t0 = self._t1 = None
        self._rss = self._rss_peak = None
        self._cuda_alloc = self._cuda_reserved = None
        self._nv_total = self._nv_used = self._nv_used_peak = None
        self._util_sum, self._util_n, self._util_max = 0.0, 0, None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> MemoryMonitor:
        """Starts sampling (a no-op when already running)."""
        if self._thread is not None:
            return self
        self._reset_stats()
        self._notes = []
        if not self.cuda:
            self._notes.append("CUDA not available: no allocator statistics; reporting process RSS")
        elif self.reset_peak:
            torch.cuda.reset_peak_memory_stats(self.index)
        if self._want_nvml:
            try:
                self._nvml = _Nvml(self.index)
            except ImportError:
                self._notes.append(
                    "nvidia-ml-py is not installed (pip install nvidia-ml-py): no device total/used/utilisation"
                )
            except Exception as e:
                self._notes.append(f"NVML unavailable ({type(e).__name__}: {e}): no device total/used/utilisation")
        self._t0 = time.perf_counter()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="freezert-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stops sampling (takes a last sample) and returns ``summary()``."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
            self._t1 = time.perf_counter()
            if self._nvml is not None:
                self._nvml.close()
                self._nvml = None
        return self.summary()

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as e:
                with self._lock:
                    self._notes.append(f"sampling stopped after an error: {type(e).__name__}: {e}")
                return

    def _sample(self) -> None:
        rss, _ = process_rss_bytes()
        alloc = reserved = None
        if self.cuda:
            alloc = torch.cuda.memory_allocated(self.index)
            reserved = torch.cuda.memory_reserved(self.index)
        nv = self._nvml.sample() if self._nvml is not None else (None, None, None)
        with self._lock:
            self.samples += 1
            if rss is not None:
                self._rss = rss
                self._rss_peak = rss if self._rss_peak is None else max(self._rss_peak, rss)
            self._cuda_alloc, self._cuda_reserved = alloc, reserved
            total, used, util = nv
            if total is not None:
                self._nv_total = total
            if used is not None:
                self._nv_used = used
                self._nv_used_peak = used if self._nv_used_peak is None else max(self._nv_used_peak, used)
            if util is not None:
                self._util_sum += util
                self._util_n += 1
                self._util_max = util if self._util_max is None else max(self._util_max, util)

    # -- results ------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Bytes and percentages sampled so far; None for what is unavailable, explained in ``note``."""
        with self._lock:
            _, rss_os_peak = process_rss_bytes()
            end = self._t1 if self._t1 is not None else time.perf_counter()
            out = {
                "device": f"cuda:{self.index}" if self.cuda else "cpu",
                "samples": self.samples,
                "duration_s": None if self._t0 is None else end - self._t0,
                "rss_bytes": self._rss,
                "rss_peak_bytes": self._rss_peak,  # peak over the samples
                "rss_process_peak_bytes": rss_os_peak,  # the OS's high-water mark for the whole process
                "cuda_allocated_bytes": self._cuda_alloc,
                "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(self.index) if self.cuda else None,
                "cuda_reserved_bytes": self._cuda_reserved,
                "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(self.index) if self.cuda else None,
                "nvml_total_bytes": self._nv_total,
                "nvml_used_bytes": self._nv_used,
                "nvml_used_peak_bytes": self._nv_used_peak,
                "nvml_util_percent_mean": self._util_sum / self._util_n if self._util_n else None,
                "nvml_util_percent_max": self._util_max,
                "note": "; ".join(self._notes) if self._notes else "",
            }
        return out

    @property
    def note(self) -> str:
        """What is not available, and why ("" when everything is)."""
        return self.summary()["note"]
