"""The monitors in ``freezert demo`` / ``bench``, in-process at tiny sizes: the monitor table, the JSON entries,
frozen blocks without gradients, the ``--plot`` PNG."""

import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

from freezert.bench import FREEZERT, FULL, NAIVE, VARIANTS, Monitors, VariantResult, format_monitor_table
from freezert.cli import main

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--device", "cpu", "--model", "yolov5n", "--img", "64", "--batch", "1", "--warmup", "1", "--quiet"]
FREEZE = 10  # the default: blocks 0..9 (the backbone)


@pytest.fixture(autouse=True)
def one_thread():
    # One thread: on a shared two-core machine two OpenMP threads can stall for seconds when another process runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _monitor_rows(out: str) -> dict[str, str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("monitors ") and "peak memory" in line)
    return {name: line for line in lines[start:] for name in VARIANTS if line.startswith(f"  {name} ")}


def _grad_columns(row: str) -> list[str]:
    """The columns after the peak memory: grad 0..N-1, grad N.., CV, events."""
    tokens = row.split()
    return tokens[tokens.index("MiB") + 1 :]


def _check_monitors(out: str, data: dict, steps: int) -> None:
    rows = _monitor_rows(out)
    assert set(rows) == {FULL, NAIVE, FREEZERT}
    assert all("RSS" in row and "MiB" in row for row in rows.values())  # CPU: process RSS
    assert _grad_columns(rows[NAIVE])[0] == "none" and _grad_columns(rows[FREEZERT])[0] == "none"  # grad 0..9
    assert float(_grad_columns(rows[FULL])[0]) > 0
    assert "monitor note: CUDA not available" in out

    v = data["variants"]
    for name in VARIANTS:
        m = v[name]["monitor"]
        assert m["gradients"]["steps"] == steps and len(m["norms"]) == steps
        assert len(m["gradients"]["blocks"]) == 25
        assert m["memory"]["rss_peak_bytes"] > 0 and m["memory"]["cuda_peak_allocated_bytes"] is None
        assert "CUDA not available" in m["memory"]["note"]
        assert m["grad_norm_trainable_blocks"] > 0 and m["cv_mean"] is not None
        assert len(m["memory_trace"]) == steps
        assert isinstance(m["events"], list)
        trainable = m["gradients"]["mean"][FREEZE:-1]  # the Detect head (last block) always trains
        assert m["gradients"]["mean"][-1] > 0 and any(x for x in trainable)
    for name in (NAIVE, FREEZERT):  # frozen blocks: no gradient at any step
        m = v[name]["monitor"]
        assert m["grad_norm_frozen_blocks"] is None
        assert all(x is None for x in m["gradients"]["mean"][:FREEZE])
        assert all(x is None for step in m["norms"] for x in step[:FREEZE])
    m = v[FULL]["monitor"]  # full fine-tuning: the same blocks get gradients
    assert m["grad_norm_frozen_blocks"] > 0
    assert all(x is not None and x > 0 for x in m["gradients"]["mean"][:FREEZE])


def _plot_args(png) -> list[str]:
    return ["--plot", str(png)] if HAS_MPL else []  # without matplotlib --plot fails at once (tests/test_cli.py)


def _check_plot(out: str, png) -> None:
    if HAS_MPL:
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {png}" in out


def test_demo_monitors(capsys, tmp_path):
    path, png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--steps", "3", *TINY, "--json", str(path), *_plot_args(png)]) == 0
    out = capsys.readouterr().out
    assert "then 3 untimed steps per variant under the monitors" in out
    data = json.loads(path.read_text())
    _check_monitors(out, data, steps=3)  # the monitored pass only: warm-up and timed steps are not monitored
    assert len(data["variants"][FREEZERT]["step_ms"]) == 3
    _check_plot(out, png)


def test_bench_monitors_run_untimed(capsys, tmp_path):
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--steps", "2", "--repeats", "2", *TINY, "--json", str(path), *_plot_args(png)]) == 0
    out = capsys.readouterr().out
    assert "then 2 untimed steps per variant under the monitors" in out
    data = json.loads(path.read_text())
    _check_monitors(out, data, steps=2)  # the monitored pass only: warm-up and timed repeats are not monitored
    assert all(len(v["step_ms"]) == 2 * 2 for v in data["variants"].values())  # every timed step
    _check_plot(out, png)


def test_monitor_table_reports_events_without_warnings():
    blocks = [nn.Linear(3, 3) for _ in range(4)]
    mon = Monitors(blocks, freeze=1, device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mon:
            for _ in range(6):
                # block 0 frozen (no grad); block 1, next to the frozen part, starves next to blocks 2 and 3
                for i, b in enumerate(blocks[1:], start=1):
                    for p in b.parameters():
                        p.grad = torch.full_like(p, 1e-3 if i == 1 else 1.0)
                mon.after_backward()
                mon.after_step()
    assert not [w for w in caught if "freezert" in str(w.message)]  # events go to the table, not to warnings
    assert mon.grad is None and mon.mem is None  # no reference to the model's blocks outlives the run
    assert [e["kind"] for e in mon.data["events"]] == ["starvation"]
    r = VariantResult(NAIVE, 0, monitor=mon.data)
    table = format_monitor_table({NAIVE: r}, freeze=1)
    row = next(line for line in table.splitlines() if line.startswith(f"  {NAIVE} "))
    assert _grad_columns(row)[0] == "none" and _grad_columns(row)[3:] == ["starvation@5"]
    assert f"    {NAIVE}: starvation: step 5:" in table


def test_amp_skipped_steps_are_not_recorded():
    blocks = [nn.Linear(3, 3) for _ in range(3)]
    mon = Monitors(blocks, freeze=1, device=torch.device("cpu"))
    with mon:
        for bad in (True, False, False):
            for b in blocks[1:]:
                for p in b.parameters():
                    p.grad = torch.full_like(p, float("inf") if bad else 1.0)
            mon.after_backward(skip_nonfinite=True)  # what the GradScaler skipped under --amp
    assert mon.data["amp_skipped_steps"] == 1 and mon.data["gradients"]["steps"] == 2
    assert mon.data["grad_norm_trainable_blocks"] == pytest.approx(12**0.5)  # 9 weights + 3 biases of 1.0
    table = format_monitor_table({NAIVE: VariantResult(NAIVE, 0, monitor=mon.data)}, freeze=1)
    assert "1 steps skipped by the GradScaler" in table
