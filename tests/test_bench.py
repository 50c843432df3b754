"""The benchmark harness's public interface (``freezert.bench``), at tiny sizes."""

import importlib.util
import types

import pytest
import torch

import freezert
from freezert import bench
from freezert.bench import FREEZERT, FULL, NAIVE, BenchError, TrainConfig, VariantResult

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # a shared two-core machine: one thread does not stall behind other processes
    initial = bench.build_model("yolov5n")
    return initial, bench.synthetic_batches(initial, 2, 1, 64, torch.device("cpu"))


def test_harness_errors_are_freeze_errors():
    assert issubclass(BenchError, freezert.FreezeError)
    with pytest.raises(BenchError, match="choose from"):
        bench.build_model("resnet")
    with pytest.raises(BenchError, match="at most 24"):
        bench.check_depth(freezert.models.yolov5("n"), 25)


def test_train_config_from_args_takes_what_it_knows():
    args = types.SimpleNamespace(freeze=4, bn="train", amp=True, steps=3)
    assert bench.TrainConfig.from_args(args) == TrainConfig(freeze=4, bn="train", amp=True)


@pytest.mark.parametrize("block,rounds", [(1, 3), (2, 2), (3, 1)])
def test_compare_alternates_in_blocks(tiny, block, rounds):
    initial, batches = tiny
    run = bench.compare(
        initial, batches, TrainConfig(freeze=10), torch.device("cpu"), steps=3, block=block, variants=(NAIVE, FREEZERT)
    )
    assert run.rounds == rounds and run.stopped is None
    assert set(run.results) == {NAIVE, FREEZERT}
    assert all(len(r.step_ms) == 3 and r.loss == r.loss and r.train_bytes > 0 for r in run.results.values())


def test_compare_budget_stops_after_three_steps(tiny):
    initial, batches = tiny
    run = bench.compare(
        initial,
        batches,
        TrainConfig(freeze=10),
        torch.device("cpu"),
        steps=50,
        budget_s=1e-9,
        monitor_steps=10,
        variants=(FREEZERT,),
    )
    assert len(run.results[FREEZERT].step_ms) == 3 and "3 of 50 steps" in run.stopped
    assert run.results[FREEZERT].monitor["gradients"]["steps"] == 2  # a spent budget cuts the monitors too


def _result(name, times, mem=None):
    return VariantResult(name, 1, step_ms=list(times), train_bytes=mem)


def test_quartiles_and_verdict():
    assert bench.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    fast = {
        NAIVE: _result(NAIVE, [10, 11, 12, 13], 100),
        FREEZERT: _result(FREEZERT, [7, 8, 8, 9], 50),
        FULL: _result(FULL, [20, 21, 22, 23], 300),
    }
    line = bench.verdict(fast)
    assert line.startswith("verdict: freezert is faster than naive freezing") and "\n" not in line
    assert "faster than full fine-tuning" in line and "memory 0.50x naive freezing's" in line
    same = {NAIVE: _result(NAIVE, [10, 11, 12, 13]), FREEZERT: _result(FREEZERT, [10.5, 11, 12.5, 13])}
    assert "as fast as naive freezing within the spread" in bench.verdict(same)
    slow = {NAIVE: _result(NAIVE, [10, 10, 10]), FREEZERT: _result(FREEZERT, [12, 12, 12])}
    assert "slower than naive freezing (1.20x" in bench.verdict(slow)


def test_results_json_and_table():
    res = {NAIVE: _result(NAIVE, [10, 12], 100), FREEZERT: _result(FREEZERT, [8, 10], 80)}
    data = bench.results_json(res, {"model": "x"}, "verdict: ...")
    assert data["variants"][FREEZERT]["time_vs_naive"] == pytest.approx(0.82, abs=0.01)
    assert data["variants"][FREEZERT]["mem_vs_naive"] == pytest.approx(0.8) and data["verdict"] == "verdict: ..."
    table = bench.format_table(res, torch.device("cpu"))
    assert "IQR ms" in table and "train MiB" in table and "0.80x" in table


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_write_plot(tmp_path):
    res = {n: _result(n, [10 + i, 11 + i, 12 + i], 2**20 * (i + 1)) for i, n in enumerate((FULL, NAIVE, FREEZERT))}
    png = tmp_path / "p.png"
    assert bench.write_plot(str(png), res, torch.device("cpu"), "title") == f"wrote {png}"
    assert png.read_bytes()[:4] == b"\x89PNG"
