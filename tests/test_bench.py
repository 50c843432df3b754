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


def test_compare_budget_leaves_enough_steps_for_a_verdict(tiny):
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
    n = bench.MIN_PAIRS
    assert len(run.results[FREEZERT].step_ms) == n and f"{n} of 50 steps" in run.stopped
    assert run.results[FREEZERT].monitor["gradients"]["steps"] == 2  # a spent budget cuts the monitors too


def _result(name, times, mem=None):
    return VariantResult(name, 1, step_ms=list(times), train_bytes=mem)


def test_quartiles():
    assert bench.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert bench.quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_median_interval_is_the_sign_tests():
    # n=6: dropping one order statistic from each end leaves 1 - 2/64 = 96.9% coverage, two would leave 78%
    assert bench.median_interval([6, 1, 5, 2, 4, 3]) == (1, 6)
    assert bench.median_interval([1, 2, 3, 4, 5]) is None  # 1 - 2/32 < 95%: no interval
    xs = list(range(1, 21))  # n=20: P(Bin(20, 1/2) <= 5) = 2.1% <= 2.5% < P(<= 6) = 5.8%
    assert bench.median_interval(xs) == (6, 15)


def _calls(ratios: list[float], base: float = 10.0):
    return bench.call([base * r for r in ratios], [base] * len(ratios))


def test_call_needs_enough_pairs_and_an_interval_that_excludes_one():
    assert _calls([0.5] * (bench.MIN_PAIRS - 1)).outcome == "few"  # clear, but too few pairs to call
    assert _calls([0.5, 0.6, 0.55, 0.52, 0.58, 0.61]).outcome == "faster"
    assert _calls([1.3, 1.2, 1.25, 1.4, 1.22, 1.5]).outcome == "slower"
    assert _calls([0.99, 1.01, 1.0, 0.98, 1.02, 1.0]).outcome == "same"  # inside 1 +- 5%
    noisy = _calls([0.5, 0.6, 0.55, 0.52, 0.58, 2.0])  # one stalled step puts 1.0 inside the interval
    assert noisy.outcome == "noisy" and noisy.median == pytest.approx(0.565)
    assert noisy.text().startswith("too noisy to call, 0.56x its step time but the 95% interval 0.50-2.00x")
    assert bench.call([], []) is None


def test_paired_ratios_cancel_drift_that_separate_medians_do_not():
    # the machine slows down halfway: freezert is 0.8x naive in every round, but its slow-half steps overlap
    # naive's fast-half steps
    naive = [10.0] * 8 + [20.0] * 8
    fz = [8.0] * 8 + [16.0] * 8
    c = bench.call(fz, naive)
    assert c.outcome == "faster" and c.median == pytest.approx(0.8) and c.low == c.high == pytest.approx(0.8)


def test_verdict_calls_each_baseline_and_says_why_not():
    fast = {
        NAIVE: _result(NAIVE, [10, 11, 12, 13, 12, 11], 100),
        FREEZERT: _result(FREEZERT, [7, 8, 8, 9, 8, 8], 50),
        FULL: _result(FULL, [20, 21, 22, 23, 22, 21], 300),
    }
    line = bench.verdict(fast)
    assert line.startswith("verdict: freezert vs naive freezing: faster, 0.") and "\n" not in line
    assert "vs full fine-tuning: faster" in line and "memory 0.50x naive freezing's" in line
    assert "95% interval" in line and "over 6 paired steps" in line
    few = {NAIVE: _result(NAIVE, [10, 11, 12, 13]), FREEZERT: _result(FREEZERT, [5, 5, 6, 6])}
    assert "naive freezing: too noisy to call, 0.48x its step time over only 4 paired steps" in bench.verdict(few)
    slow = {NAIVE: _result(NAIVE, [10] * 6), FREEZERT: _result(FREEZERT, [12] * 6)}
    assert "naive freezing: slower, 1.20x its step time" in bench.verdict(slow)
    # the old wording called 0.48x "as fast as ... within the spread" when the baseline's IQR was wide
    wide = {NAIVE: _result(NAIVE, [10, 40, 10, 40, 10, 40]), FREEZERT: _result(FREEZERT, [5, 19, 5, 19, 5, 19])}
    assert "naive freezing: faster, 0.49x" in bench.verdict(wide)


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
