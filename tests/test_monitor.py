"""Memory and gradient monitors (freezert/monitor.py), on CPU: sane values, never a crash without NVML."""

from __future__ import annotations

import mmap
import sys
import time
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from freezert._errors import FreezeError
from freezert.monitor import GradientMonitor, MemoryMonitor, block_grad_norms, process_rss_bytes


def mlp() -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3)], nn.Linear(6, 2))


# ---------------------------------------------------------------------------------------------------------
# memory


def test_process_rss_is_positive():
    cur, peak = process_rss_bytes()
    assert cur is not None and cur > 10 * 2**20  # a Python process with torch loaded
    assert peak is not None and peak >= cur * 0.5


def test_memory_monitor_on_cpu_reports_rss_and_says_what_is_missing():
    with MemoryMonitor(interval=0.01) as mm:
        before = process_rss_bytes()[0]
        # 64 MiB of fresh anonymous pages, touched: a tensor could land in memory the allocator already holds
        # (CI saw a torch.ones of this size leave the RSS unchanged), a new mapping cannot
        buf = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(buf), mmap.PAGESIZE):
            buf[i] = 1
        time.sleep(0.1)
        buf.close()
    s = mm.summary()
    assert s["samples"] >= 3
    assert s["device"] == ("cpu" if not torch.cuda.is_available() else s["device"])
    assert s["rss_bytes"] > 0 and s["rss_peak_bytes"] >= s["rss_bytes"]
    assert s["rss_peak_bytes"] >= before + 48 * 2**20  # the background thread saw the allocation
    assert s["duration_s"] >= 0.1
    if not torch.cuda.is_available():
        assert s["cuda_allocated_bytes"] is None and s["cuda_peak_allocated_bytes"] is None
        assert s["nvml_total_bytes"] is None
        assert "CUDA not available" in s["note"]
    assert mm.stop() == s or mm.stop()["samples"] == s["samples"]  # stopping twice is harmless


def test_memory_monitor_without_nvidia_ml_py_degrades_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    mm = MemoryMonitor(interval=0.01, nvml=True).start()
    time.sleep(0.03)
    s = mm.stop()
    assert "nvidia-ml-py is not installed" in s["note"]
    assert s["nvml_used_bytes"] is None and s["nvml_util_percent_mean"] is None
    assert s["rss_bytes"] > 0


def _fake_pynvml(fail_init: bool = False, fail_util: bool = False):
    m = types.ModuleType("pynvml")
    calls = {"shutdown": 0}

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def mem(handle):
        return types.SimpleNamespace(total=80 * 2**30, used=3 * 2**30, free=77 * 2**30)

    def util(handle):
        if fail_util:
            raise RuntimeError("Not Supported")
        return types.SimpleNamespace(gpu=42, memory=10)

    def shutdown():
        calls["shutdown"] += 1

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetHandleByUUID = lambda u: ("handle", u)
    m.nvmlDeviceGetMemoryInfo = mem
    m.nvmlDeviceGetUtilizationRates = util
    return m, calls


def test_memory_monitor_reads_nvml_when_present(monkeypatch):
    fake, calls = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with MemoryMonitor(interval=0.01, nvml=True) as mm:
        time.sleep(0.05)
    s = mm.summary()
    assert s["nvml_total_bytes"] == 80 * 2**30
    assert s["nvml_used_bytes"] == 3 * 2**30 and s["nvml_used_peak_bytes"] == 3 * 2**30
    assert s["nvml_util_percent_mean"] == 42 and s["nvml_util_percent_max"] == 42
    assert "nvidia-ml-py" not in s["note"]
    assert calls["shutdown"] == 1


def test_memory_monitor_survives_nvml_errors(monkeypatch):
    fake, _ = _fake_pynvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = MemoryMonitor(interval=0.01, nvml=True).start().stop()
    assert "NVML unavailable" in s["note"] and "Not Found" in s["note"]
    fake, _ = _fake_pynvml(fail_util=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = MemoryMonitor(interval=0.01, nvml=True).start().stop()
    assert s["nvml_used_bytes"] == 3 * 2**30 and s["nvml_util_percent_mean"] is None


def test_memory_monitor_rejects_bad_arguments():
    with pytest.raises(FreezeError, match="interval"):
        MemoryMonitor(interval=0)
    if not torch.cuda.is_available():
        with pytest.raises(FreezeError, match="CUDA"):
            MemoryMonitor(device="cuda:0")


@pytest.mark.cuda
def test_memory_monitor_on_cuda_reports_allocator_peaks():
    with MemoryMonitor(interval=0.01) as mm:
        x = torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    s = mm.summary()
    assert s["cuda_peak_allocated_bytes"] >= 32 * 2**20
    assert s["cuda_allocated_bytes"] is not None


# ---------------------------------------------------------------------------------------------------------
# gradients


def test_block_grad_norms_match_a_manual_computation_and_skip_frozen_blocks():
    m = mlp()
    blocks = list(m.children())
    for p in blocks[0].parameters():
        p.requires_grad_(False)
    F.mse_loss(m(torch.randn(5, 6)), torch.randn(5, 2)).backward()
    norms = block_grad_norms(blocks)
    assert norms[0] is None
    for b, n in zip(blocks[1:], norms[1:]):
        want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in b.parameters())).item()
        assert n == pytest.approx(want, rel=1e-5)


def test_gradient_monitor_records_norms_and_cv():
    m = mlp()
    mon = GradientMonitor(list(m.named_children()), window=4)
    for _ in range(6):
        F.mse_loss(m(torch.randn(5, 6)), torch.randn(5, 2)).backward()
        norms = mon.after_backward()
        assert len(norms) == 4 and all(n is not None and n > 0 for n in norms)
        m.zero_grad(set_to_none=True)
    cv = mon.cv()
    assert len(cv) == 4 and all(c is not None and 0 <= c < 5 for c in cv)
    assert mon.summary()["steps"] == 6 and mon.names == ["0", "1", "2", "3"]
    const = GradientMonitor(list(m.children()), window=3, early_steps=0)  # no starvation check
    for _ in range(3):
        const.record([1.0, 2.0, None, 4.0])
    assert const.cv() == [0.0, 0.0, None, 0.0]


def test_starvation_event_when_boundary_blocks_get_little_gradient():
    mon = GradientMonitor(list(mlp().children()), window=5, early_steps=20, adjacent=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(10):  # healthy: ratio ~1
            mon.record([None, 1.0, 1.1, 0.9])
        assert mon.events == []
        for _ in range(6):  # block 1 (next to the frozen block 0) gets a third of the head's gradient
            mon.record([None, 0.3, 1.0, 1.0])
    assert [e.kind for e in mon.events] == ["starvation"]
    assert mon.events[0].value < 0.6 and "freezing fewer blocks" in mon.events[0].message
    for _ in range(6):  # still starving: reported once per episode
        mon.record([None, 0.3, 1.0, 1.0])
    assert len(mon.events) == 1
    late = GradientMonitor(list(mlp().children()), window=5, early_steps=3)
    for _ in range(10):
        late.record([None, 0.1, 1.0, 1.0])
    assert late.events == []  # only early in training
    unfrozen = GradientMonitor(list(mlp().children()), window=5)
    for _ in range(10):
        unfrozen.record([0.1, 1.0, 1.0, 1.0])
    assert unfrozen.events == []  # nothing frozen: no frozen/fine-tuned split to judge


def test_capacity_collapse_event():
    mon = GradientMonitor(list(mlp().children()), collapse_drop=0.1)
    assert mon.observe_metrics(1.0, 0.60) is None
    assert mon.observe_metrics(0.8, 0.70) is None  # best so far
    assert mon.observe_metrics(0.7, 0.68) is None  # small dip
    with pytest.warns(RuntimeWarning, match="unfreezing"):
        ev = mon.observe_metrics(0.5, 0.50)  # loss still falls, val down 29 %
    assert ev is not None and ev.kind == "capacity_collapse" and ev.value == pytest.approx(0.2 / 0.7)
    assert mon.observe_metrics(0.4, 0.45) is None  # same episode
    lower = GradientMonitor(list(mlp().children()), higher_is_better=False)
    lower.observe_metrics(1.0, 2.0)
    with pytest.warns(RuntimeWarning, match="worsened by 25%"):
        assert lower.observe_metrics(0.5, 2.5) is not None  # a validation loss rising 25 %


def test_plot_without_matplotlib_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    mon = GradientMonitor(list(mlp().children()))
    mon.record([1.0, 2.0, 3.0, 4.0])
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        assert mon.plot(str(tmp_path / "g.png")) is None


def test_gradient_monitor_rejects_bad_arguments():
    with pytest.raises(FreezeError, match="window"):
        GradientMonitor(list(mlp().children()), window=1)
    with pytest.raises(FreezeError, match="single module"):
        GradientMonitor(nn.Linear(2, 2))
    mon = GradientMonitor(list(mlp().children()))
    with pytest.raises(FreezeError, match="one per block"):
        mon.record([1.0])
