"""One small hand-written model per row of issue 9's table: each shape of forward that planning the frozen
segment from registration order and placeholders got wrong. Plain torch (torchvision for the resnet50 row)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import freezert

from ._conformance import DTYPE, Twin, all_hits, assert_same_outputs, conform, need, prepare, under


def cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


def vec(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- a trainable head that reads an earlier frozen block's output (skip / U-Net / FPN), with a cache --------


class SkipNet(nn.Module):
    """The head reads block 0's output beside the last block's: both cross the cut at freeze=2."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([cbr(3, c), cbr(c, c), cbr(c, c), cbr(c, c)])
        self.head = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        skip = x = self.blocks[0](x)
        for b in self.blocks[1:]:
            x = b(x)
        return self.head(torch.cat([x, skip], 1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_skip_from_an_earlier_frozen_block_is_replayed_from_the_cache(train):
    """Today a full cache hit hands every frozen block but the last a zero placeholder: the head reads zeros."""
    x = vec(2, 3, 16, 16)
    conform(
        prepare(SkipNet(), (x,)),
        2,
        (x,),
        train=train,
        cache="fp32",
        epochs=3,
        expect_frozen=under("blocks.0", "blocks.1"),
    )


# -- a frozen block called again after trainable blocks (weight sharing) -------------------------------------


class Reuse(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.layers = nn.ModuleList([mlp(d) for _ in range(4)])

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(h)
        return self.layers[0](h) + h


def test_frozen_block_called_again_after_trainable_blocks_keeps_the_gradient_path():
    """Today the second call also goes through the no-grad stand-in: layers 1-3 get wrong gradients."""
    res = conform(prepare(Reuse()), 1, (vec(2, 16),), expect_frozen=under("layers.0"))
    assert "layers.0" in res.eager, f"the reused frozen block must be reported as eager: {res.eager}"


# -- a head registered before the block container --------------------------------------------------------------


class HeadFirst(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.head = nn.Linear(d, 3)  # registered first, runs last
        self.embed = nn.Linear(5, d)
        self.blocks = nn.Sequential(*[mlp(d) for _ in range(4)])

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_head_registered_before_the_blocks_stays_trainable():
    """Today the stem follows registration order, so the head is frozen as "stem" and backward() fails."""
    conform(prepare(HeadFirst()), 2, (vec(2, 5),), expect_frozen=under("embed", "blocks.0", "blocks.1"))


# -- a frozen part that reads a non-batch input, with a cache -------------------------------------------------


class Scaled(nn.Module):
    """Block 0 sees ``x * scale``; ``shift`` (a vector of the feature size, not the batch size) is added
    between the two frozen blocks."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([mlp(d) for _ in range(4)])
        self.head = nn.Linear(d, 3)

    def forward(self, x, scale=1.0, shift=None):
        h = self.blocks[0](x * scale)
        if shift is not None:
            h = h + shift
        for b in self.blocks[1:]:
            h = b(h)
        return self.head(h)


X16 = vec(2, 16, seed=1)
S1, S2 = vec(16, seed=2), vec(16, seed=3)
CALLS = {
    "positional-scalar": [((X16, 1.0), {}), ((X16, 3.0), {}), ((X16, 1.0), {})],
    "kwarg-scalar": [((X16,), {"scale": 1}), ((X16,), {"scale": 3}), ((X16,), {"scale": 1})],
    "tensor-of-another-size": [((X16,), {"shift": S1}), ((X16,), {"shift": S2}), ((X16,), {"shift": S1})],
}


@pytest.mark.parametrize("kind", list(CALLS))
def test_cache_keys_cover_non_batch_inputs(kind):
    """Today the key hashes only batch-first tensors: the second call is served the first call's features. The
    third call repeats the first and must come from the cache: non-tensor inputs are keyed by value."""
    twin = Twin(prepare(Scaled()), 2, cache="fp32", expect_frozen=under("blocks.0", "blocks.1"))
    (a1, k1), (a2, k2), (a3, k3) = CALLS[kind]
    assert twin.step(*a1, **k1)["misses"] == 2
    d = twin.step(*a2, **k2)
    assert d["misses"] == 2 and d["hits"] == 0, f"a changed input was served from the cache: {d}"
    assert all_hits(twin.step(*a3, **k3))
    twin.unwrap()


# -- a trainable BatchNorm the user put in eval mode -------------------------------------------------------------


class BNHead(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([cbr(3, c), cbr(c, c), cbr(c, c)])
        self.head = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)
        )

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_wrap_leaves_a_trainable_batchnorm_in_the_users_eval_mode_and_unwrap_restores_every_mode():
    """Today wrap puts head.1 back in train mode, and unwrap sets every BatchNorm to model.training."""
    x = vec(2, 3, 12, 12)
    model = prepare(BNHead(), (x,)).train()
    model.head[1].eval()
    conform(model, 1, (x,), train=None, expect_frozen=under("blocks.0"))
    assert not model.head[1].training and model.blocks[0][1].training


def test_wrap_leaves_batchnorm_modes_alone_in_eval_mode_too():
    x = vec(2, 3, 12, 12)
    model = prepare(BNHead(), (x,)).eval()
    model.blocks[2][1].train()  # a user's choice on a trainable block's BatchNorm
    conform(model, 2, (x,), train=None, expect_frozen=under("blocks.0", "blocks.1"))


# -- found by the zoo (timm efficientnet_b0): a BatchNorm subclass whose forward does more than normalise ------


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: normalisation, then an activation inside the same module."""

    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


def test_folding_keeps_what_a_batchnorm_subclass_does_after_normalising():
    """Today the fold replaces the whole BatchNorm module with Identity from the second call on, dropping the
    activation inside it: the second call's output is off (timm efficientnet_b0 freeze=2: 0.87)."""

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), BNAct(cout))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(block(3, 8), block(8, 8), block(8, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.blocks(x).mean((2, 3)))

    x = vec(2, 3, 12, 12)
    conform(prepare(Net(), (x,)), 2, (x,), epochs=3, expect_frozen=under("blocks.0", "blocks.1"))


# -- a ViT-like model: root parameters concatenated before block 0 ------------------------------------------------


class TinyViT(nn.Module):
    def __init__(self, d: int = 16, n: int = 4):
        super().__init__()
        self.patch = nn.Linear(12, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), mlp(d)) for _ in range(4)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x: (B, n, 12) patches
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], 1) + self.pos_embed
        for b in self.blocks:
            h = h + b(h)
        return self.head(h[:, 0])


def test_root_parameters_before_block0_get_their_gradient_through_eager_frozen_blocks():
    """Today cls_token and pos_embed stay trainable but get no gradient: block 0 runs under no_grad."""
    x = vec(2, 4, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = conform(prepare(TinyViT()), 2, (x,), expect_frozen=under("patch", "blocks.0", "blocks.1"))
    assert set(res.eager) >= {"blocks.0", "blocks.1"}
    said = [str(w.message) for w in caught if issubclass(w.category, freezert.FreezeWarning)]
    assert len(said) == 1 and "blocks.0" in said[0], said


def test_also_freeze_root_parameters_gives_the_fast_path_with_a_cache():
    x = vec(2, 4, 12)
    res = conform(
        prepare(TinyViT()),
        2,
        (x,),
        cache="fp32",
        also_freeze=["cls_token", "pos_embed"],
        expect_frozen=under("patch", "cls_token", "pos_embed", "blocks.0", "blocks.1"),
    )
    assert res.eager == {} and res.hits == 2


# -- torchvision resnet50, fp16 cache, ReLU(inplace=True) -----------------------------------------------------------


def test_resnet50_fp16_cache_second_epoch_feeds_inplace_relu_real_tensors():
    """Today the all-hit epoch hands torchvision's self.relu(x) (inplace) a zero-stride placeholder and crashes."""
    tv = need("torchvision")
    x = vec(2, 3, 64, 64)
    model = prepare(tv.models.resnet50(), (x,)).train()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, 2, cache="fp16")
    stats = []
    for _ in range(2):
        before = dict(fm.cache.stats())
        out = fm(x)
        stats.append({k: fm.cache.stats()[k] - before[k] for k in ("lookups", "hits", "misses")})
        out.sum().backward()
    assert all_hits(stats[1]), stats
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if under("conv1", "bn1", "layer1")(n)}
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in frozen)
    for m in (ref.conv1, ref.bn1, ref.layer1):
        m.eval()
    ref(x)
    ref_out = ref(x)  # the trainable BatchNorms have seen two batches on both sides
    assert_same_outputs(out, ref_out, 2e-2, "fp16-cached output")  # fp16 rows: ~4e-3 measured
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# -- nn.TransformerEncoder under the Composer-compatible schedule -----------------------------------------------


class Encoder(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.classifier = nn.Linear(d, 3)

    def forward(self, x):
        return self.classifier(self.encoder(x).mean(1))


def test_freeze_layers_orders_out_proj_inside_its_attention_and_never_freezes_the_classifier():
    """MultiheadAttention reads out_proj's weight without calling out_proj: today's order recorder never sees
    it, puts it last, and the "never freeze the last layer" rule protects it while the classifier freezes."""
    model = Encoder().to(DTYPE).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezert.schedule.record_forward_order(model)
    model(vec(2, 5, 16)).sum().backward()
    freezert.freeze_layers(model, opt, current_duration=1.0, freeze_start=0.0, freeze_level=1.0)
    state = {n: p.requires_grad for n, p in model.named_parameters()}
    assert state["classifier.weight"] and state["classifier.bias"], "the classifier (run last) was frozen"
    out_proj = [n for n in state if ".out_proj." in n]
    assert len(out_proj) == 4 and not any(state[n] for n in out_proj), {n: state[n] for n in out_proj}
