"""The alternating runner: every variant resident at once, stepped in turn, so drift hits them all alike."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .monitors import Monitors
from .stats import MIN_PAIRS
from .variants import VARIANTS, TrainConfig, Variant, VariantResult


class _NoProgress:
    def update(self, k: int = 1) -> None:
        pass


@dataclass
class Comparison:
    """What :func:`compare` measured: each variant's result, the rounds run, and why timing stopped early."""

    results: dict[str, VariantResult]
    rounds: int
    stopped: str | None = None


def compare(
    initial: nn.Module,
    batches: list,
    config: TrainConfig,
    device: torch.device,
    *,
    steps: int,
    warmup: int = 0,
    block: int = 1,
    monitor_steps: int = 0,
    budget_s: float | None = None,
    variants=VARIANTS,
    progress=None,
) -> Comparison:
    """Times ``steps`` steps of each variant, ``block`` consecutive steps per variant per round.

    ``block=1`` alternates step by step. After the timed rounds: one untimed step per variant that counts its
    training memory, then ``monitor_steps`` untimed steps under the monitors. ``budget_s`` ends the timed
    rounds early (after at least ``MIN_PAIRS`` steps each) and, once spent, cuts the monitors to 2 steps each.
    """
    bar = progress or _NoProgress()
    cuda = device.type == "cuda"
    # Set every variant up (and warm it up) first; on CUDA, note what it keeps resident between steps, so that
    # its peak can be told apart from the other variants living on the same device.
    vs = []
    for name in variants:
        before = torch.cuda.memory_allocated(device) if cuda else 0
        v = Variant(name, initial, config, device)
        for i in range(warmup):
            v.step(batches[i % len(batches)])
            bar.update()
        if cuda:
            v.static_bytes = torch.cuda.memory_allocated(device) - before
        vs.append(v)

    peaks: dict[str, list[int]] = {v.name: [] for v in vs}
    done = rounds = 0
    stopped = None
    t0 = time.perf_counter()
    while done < steps:
        n = min(block, steps - done)
        for v in vs:
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for j in range(n):
                v.result.step_ms.append(v.step(batches[(done + j) % len(batches)]))
                bar.update()
            if cuda:
                peaks[v.name].append(torch.cuda.max_memory_allocated(device) - base + v.static_bytes)
        done += n
        rounds += 1
        # the budget leaves at least MIN_PAIRS steps each, the fewest a verdict is called on
        if budget_s and done >= MIN_PAIRS and done < steps and time.perf_counter() - t0 > budget_s:
            stopped = f"time budget of {budget_s:g} s reached after {done} of {steps} steps per variant"
            break

    for v in vs:
        loss = v.result.loss  # the reported loss stays the timed run's
        v.count_train_bytes(batches[0])
        if monitor_steps:
            # The monitors get a pass of their own after the timed rounds: untimed steps, so neither the
            # gradient norms nor the memory sampler thread touch the timings. Every variant is resident here, so
            # the monitor's memory is the process's (the table's peak is per variant).
            v.mon = Monitors(v.blocks, config.freeze, device)
            with v.mon:
                for i in range(monitor_steps):
                    if budget_s and i >= 2 and time.perf_counter() - t0 > budget_s:
                        break  # the CV needs two steps
                    v.step(batches[i % len(batches)])
                    bar.update()
            v.result.monitor, v.mon = v.mon.data, None
        v.result.loss = loss
        if cuda:
            v.result.peak_bytes = max(peaks[v.name])
    return Comparison({v.name: v.result for v in vs}, rounds, stopped)
