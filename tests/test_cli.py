"""The command line, in-process at tiny sizes: inspect on built-in and user models, demo and bench."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from freezert.bench import FREEZERT, FULL, NAIVE
from freezert.cli import build_parser, main, parse_freeze

TINY = ["--device", "cpu", "--model", "yolov5n", "--img", "64", "--batch", "1", "--warmup", "1", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    # One thread: on a shared two-core machine two OpenMP threads can stall for seconds when another process runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out: str) -> dict[str, str]:
    return {name: line for line in out.splitlines() for name in (FULL, NAIVE, FREEZERT) if line.startswith(name)}


def test_inspect_prints_the_cut(capsys):
    assert main(["inspect", "--model", "yolov5n", "--freeze", "10"]) == 0
    out = capsys.readouterr().out
    assert "25 blocks" in out and "boundary: 4, 6, 9" in out


@pytest.mark.parametrize("model,freeze", [("cnn", "2"), ("encoder", "3")])
def test_inspect_other_models(capsys, model, freeze):
    assert main(["inspect", "--model", model, "--freeze", freeze]) == 0
    assert "frozen" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,value",
    [
        ("10", 10),
        ("0.5", 0.5),
        ("model.3", "model.3"),
        ("0,1,2", [0, 1, 2]),
        ("model.1,model.2", ["model.1", "model.2"]),
        ("3,", [3]),
        ("none", None),
    ],
)
def test_parse_freeze_takes_every_form(text, value):
    assert parse_freeze(text) == value


def _frozen_rows(out: str) -> list[int]:
    rows = [line.split() for line in out.splitlines()]
    return [int(r[0]) for r in rows if len(r) > 4 and r[0].isdigit() and r[4] == "frozen"]


@pytest.mark.parametrize(
    "freeze,frozen",
    [("0.2", [0, 1, 2, 3, 4]), ("model.3", [3]), ("0,1,2", [0, 1, 2]), ("model.1,model.2", [1, 2]), ("4,", [4])],
)
def test_inspect_accepts_every_freeze_form(capsys, freeze, frozen):
    assert main(["inspect", "--model", "yolov5n", "--freeze", freeze]) == 0
    out = capsys.readouterr().out
    assert _frozen_rows(out) == frozen, out


def test_inspect_bad_freeze_is_a_clean_error(capsys):
    assert main(["inspect", "--model", "cnn", "--freeze", "99"]) == 2
    assert "freezert:" in capsys.readouterr().err
    assert main(["inspect", "--model", "yolov5n", "--freeze", "model.99"]) == 2
    assert "matches no block" in capsys.readouterr().err


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.layers(x)


def tiny_factory() -> nn.Module:
    return _Tiny()


def test_inspect_user_factory(capsys, monkeypatch, tmp_path):
    pkg = tmp_path / "mymodels.py"
    pkg.write_text(
        "from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["inspect", "--model", "mymodels:build", "--freeze", "1"]) == 0  # found in the working directory
    out = capsys.readouterr().out
    assert "Sequential: 3 blocks" in out and _frozen_rows(out) == [0]
    assert main(["inspect", "--model", f"{__name__}:tiny_factory", "--freeze", "layers.2"]) == 0
    assert _frozen_rows(capsys.readouterr().out) == [2]


def test_inspect_checkpoint(capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), path)
    assert main(["inspect", "--model", str(path), "--freeze", "0.5"]) == 0
    assert _frozen_rows(capsys.readouterr().out) == [0]
    yolo = tmp_path / "yolo.pt"
    torch.save({"model": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), "epoch": 3}, yolo)
    assert main(["inspect", "--model", str(yolo), "--freeze", "2"]) == 0  # Ultralytics' {"model": ...} layout
    assert _frozen_rows(capsys.readouterr().out) == [0, 1]


@pytest.mark.parametrize(
    "model,match",
    [("weights", "holds a state_dict"), ("nosuch.module:f", "cannot import"), ("yolov9", "neither a built-in")],
)
def test_inspect_bad_model_says_what_to_pass(tmp_path, model, match):
    if model == "weights":
        model = str(tmp_path / "w.pt")
        torch.save(nn.Linear(2, 2).state_dict(), model)
    with pytest.raises(SystemExit, match=match):
        main(["inspect", "--model", model])


def test_help_is_per_subcommand():
    sub = build_parser()._subparsers._group_actions[0].choices
    demo, bench, inspect = (sub[n].format_help() for n in ("demo", "bench", "inspect"))
    assert "--cache" not in demo and "--repeats" not in demo and "bench" not in demo
    assert "alternated step by step" in demo and "--budget" in demo
    assert "--cache" in bench and "--input" in bench and "--threads" in bench
    assert "package.module:factory" in inspect and "--steps" not in inspect


def test_demo_alternates_shows_spread_and_verdict(capsys, tmp_path):
    path = tmp_path / "demo.json"
    torch.set_num_threads(2)
    assert main(["demo", "--steps", "3", *TINY, "--json", str(path)]) == 0
    assert torch.get_num_threads() == 2  # the run's thread count is undone for in-process callers
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {FULL, NAIVE, FREEZERT}
    assert "alternated step by step" in out and "IQR ms" in out and "time/naive" in out
    assert "1.00x" in rows[NAIVE] and "1.00x" in rows[FULL]
    assert "threads=1" in out and "CPU (1 thread)" in out  # the CPU default: two threads stall on a shared machine
    # three paired steps: reported, but no call is made on them
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("verdict: freezert vs naive freezing: too noisy to call, ") and "only 3 paired steps" in last
    data = json.loads(path.read_text())
    v = data["variants"]
    assert len(v[FREEZERT]["step_ms"]) == 3 and v[FREEZERT]["q1_ms"] <= v[FREEZERT]["median_ms"] <= v[FREEZERT]["q3_ms"]
    assert v[FREEZERT]["trainable_params"] == v[NAIVE]["trainable_params"] < v[FULL]["trainable_params"]
    assert v[NAIVE]["time_vs_naive"] == pytest.approx(1.0)
    assert 0 < v[NAIVE]["train_bytes"] < v[FULL]["train_bytes"]  # frozen blocks: no gradients, no optimizer state
    assert data["verdict"].startswith("verdict:")


def test_bench_round_robin_and_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--repeats", "2", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert set(_rows(out)) == {FULL, NAIVE, FREEZERT}
    assert "round-robin, 2 repeats x 1 steps" in out and "verdict:" in out
    data = json.loads(path.read_text())
    assert data["config"]["repeats"] == 2  # --cache has its own tests (tests/test_cli_cache.py)
    assert all(len(v["step_ms"]) == 2 for v in data["variants"].values())


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png = tmp_path / "demo.png"
    assert main(["demo", "--steps", "50", *TINY, "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert "freezert[plot]" in captured.err and "matplotlib" in captured.err
    assert captured.out == "" and not png.exists()  # nothing ran


def test_demo_rejects_non_detector():
    with pytest.raises(SystemExit):
        main(["demo", "--model", "cnn"])


@pytest.mark.parametrize("bad", [["--img", "100"], ["--img", "32"], ["--steps", "0"]])
def test_demo_rejects_bad_sizes(bad):
    with pytest.raises(SystemExit, match="freezert:"):
        main(["demo", "--device", "cpu", "--quiet", *bad])


def test_demo_freeze_everything_is_a_clean_error(capsys):
    assert main(["demo", "--freeze", "25", *TINY, "--steps", "1"]) == 2
    assert "at most 24" in capsys.readouterr().err


def test_inspect_memory_prints_the_plan_and_the_report(capsys):
    assert main(["inspect", "--model", "cnn", "--freeze", "3", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "head  fc" in out and "frozen (inference)" in out  # recorded: the head is known
    assert "saved activations with" in out and "every trainable block recomputed" in out
    assert "one byte + scales" in out


def test_inspect_memory_needs_an_input_shape_for_a_user_model(capsys, tmp_path):
    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), path)
    assert main(["inspect", "--model", str(path), "--freeze", "1", "--memory"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["inspect", "--model", str(path), "--freeze", "1", "--input", "2,x"]) == 2
    assert "not a shape" in capsys.readouterr().err
    assert main(["inspect", "--model", str(path), "--freeze", "1", "--input", "3,4", "--memory"]) == 0
    assert "saved activations with" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_inspect_memory_plot_writes_the_png(capsys, tmp_path):
    png = tmp_path / "m.png"
    assert main(["inspect", "--model", "cnn", "--freeze", "3", "--memory", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and "saved activations with" in capsys.readouterr().out


def test_inspect_plot_without_matplotlib_fails_before_the_step(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "m.png"
    assert main(["inspect", "--model", "cnn", "--freeze", "3", "--memory", "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert "freezert[plot]" in captured.err and captured.out == "" and not png.exists()
    assert main(["inspect", "--model", "cnn", "--plot", str(png)]) == 2  # --plot draws the memory report only
    assert "add --memory" in capsys.readouterr().err


def test_help_and_import_load_no_torch():
    # freezert --help answers before torch (seconds to import) is loaded; import freezert defers every submodule
    code = (
        "import sys, contextlib, io\n"
        "import freezert\n"
        "from freezert.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'inspect' in out.getvalue()\n"
        "heavy = ('torch', 'numpy', 'matplotlib', 'triton', 'freezert.cache', 'freezert.ops', 'freezert.wrapper',\n"
        "         'freezert.bench.variants', 'freezert.integrations')\n"
        "print(sorted(m for m in sys.modules if m in heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_resolve_to_their_modules():
    import freezert

    assert freezert.wrap.__module__.startswith("freezert.") and freezert.FrozenModel.__name__ == "FrozenModel"
    assert freezert.monitor.MemoryMonitor and freezert.models.yolov5  # submodules load on first access
    assert set(freezert.__all__) <= set(dir(freezert))
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        freezert.nosuch  # noqa: B018


OPTIONS = ["bench", "--device", "cpu", "--quiet", "--steps", "6", "--budget", "0", "--threads", "1"]


def test_bench_options_on_a_user_model(capsys, tmp_path):
    path = tmp_path / "options.json"
    spec = "freezert.models:cnn_classifier"  # a factory, as a user's would be
    assert main([*OPTIONS, "--model", spec, "--input", "2,3,32,32", "--freeze", "3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    opts = data["options"]
    naive, defaults = opts[NAIVE], opts["freezert"]
    assert list(opts)[:2] == [NAIVE, "freezert"] and data["rounds"] == 6
    assert all(len(o["step_ms"]) == 6 for o in opts.values() if not o["skipped"])
    # freezert computes naive freezing's function (BN folded: rounding only); at this size every tensor is below the
    # defaults' lean threshold (eager's ops, naive freezing's bytes), and kernels='lean' saves less for backward
    assert defaults["rel_error"] <= 1e-5 and defaults["saved_bytes"] == naive["saved_bytes"]
    lean = opts["kernels='lean'"]
    assert lean["rel_error"] <= 1e-5 and 0 < lean["saved_bytes"] < naive["saved_bytes"]
    assert defaults["trainable_params"] == naive["trainable_params"] < data["total_params"] - data["frozen_params"] + 1
    eager = opts["kernels=False"]  # eager PyTorch inside the trainable part: naive freezing's bytes exactly
    assert eager["saved_bytes"] == naive["saved_bytes"] and eager["rel_error"] <= 1e-5
    budget = next(o for k, o in opts.items() if k.startswith("memory_budget="))
    assert budget["saved_bytes"] < naive["saved_bytes"] and any(n.startswith("recomputes ") for n in budget["notes"])
    one_byte = next(o for k, o in opts.items() if k.endswith("='int8'"))
    assert one_byte["rel_error"] > 1e-4  # one-byte frozen weights change the outputs a little: checked after the
    # first call, which runs the segment unfolded and unquantized
    assert "every timed step was served from the cache" in opts["cache='fp16'"]["notes"]
    # the table, its notes, and a verdict that names the leanest option and the lossy one
    rows = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert {NAIVE.split()[0], "freezert", "cache='fp16'", "kernels=False"} <= rows
    assert "saved MiB" in out and "interval" in out and "naive freeze: requires_grad=False" in out
    verdict = out.rstrip().splitlines()[-2]
    assert verdict.startswith("verdict: ") and "leanest for backward: " in verdict
    assert "changes the outputs: " in verdict and "='int8' (up to " in verdict
    assert "rounds ran" not in verdict and data["verdict"] == verdict


def test_bench_options_too_few_rounds_says_so(capsys):
    argv = [*OPTIONS[:4], "--steps", "2", "--model", f"{__name__}:tiny_factory", "--input", "4,4", "--freeze", "1,"]
    assert main(argv) == 0
    verdict = capsys.readouterr().out.rstrip().splitlines()[-2]
    assert "step times too noisy to call: 2 rounds ran, at least 6 needed" in verdict


def test_bench_options_checks_its_arguments(capsys):
    with pytest.raises(SystemExit, match="does not take --plot"):
        main([*OPTIONS, "--model", "cnn", "--input", "2,3,32,32", "--plot", "x.png"])
    assert main([*OPTIONS, "--model", "cnn", "--input", "2,x"]) == 2
    assert "not a shape" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="takes a block count"):
        main(["bench", "--freeze", "model.3", "--device", "cpu"])
