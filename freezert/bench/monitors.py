"""One variant's memory and gradient monitors, reduced to plain numbers when the variant finishes."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Self

import torch


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class Monitors:
    """One variant's ``MemoryMonitor`` and ``GradientMonitor`` (over its blocks), as a context manager.

    On exit, ``data`` holds plain numbers only (no reference to the model survives, so a finished variant's
    weights can be freed): the memory summary, per-step block norms, window means and CVs, the events, and a
    memory trace (the monitor's latest sample after each step).
    """

    def __init__(self, blocks, freeze: int, device: torch.device, reset_peak: bool = True):
        from ..monitor import GradientMonitor, MemoryMonitor

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
        from ..monitor import block_grad_norms

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
