"""``freezert bench --cache`` in-process at tiny sizes: the five variants, cache hits from epoch 2, the ratios."""

import json

import pytest
import torch

from freezert.bench import CACHE_VARIANTS, CACHED, FLOOR, FREEZERT
from freezert.cli import main

# One thread: on a shared two-core machine two OpenMP threads stall for seconds whenever another process
# holds a core.
COMMON = ["bench", "--cache", "--device", "cpu", "--epochs", "2", "--warmup", "1", "--threads", "1", "--quiet"]
YOLO = [*COMMON, "--model", "yolov5n", "--img", "64", "--batch", "2", "--dataset-size", "4"]
ENCODER = [*COMMON, "--model", "encoder", "--seq-len", "16", "--batch", "4", "--dataset-size", "8"]


def _rows(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        for name in CACHE_VARIANTS:
            if line.startswith(name + " ") and (name != FREEZERT or not line.startswith(CACHED)):
                rows[name] = line
    return rows


def _check(out: str, data: dict, samples: int, freeze: int) -> None:
    assert set(_rows(out)) == set(CACHE_VARIANTS), out
    assert "ep1 ms" in out and "ep2+ ms" in out and "/floor" in out and "/full" in out and "/naive" in out
    for label in ("cached / floor:", "full fine-tune / cached:", "naive freeze / cached:", "cache fill (epoch 1)"):
        line = next(x for x in out.splitlines() if label in x)
        assert "x" in line.split(label)[1] and " - " not in line, line
    assert "epochs 2+: " in out and f"{samples} hits, 0 misses" in out
    if not torch.cuda.is_available():
        assert "needs a GPU" in out and "peak memory: not measured on CPU" in out

    assert data["config"]["freeze"] == freeze and data["config"]["epochs"] == 2
    v = data["variants"]
    assert set(v) == set(CACHE_VARIANTS)
    cached = v[CACHED]["epochs"]
    assert cached[0]["cache"]["misses"] == samples and cached[0]["cache"]["hits"] == 0  # epoch 1 fills
    assert cached[1]["cache"]["hits"] == samples and cached[1]["cache"]["misses"] == 0  # epoch 2 hits
    assert all(len(e["step_ms"]) == samples // data["config"]["batch"] for e in cached)
    assert v[FLOOR]["setup_s"] is not None and v[FLOOR]["epochs"][0].get("cache", {}) == {}
    assert v[CACHED]["trainable_params"] == v[FLOOR]["trainable_params"] == v[FREEZERT]["trainable_params"]
    for name in CACHE_VARIANTS:
        loss = v[name]["final_loss"]
        assert loss is not None and loss == loss  # trained, finite
    for key in ("cached_vs_floor", "full_vs_cached", "naive_vs_cached", "fill_vs_uncached"):
        assert data["ratios"][key] is not None and data["ratios"][key] > 0
    assert data["cache_stats"]["rows"] >= samples and data["cache_stats"]["bytes"] > 0


def test_bench_cache_yolo(capsys, tmp_path):
    path = tmp_path / "yolo.json"
    assert main([*YOLO, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    _check(out, json.loads(path.read_text()), samples=4, freeze=10)
    assert "keyed by content hashes" in out


def test_bench_cache_encoder_with_ids(capsys, tmp_path):
    path = tmp_path / "enc.json"
    threads = torch.get_num_threads()
    assert main([*ENCODER, "--ids", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # --threads is undone after the run
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    _check(out, data, samples=8, freeze=8)  # the encoder's default: 8 of 12 layers
    assert "keyed by explicit ids" in out and "freeze=8" in out
    assert "(goal on H100/H200, encoder freeze 8 of 12: >= 4x)" in out


@pytest.mark.parametrize(
    "bad,match",
    [
        (["--epochs", "1"], "at least 2"),
        (["--where", "cuda"], "CPU"),
        (["--dataset-size", "1"], "dataset-size"),
        (["--bn", "train"], "bn frozen"),
        (["--plot", "x.png"], "no plot"),
    ],
)
def test_bench_cache_rejects_bad_options(bad, match):
    if "--where" in bad and torch.cuda.is_available():
        pytest.skip("--where cuda is valid with a GPU")
    with pytest.raises(SystemExit, match=match):
        main([*ENCODER, *bad])  # the last --epochs wins


def test_bench_cache_freeze_everything_is_a_clean_error(capsys):
    assert main([*ENCODER, "--freeze", "12"]) == 2
    assert "at most 11" in capsys.readouterr().err
