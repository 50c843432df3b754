"""torchvision classifiers built from their builders (random weights, nothing downloaded) against naive freezing."""

from __future__ import annotations

import pytest
import torch

import freezert

from ._conformance import Bases, conform, defaults_bytes, images, need, under

tv = need("torchvision")

# Stride-32 CNNs at 64 px end at 2x2, so train-mode BatchNorm at batch 2 sees 8 values per channel (at 32 px, 2
# values: the gradient amplifies float64 rounding past the tolerance in naive freezing itself).
X64 = images(size=64)
X32 = images(size=32)

BUILD = {
    "resnet50": (lambda: tv.models.resnet50(), X64),
    "convnext_tiny": (lambda: tv.models.convnext_tiny(stochastic_depth_prob=0.0), X64),
    "vit_b_16": (lambda: tv.models.vit_b_16(image_size=32), X32),
    "mobilenet_v3_large": (lambda: tv.models.mobilenet_v3_large(dropout=0.0), X64),
    "efficientnet_b0": (lambda: tv.models.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.0), X64),
    # beyond the list: a shifted-window transformer and an inception net (its own glue between blocks)
    "swin_t": (lambda: tv.models.swin_t(), X64),  # stochastic depth: off in prepare()
    "googlenet": (lambda: tv.models.googlenet(aux_logits=False, init_weights=True, dropout=0.0), X64),
}
base = Bases(lambda name: (BUILD[name][0](), (BUILD[name][1],), {}))


RESNET_BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4"]
RESNET_STEM = ("conv1", "bn1")


def resnet_frozen(n: int):
    return under(*RESNET_STEM, *RESNET_BLOCKS[1:n])


# (model, freeze, train, cache, expected frozen parameters or None)
CASES = [
    ("resnet50", 1, True, None, resnet_frozen(1)),
    ("resnet50", 2, False, "fp32", resnet_frozen(2)),
    ("resnet50", 4, True, "fp32", resnet_frozen(4)),
    ("convnext_tiny", 2, True, None, under("features.0", "features.1")),
    ("convnext_tiny", 5, False, "fp32", under(*(f"features.{i}" for i in range(5)))),
    ("vit_b_16", 3, True, None, None),
    ("vit_b_16", 9, False, None, None),
    ("mobilenet_v3_large", 4, True, None, under(*(f"features.{i}" for i in range(4)))),
    ("mobilenet_v3_large", 12, True, "fp32", under(*(f"features.{i}" for i in range(12)))),
    ("efficientnet_b0", 3, False, None, under(*(f"features.{i}" for i in range(3)))),
    ("efficientnet_b0", 7, True, "fp32", under(*(f"features.{i}" for i in range(7)))),
    ("swin_t", 2, True, "fp32", None),
    ("googlenet", 4, True, "fp32", None),
]


@pytest.mark.parametrize(
    "name,freeze,train,cache,expect",
    CASES,
    ids=[f"{c[0]}-freeze{c[1]}-{'train' if c[2] else 'eval'}{'-' + c[3] if c[3] else ''}" for c in CASES],
)
def test_same_function_as_naive_freezing(name, freeze, train, cache, expect):
    x = BUILD[name][1]
    res = conform(base(name), freeze, (x,), train=train, cache=cache, expect_frozen=expect)
    if name == "vit_b_16":
        # the encoder blocks are frozen, the classifier head is not
        layer = under(*(f"encoder.layers.encoder_layer_{i}" for i in range(freeze)))
        assert {n for n in res.frozen if layer(n)} == {n for n, _ in res.fm.model.named_parameters() if layer(n)}
        assert not any(n.startswith("heads.") for n in res.frozen)


def test_resnet50_blocks_are_stem_and_four_stages():
    fm = freezert.wrap(base("resnet50"), 2)
    fm(X64)
    assert [n for n, _ in fm.blocks] == RESNET_BLOCKS


def test_resnet50_freeze1_freezes_only_the_stem():
    """Today's block finder puts the blocks inside layer4, and freeze=1 freezes 57% of resnet50."""
    model = base("resnet50")
    fm = freezert.wrap(model, 1)
    fm(X64)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stem = sum(p.numel() for n, p in model.named_parameters() if n.startswith(RESNET_STEM))
    assert frozen == stem, f"freeze=1 froze {frozen:,} parameters; the stem (conv1, bn1) has {stem:,}"


def test_inspect_lists_the_resnet50_stages_and_the_head():
    text = freezert.inspect(base("resnet50"), 2)
    assert isinstance(text, str)
    rows = text.splitlines()
    for name in [*RESNET_BLOCKS, "fc"]:
        assert any(f" {name} " in f" {r} " for r in rows), f"inspect has no row for {name!r}:\n{text}"


def test_resnet50_defaults_keep_under_three_quarters_of_naive_freezings_bytes_at_the_benchmarks_size():
    """resnet50 with its stem, layer1 and layer2 frozen, 4 x 160 px, float32 (benchmarks/bench_defaults.py's
    input): the bottlenecks' 1024- and 2048-channel outputs are over the lean threshold, their inner maps under it;
    the defaults keep under 0.75x naive freezing's bytes, with kernels=False's gradients bit for bit."""
    torch.manual_seed(0)
    res = defaults_bytes(tv.models.resnet50(num_classes=10), 3, torch.randn(4, 3, 160, 160))
    assert res.eager == res.naive
    assert res.ours <= 0.75 * res.naive, f"the defaults keep {res.ours / res.naive:.2f}x naive freezing's bytes"
    assert res.exact
