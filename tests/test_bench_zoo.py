"""benchmarks/bench_zoo.py's --quick path on one tiny torchvision model: it runs, and what it reports is consistent."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        msg = f"torchvision is not importable ({e}); install the zoo extra: pip install -e '.[test,zoo]'"
        if os.environ.get("FREEZERT_ZOO") == "require":
            pytest.fail(f"FREEZERT_ZOO=require: {msg}", pytrace=False)
        pytest.skip(msg)


def _load():
    spec = importlib.util.spec_from_file_location("bench_zoo", os.path.join(ROOT, "benchmarks", "bench_zoo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_reports_consistent_numbers(tmp_path, capsys):
    _need_torchvision()
    bench = _load()
    path = tmp_path / "zoo.json"
    result = bench.main(["--quick", "--models", "tv_resnet18_tiny", "--steps", "3", "--quiet", "--json", str(path)])
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=str))
    (row,) = result["rows"]
    assert "error" not in row, row.get("traceback")
    saved = row["saved"]
    # eager PyTorch saves nothing inside a frozen prefix: freezert ties naive freezing, full fine-tuning saves more
    assert 0 < saved["freezert"] <= saved["naive"] * 1.01
    assert saved["freezert+fp16"] <= saved["naive"] * 1.01
    assert saved["full"] > saved["naive"]
    assert row["steps"] == 3
    for name in ("naive", "freezert", "freezert+fp16"):
        q1, med, q3 = row["ms"][name]
        assert 0 < q1 <= med <= q3 and math.isfinite(q3)
        assert med == row["median_ms"][name]
    for name in ("freezert", "freezert+fp16"):  # per-round ratios to naive
        q1, med, q3 = row["paired_ratio"][name]
        assert 0 < q1 <= med <= q3 and math.isfinite(q3)
    # every timed step of the cached variant was served from the cache
    assert row["cache"]["misses"] == 0 and row["cache"]["hits"] == row["cache"]["lookups"] > 0
    # resnet18 freeze=2 (stem + layer1): nothing eager, every frozen BatchNorm folded
    assert row["eager"] == 0 and row["eager_blocks"] == {}
    assert row["folded"] == row["bns_frozen"] == 5
    out = capsys.readouterr().out
    assert "| tv_resnet18_tiny | 2 |" in out and "FAILED" not in out
