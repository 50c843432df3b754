"""The command line, in-process at tiny sizes: inspect, demo and bench print the three variants and ratios."""

import json

import pytest

import freezert
from freezert.cli import FREEZERT, FULL, NAIVE, main, naive_freeze, yolo_optimizer
from freezert.models import yolov5

# The core runtime (freezert.wrap) landed separately from the CLI; skip, rather than fail, where it is absent.
needs_wrap = pytest.mark.skipif(
    not (hasattr(freezert, "wrap") and hasattr(freezert, "inspect")),
    reason="freezert.wrap/freezert.inspect are not importable yet (the core runtime has not landed)",
)

TINY = ["--device", "cpu", "--model", "yolov5n", "--img", "64", "--batch", "1", "--warmup", "1", "--quiet"]


def _rows(out: str) -> dict[str, str]:
    return {name: line for line in out.splitlines() for name in (FULL, NAIVE, FREEZERT) if line.startswith(name)}


@needs_wrap
def test_inspect_prints_the_cut(capsys):
    assert main(["inspect", "--model", "yolov5n", "--freeze", "10"]) == 0
    out = capsys.readouterr().out
    assert "25 blocks" in out and "boundary: 4, 6, 9" in out


@needs_wrap
@pytest.mark.parametrize("model,freeze", [("cnn", "2"), ("encoder", "3")])
def test_inspect_other_models(capsys, model, freeze):
    assert main(["inspect", "--model", model, "--freeze", freeze]) == 0
    assert "frozen" in capsys.readouterr().out


@needs_wrap
def test_inspect_bad_freeze_is_a_clean_error(capsys):
    assert main(["inspect", "--model", "cnn", "--freeze", "99"]) == 2
    assert "freezert:" in capsys.readouterr().err


@needs_wrap
def test_demo_prints_three_variants_and_ratios(capsys, tmp_path):
    path = tmp_path / "demo.json"
    assert main(["demo", "--steps", "3", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {FULL, NAIVE, FREEZERT}
    assert "time/naive" in out and "time/full" in out
    assert "1.00x" in rows[NAIVE] and "1.00x" in rows[FULL]
    assert "not measured on CPU" in out
    data = json.loads(path.read_text())
    v = data["variants"]
    assert len(v[FREEZERT]["step_ms"]) == 3
    assert v[FREEZERT]["trainable_params"] == v[NAIVE]["trainable_params"] < v[FULL]["trainable_params"]
    assert v[NAIVE]["time_vs_naive"] == pytest.approx(1.0)


@needs_wrap
def test_bench_round_robin_and_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--repeats", "2", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert set(_rows(out)) == {FULL, NAIVE, FREEZERT}
    assert "2 repeats x 1 steps" in out
    data = json.loads(path.read_text())
    assert data["config"]["repeats"] == 2  # --cache has its own tests (tests/test_cli_cache.py)
    assert all(len(v["step_ms"]) == 2 for v in data["variants"].values())


def test_naive_freeze_is_yolov5s_rule():
    m = naive_freeze(yolov5("n", nc=2), 10)
    frozen = {k.split(".")[1] for k, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {str(i) for i in range(10)}
    # model.1. must not freeze model.11.+ (whole components)
    assert all(p.requires_grad for k, p in m.named_parameters() if k.startswith("model.1") and len(k.split(".")[1]) == 2)
    opt = yolo_optimizer(m)  # YOLOv5 hands every parameter, frozen ones included, to the optimizer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 5e-4}
    assert all(g["momentum"] == 0.937 and g["nesterov"] for g in opt.param_groups)


def test_demo_rejects_non_detector(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--model", "cnn"])


@pytest.mark.parametrize("bad", [["--img", "100"], ["--img", "32"], ["--steps", "0"]])
def test_demo_rejects_bad_sizes(bad):
    with pytest.raises(SystemExit, match="freezert:"):
        main(["demo", "--device", "cpu", "--quiet", *bad])


def test_demo_freeze_everything_is_a_clean_error():
    with pytest.raises(SystemExit, match="at most 24"):
        main(["demo", "--freeze", "25", *TINY, "--steps", "1"])
