"""Ultralytics DetectionModel from its yaml configs (random weights, nothing downloaded): freeze as the seed
paper (4, 10, 22), a list, a name; the frozen set is exactly the parameters of ``model.{i}`` for frozen i."""

from __future__ import annotations

import pytest

from ._conformance import Bases, conform, images, need, under

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
    import copy

    import torch

    import freezert
    from freezert.bench import loss_of
    from freezert.bench.zoo import naive_freeze
    from freezert.memory import saved_bytes
    from freezert.models import calibrate_batchnorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 320, 320)
    model = calibrate_batchnorm(DetectionModel("yolo11n.yaml", nc=3, verbose=False), x).train()
    plain_model = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=10)
    plain = freezert.wrap(plain_model, freeze=10, kernels=False)
    fm(x), plain(x)  # the record
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    naive = naive_freeze(copy.deepcopy(plain_model), frozen)

    def step(m, params):
        return saved_bytes(lambda: loss_of(m(x)).backward(), exclude=params)

    ours = step(fm, [*model.parameters(), *model.buffers()])
    eager = step(plain, [*plain_model.parameters(), *plain_model.buffers()])
    theirs = step(naive, [*naive.parameters(), *naive.buffers()])
    assert eager == theirs  # eager's ops in the trainable part: naive freezing's bytes exactly
    assert ours <= 0.75 * theirs, f"the defaults keep {ours / theirs:.2f}x naive freezing's bytes"
    for (n, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), plain_model.buffers()))
