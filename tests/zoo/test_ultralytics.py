"""Ultralytics DetectionModel from its yaml configs (random weights, nothing downloaded): freeze as the seed
paper (4, 10, 22), a list, a name; the frozen set is exactly the parameters of ``model.{i}`` for frozen i."""

from __future__ import annotations

import pytest
import torch

from ._conformance import Bases, conform, defaults_bytes, images, need, under

need("ultralytics")
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

X = images(size=64)
base = Bases(lambda cfg: (DetectionModel(cfg, nc=3, verbose=False), (X,), {}))


def blocks(idx) -> object:
    return under(*(f"model.{i}" for i in idx))


# (freeze, frozen block indices, train, cache)
FREEZES = [
    (4, range(4), True, None),
    (10, range(10), False, "fp32"),
    (22, range(22), True, "fp32"),
    ([0, 1, 2, 5], [0, 1, 2, 5], True, "fp32"),  # block 5 sits after trainable blocks 3, 4: it runs eagerly
    (["model.0", "model.1", "model.2"], range(3), False, None),  # names, matched on whole dotted components
]
CASES = [(cfg, *f) for cfg in ("yolov8n.yaml", "yolo11n.yaml") for f in FREEZES]
# the other two configs that work today and must keep working: the seed paper's depths only
CASES += [(cfg, *f) for cfg in ("yolov10n.yaml", "yolov5nu.yaml") for f in FREEZES[1:3]]


@pytest.mark.parametrize(
    "cfg,freeze,idx,train,cache",
    CASES,
    ids=[
        f"{c[0].split('.')[0]}-freeze{c[1]}-{'train' if c[3] else 'eval'}{'-' + c[4] if c[4] else ''}".replace(
            " ", ""
        ).replace("'", "")
        for c in CASES
    ],
)
def test_same_function_as_naive_freezing(cfg, freeze, idx, train, cache):
    model = base(cfg)
    res = conform(model, freeze, (X,), train=train, cache=cache, expect_frozen=blocks(idx))
    assert [n for n, _ in res.fm.blocks] == [f"model.{i}" for i in range(len(model.model))]
    # a frozen block after trainable ones passes their gradient back (naive freezing does): it runs eagerly,
    # and eager_blocks says so; the prefix before the first trainable block runs as inference
    want = {"model.5"} if freeze == [0, 1, 2, 5] else set()
    assert set(res.eager) == want, f"eager_blocks is {res.eager}; the frozen blocks run with autograd are {want}"


def test_the_defaults_keep_under_three_quarters_of_naive_freezings_bytes_at_the_benchmarks_size():
    """YOLO11n at 320 px, batch 2, float32 (benchmarks/bench_defaults.py's input): the defaults run the lean ops on
    the maps of 2**17 elements or more and eager's on the rest; the bytes saved for backward fall under 0.75x naive
    freezing's, and the trainable part computes what kernels=False computes, bit for bit."""
    torch.manual_seed(0)
    res = defaults_bytes(DetectionModel("yolo11n.yaml", nc=3, verbose=False), 10, torch.randn(2, 3, 320, 320))
    assert res.eager == res.naive  # eager's ops in the trainable part: naive freezing's bytes exactly
    assert res.ours <= 0.75 * res.naive, f"the defaults keep {res.ours / res.naive:.2f}x naive freezing's bytes"
    assert res.exact
