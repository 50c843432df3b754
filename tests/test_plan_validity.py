"""A plan is right for every call it serves: how, when and in what mode a model is first called never gives a
silently wrong result (issue 16). Each class of failure has a small model built for it, checked in float64
against naive freezing with the zoo's harness (outputs, gradients, state, cache hits)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import freezert
from freezert import FreezeWarning

from .zoo._conformance import Twin, all_hits, prepare


def vec(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mlp(d=8):
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


class AuxHead(nn.Module):
    """GoogLeNet's shape: an auxiliary head reads an early frozen output in train mode only; a keyword (or the
    data) decides whether a second head reads another."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(mlp(d) for _ in range(4))
        self.aux = nn.Linear(d, 2)
        self.extra = nn.Linear(d, 2)
        self.head = nn.Linear(d, 2)

    def forward(self, x, extra: bool = False, by_data: bool = False):
        h1 = self.blocks[1](self.blocks[0](x))
        h = self.blocks[3](self.blocks[2](h1))
        out = [self.head(h)]
        if self.training:
            out.append(self.aux(h1))
        if extra or (by_data and float(x.sum()) > 0):
            out.append(self.extra(h1 * 2))
        return tuple(out)


@pytest.mark.parametrize("cache", [None, "fp32"])
def test_eval_first_then_train_stores_what_train_mode_reads(cache):
    model = prepare(AuxHead())
    x = vec(4, 8)
    twin = Twin(model, 3, train=True, cache=cache)
    model.eval()
    with torch.no_grad():
        twin.fm(x)  # validation before training: the auxiliary head does not run
    model.train()
    for _ in range(3):
        twin.step(x)  # train mode: the auxiliary head reads block 1's output, on cache hits too
    twin.unwrap()


@pytest.mark.parametrize("cache", [None, "fp32"])
def test_a_reader_seen_only_on_some_calls_never_gets_a_placeholder(cache):
    model = prepare(AuxHead()).eval()
    pos, neg = vec(4, 8).abs(), -vec(4, 8, seed=1).abs()
    twin = Twin(model, 3, train=False, cache=cache)
    twin.step(neg, by_data=True)  # the data branch is not taken: block 1's output is read by block 2 only
    twin.step(neg, by_data=True)
    twin.step(pos, by_data=True)  # now it is read from outside: never a zero placeholder
    twin.step(pos, by_data=True)
    twin.step(neg, extra=True)  # a keyword: another kind of call
    twin.unwrap()


class Tokens(nn.Module):
    """ViT's shape: a trainable root parameter joins before the frozen blocks."""

    def __init__(self, d=8):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        for b in self.blocks:
            h = b(h)
        return self.head(h[:, 0])


def test_a_first_call_under_inference_mode_does_not_plan_training():
    model = prepare(Tokens())
    x = vec(3, 5, 8)
    twin = Twin(model, 2, train=True)
    with torch.inference_mode():
        twin.fm(x)  # nothing needs a gradient here: the plan of this call must not serve training
    with pytest.warns(FreezeWarning, match="cls"):
        twin.step(x)  # the cls token trains and feeds the frozen blocks: they run eagerly, it gets its gradient
    assert model.cls.grad is None  # stepped: sgd_step cleared it after comparing with naive freezing
    twin.unwrap()


class Shared(nn.Module):
    """GPT-2's shape: a frozen block hands the rest a tensor shared by the batch ([1, T, D])."""

    def __init__(self, d=8, t=5):
        super().__init__()
        self.pos = nn.Embedding(t, d)
        self.tok = nn.Linear(d, d)
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1]).unsqueeze(0))
        h = self.tok(x) + p
        for b in self.blocks:
            h = b(h)
        return self.head(h)


@pytest.mark.parametrize("first", ["call", "plan"])
def test_one_sample_first_does_not_make_a_shared_tensor_per_sample(first):
    model = prepare(Shared())
    twin = Twin(model, 2, train=True, cache="fp32")
    one = vec(1, 5, 8)
    if first == "plan":
        twin.fm.plan(one)
    else:
        twin.step(one)
    x = vec(4, 5, 8, seed=3)
    twin.step(x)
    d = twin.step(x)  # a batch of four: served from the cache, the shared position tensor recomputed
    assert all_hits(d)
    twin.unwrap()


class Hooked(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.Sequential(*[mlp(d) for _ in range(4)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.blocks(x).relu())


@pytest.mark.parametrize("cache", [None, "fp32"])
@pytest.mark.parametrize("where", ["block", "inside"])
def test_hooks_registered_after_the_first_call_fire_with_the_real_values(cache, where):
    model = prepare(Hooked())
    ref = prepare(Hooked())
    ref.load_state_dict(model.state_dict())
    fm = freezert.wrap(model, freeze=["blocks.0", "blocks.1", "blocks.2"], cache=cache)
    x = vec(3, 8)
    fm(x)
    seen, want = [], []
    target = (lambda m: m.blocks[1]) if where == "block" else (lambda m: m.blocks[1][0])
    target(model).register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    target(ref).register_forward_hook(lambda m, a, o: want.append(o.detach().clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreezeWarning)
        for _ in range(2):
            out = fm(x)
            ref_out = ref(x)
    assert len(seen) == len(want) == 2
    for a, b in zip(seen, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # a folded or stale value would differ
    torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-6)
    if cache and where == "inside":
        # the prefix ran on both calls so the hook could fire: no row was served, none counted as served
        assert fm.cache.stats()["hits"] == 0
    fm.unwrap()


def test_a_frozen_module_replaced_or_edited_after_the_first_call_is_what_runs():
    model = prepare(Hooked())
    fm = freezert.wrap(model, freeze=["blocks.0", "blocks.1"])
    x = vec(3, 8)
    fm(x)
    model.blocks[1][1] = nn.GELU()  # another activation inside a frozen block
    with torch.no_grad():
        want = model.head(model.blocks(x).relu())
    torch.testing.assert_close(fm(x), want)
    fm.unwrap()
    bn_model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 2)).double()
    prepare(bn_model, (vec(6, 8),)).eval()
    fm2 = freezert.wrap(bn_model, freeze=2)
    fm2(vec(6, 8))  # BatchNorm folded into the first Linear's private copy... with this eps
    bn_model[1].eps = 0.5  # a setting, not a tensor
    with torch.no_grad():
        want = bn_model(vec(6, 8))
    torch.testing.assert_close(fm2(vec(6, 8)), want)
    fm2.unwrap()


def test_a_frozen_block_replaced_whole_is_refused_with_the_fix():
    model = prepare(Hooked())
    fm = freezert.wrap(model, freeze=["blocks.0", "blocks.1"])
    fm(vec(3, 8))
    model.blocks[0] = mlp().double()
    with pytest.raises(freezert.FreezeError, match="replaced after wrap.*unwrap"):
        fm(vec(3, 8))


@dataclasses.dataclass
class Hidden:
    last: torch.Tensor
    first: torch.Tensor
    tag: str = "h"


class DataclassOut(nn.Module):
    """A frozen block returns a dataclass; the model returns a frozen output inside one."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList([Emit(d), mlp(d), mlp(d)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        e = self.blocks[0](x)
        h = self.blocks[2](self.blocks[1](e.last))
        return Hidden(self.head(h), e.first)


class Emit(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = self.lin(x)
        return Hidden(y.tanh(), y * 3)


def test_dataclass_outputs_are_stored_and_replayed():
    model = prepare(DataclassOut())
    twin = Twin(model, 2, train=True, cache="fp32")
    x = vec(4, 8)
    twin.step(x)
    d = twin.step(x)
    assert all_hits(d)
    out = twin.fm(x)
    assert isinstance(out, Hidden) and out.first.abs().sum() > 0  # the frozen output, not a zero placeholder
    twin.unwrap()


class Skips(nn.Module):
    """A block that does not run on this call keeps its place in the order."""

    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList(mlp(d) for _ in range(4))
        self.head = nn.Linear(d, 2)

    def forward(self, x, skip=True):
        for i, layer in enumerate(self.layers):
            if not (skip and i == 1):
                x = layer(x)
        return self.head(x)


def test_a_block_that_did_not_run_keeps_its_place_and_frozen_indices_say_what_is_frozen():
    model = prepare(Skips())
    fm = freezert.wrap(model, freeze=2)
    fm(vec(3, 8))
    assert [n for n, _ in fm.blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert fm.frozen_indices == [0, 1]
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "1"}
    fm.unwrap()


class RandomFirst(nn.Module):
    """torchvision detection's shape: a parameter-free module that is random in train mode runs first."""

    def __init__(self, d=8):
        super().__init__()
        self.jitter = Jitter()
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.jitter(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Jitter(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


def test_a_random_parameter_free_first_module_keeps_the_models_mode_and_keeps_the_cache_honest():
    import copy

    model = prepare(RandomFirst()).train()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=2, cache="fp32")
    x = vec(4, 8)
    for p in [*ref.blocks[0].parameters(), *ref.blocks[1].parameters()]:
        p.requires_grad_(False)
    ref.blocks[0].eval(), ref.blocks[1].eval()
    for call in range(3):
        torch.manual_seed(call)
        if call == 0:
            with pytest.warns(FreezeWarning, match="jitter.*another output each time"):
                out = fm(x)
        else:
            out = fm(x)
        torch.manual_seed(call)
        torch.testing.assert_close(out, ref(x))  # the same noise: the module ran as the model runs it
    assert model.jitter.training  # not put into the frozen stem's eval mode
    assert fm.cache.stats()["hits"] == 0  # never served in train mode: the frozen part's input changes each call
    model.eval(), ref.eval()
    fm(x)
    torch.testing.assert_close(fm(x), ref(x))
    assert fm.cache.stats()["hits"] == 4  # in eval mode the module is deterministic: cached
    fm.unwrap()


class Glue(nn.Module):
    """DeBERTa's shape: a trainable parameter of a module outside the blocks, read directly by the glue."""

    def __init__(self, d=8):
        super().__init__()
        self.rel = nn.Embedding(4, d)
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        r = self.rel.weight.sum(0)  # the weight read by glue code, the module never called
        for b in self.blocks:
            x = b(x + r)
        return self.head(x)


def test_a_parameter_read_by_glue_is_seen_and_named():
    model = prepare(Glue())
    x = vec(4, 8)
    twin = Twin(model, 2, train=True)
    with pytest.warns(FreezeWarning, match=r"rel\.weight.*also_freeze=\['rel\.weight'\]"):
        twin.step(x)
    assert set(twin.fm.eager_blocks) == {"blocks.0", "blocks.1"}
    twin.step(x)
    twin.unwrap()
    model = prepare(Glue())
    twin = Twin(model, 2, train=True, cache="fp32", also_freeze=["rel"])  # the fix: the fast path, cached
    twin.step(x)
    assert all_hits(twin.step(x)) and not twin.fm.eager_blocks
    twin.unwrap()


class Marked(nn.Module):
    """wav2vec2's shape: the model marks an internal tensor as requiring grad; nothing trainable is behind it."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(mlp(d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.blocks[0](x)
        if self.training:
            h.requires_grad = True
        return self.head(self.blocks[2](self.blocks[1](h)))


def test_an_input_marked_by_the_model_is_not_a_reason_to_run_eagerly():
    model = prepare(Marked())
    x = vec(4, 8)
    twin = Twin(model, 3, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FreezeWarning)
        twin.step(x)
        twin.step(x)
    assert not twin.fm.eager_blocks
    twin.unwrap()


def test_rows_computed_under_autocast_are_not_served_to_a_full_precision_call():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)], nn.Linear(8, 2))
    fm = freezert.wrap(model, freeze=3, cache="fp32")
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fm(x)
        fm(x)
    assert fm.cache.stats()["hits"] == 4
    full = fm(x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(full, want)  # bf16 rows would be off by ~1e-2
    fm.unwrap()


def test_the_record_leaves_unchanged_buffers_untouched():
    class Biased(nn.Module):  # LeViT's shape: a buffer the forward saves for backward
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.register_buffer("scale", torch.ones(4))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x * self.scale

    model = Biased()
    v = model.scale._version
    fm = freezert.wrap(model, freeze=1)
    fm(torch.randn(2, 4)).sum().backward()
    assert model.scale._version == v
    fm.unwrap()


class StemBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def test_a_stem_found_after_an_eval_first_call_gets_its_own_mode_back():
    m = StemBN().train()
    fm = freezert.wrap(m, 1)
    fm.eval()
    with torch.no_grad():
        fm(torch.randn(2, 3, 16, 16))
    fm.train()
    fm(torch.randn(2, 3, 16, 16))
    fm.unwrap()
    assert all(mod.training for mod in m.modules())  # all in train mode before the wrap: all again after


class TrainOnlyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)] + [nn.Linear(4, 2)])  # layers.3: aux
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.layers[0](x)
        aux = self.layers[3](x) if self.training else None  # train mode only, right after layers.0
        x = self.layers[2](self.layers[1](x))
        return self.head(x) if aux is None else (self.head(x), aux)


def test_the_frozen_set_does_not_move_between_validation_and_training():
    m = TrainOnlyBlock()
    fm = freezert.wrap(m, 2)
    fm.eval()
    with torch.no_grad():
        fm(torch.randn(2, 4))
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    fm.train()
    fm(torch.randn(2, 4))
    assert (
        {n for n, p in m.named_parameters() if not p.requires_grad}
        == frozen
        == {
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias",
        }
    )
    fm.unwrap()


class ListOfImages(nn.Module):
    """torchvision detection's shape: a list of images (and a list of targets) in, batched inside."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)])
        self.head = nn.Linear(4, 2)

    def forward(self, images, targets=None):
        x = torch.stack(images)
        for b in self.blocks:
            x = b(x)
        out = self.head(x.mean((2, 3)))
        return out if targets is None else (out - torch.stack(targets)).square().mean()


def test_a_list_of_images_is_a_batch_the_cache_keys_per_sample():
    torch.manual_seed(0)
    model = ListOfImages().double()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, 2, cache="fp32")
    images = [vec(3, 12, 12, seed=i) for i in range(3)]
    targets = [vec(2, seed=10 + i) for i in range(3)]
    for _ in range(2):
        loss = fm(images, targets)
    assert fm.cache.stats()["hits"] == 3 and fm.cache.stats()["misses"] == 3
    for p in [*ref.blocks[0].parameters(), *ref.blocks[1].parameters()]:
        p.requires_grad_(False)
    torch.testing.assert_close(loss, ref(images, targets), rtol=1e-6, atol=1e-9)
    fm(images[:2], targets[:2], cache_ids=[0, 1])
    fm.unwrap()


def test_a_tied_stem_parameter_is_named_when_freezing_the_stem_freezes_it():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    fm = freezert.wrap(model, 1)
    with pytest.warns(FreezeWarning, match="lm_head.weight"):
        fm(input_ids=torch.randint(0, 50, (2, 5)))
    fm.unwrap()


class ConvNet(nn.Module):
    """Conv-BN-act blocks whose trainable part the lean path swaps (one op per Conv-BN-act)."""

    def __init__(self):
        super().__init__()

        def cba(i, o, act):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), act)

        self.blocks = nn.ModuleList([cba(3, 6, nn.ReLU()), cba(6, 6, nn.ReLU()), cba(6, 6, nn.SiLU())])
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def test_hooks_and_edits_in_the_trainable_part_after_the_first_call_are_honoured():
    """The lean kernels swap trainable modules during a call: a hook registered on one later must fire, and a
    module replaced later must be the one that runs (the swap must not bring back a stale module)."""
    model = ConvNet().double().train()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=1)
    ref.blocks[0].requires_grad_(False)
    ref.blocks[0].eval()
    x = vec(2, 3, 8, 8)

    def step_both():
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
        out, want = fm(x), ref(x)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=n)

    step_both()
    seen, want = [], []
    for m, into in ((model, seen), (ref, want)):
        m.blocks[2][1].register_forward_hook(lambda mod, a, o, into=into: into.append(o.detach().clone()))
        m.blocks[1].register_forward_pre_hook(lambda mod, a, into=into: into.append(a[0].detach().clone()))
    step_both()
    assert len(seen) == len(want) == 2
    for a, b in zip(seen, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for m in (model, ref):
        m.blocks[2][2] = nn.Tanh()  # another activation in a trainable block
    step_both()
    fresh = ConvNet().double().blocks[1]
    model.blocks[1], ref.blocks[1] = fresh, copy.deepcopy(fresh)  # a trainable block replaced whole
    step_both()
    fm.unwrap()


class Chain(nn.Module):
    """Not a Sequential: the wrapper runs its own forward (recorded)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(mlp() for _ in range(3)))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.mark.parametrize("cache", [None, "fp32"])
@pytest.mark.parametrize("kind", ["sequential", "module"])
def test_hooks_on_the_model_itself_fire_and_may_edit_its_input_and_output(cache, kind):
    """A root ``nn.Sequential`` (or a YOLO graph) is driven: freezert runs its blocks, not its forward. Hooks on
    the model itself must still see the call's input and output, and what they return must be what the call
    returns, as without freezert."""
    model = (nn.Sequential(*(mlp() for _ in range(3)), nn.Linear(8, 2)) if kind == "sequential" else Chain()).double()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=2, cache=cache)
    for p in ref.parameters():
        p.requires_grad_(False)
    x = vec(4, 8)
    fm(x)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in frozen)
    seen = {id(model): [], id(ref): []}
    for m in (model, ref):
        m.register_forward_pre_hook(lambda mod, a: (a[0] * 2,))
        m.register_forward_hook(lambda mod, a, o: seen[id(mod)].append(a[0].detach().clone()) or o + 1)
    for _ in range(3):  # with a cache: the later calls are hits
        out, want = fm(x), ref(x)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert len(seen[id(model)]) == 3
    torch.testing.assert_close(seen[id(model)][-1], 2 * x)
    out.sum().backward()
    want.sum().backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    if cache is not None:
        assert fm.cache.stats()["hits"] > 0
    fm.unwrap()


class Opaque:
    """A plain class holding a tensor: no pytree, no dataclass."""

    def __init__(self, a):
        self.a = a


class OpaqueBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return Opaque(torch.tanh(self.lin(x.a if isinstance(x, Opaque) else x)))


class OpaqueNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(OpaqueBlock() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.a)


def test_outputs_inside_an_object_the_code_cannot_walk_run_exactly_and_the_cache_refuses_them():
    """A frozen block returning its tensors inside a plain object: without a cache the call is naive freezing's;
    with one, nothing can be stored per sample, so the first call says so (no placeholder, no stale row)."""
    model = OpaqueNet().double()
    ref = copy.deepcopy(model)
    ref.blocks[:2].requires_grad_(False)
    x = vec(3, 8)
    fm = freezert.wrap(model, freeze=2)
    out, want = fm(x), ref(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(model.head.weight.grad, ref.head.weight.grad)
    assert model.blocks[0].lin.weight.grad is None
    fm.unwrap()
    cached = freezert.wrap(OpaqueNet().double(), freeze=2, cache="fp32")
    with pytest.raises(freezert.CacheError, match=r"'blocks.1'.*inside an object freezert cannot look into"):
        cached(x)


def test_a_backward_pre_hook_on_a_trainable_module_fires():
    """The lean kernels swap trainable modules: one with a (full) backward pre-hook keeps running as itself."""
    model = ConvNet().double().train()
    fired = []
    model.blocks[2][1].register_full_backward_pre_hook(lambda mod, grad_out: fired.append(grad_out[0].shape))
    model.blocks[1].register_full_backward_pre_hook(lambda mod, grad_out: fired.append(grad_out[0].shape))
    fm = freezert.wrap(model, freeze=1)
    fm(vec(2, 3, 8, 8)).sum().backward()
    assert len(fired) == 2
    fm.unwrap()


class StemGain(nn.Module):
    """A stem module (run before block 0, frozen with it) reads a root parameter that trains; its output goes to the
    head, past the blocks. Naive freezing gives ``gain`` its gradient through the frozen ``side``."""

    def __init__(self, d=8):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), 1.5))
        self.side = nn.Linear(d, d)
        self.blocks = nn.Sequential(*[mlp(d) for _ in range(4)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        s = self.side(x * self.gain) if float(x.sum()) > 0 else 0.0  # a branch on the data
        return self.head(self.blocks(x) + s)


@pytest.mark.parametrize("first", [None, "eval"])
def test_a_stem_module_fed_by_a_trainable_parameter_runs_every_call_and_the_blocks_still_hit(first):
    """Once a crash (KeyError: its runner ran with autograd and stored nothing), and after a validation call under
    no_grad a silently missing gradient (the row stored then was replayed, cutting ``gain`` off)."""
    model = prepare(StemGain())
    x = vec(4, 8).abs()
    twin = Twin(model, 2, train=True, cache="fp32")
    if first:
        twin.first_call(first, x)
    for _ in range(3):
        d = twin.step(x)
    assert d["hits"] == 4 and model.gain.item() != 1.5  # blocks 0-1 served; side ran with autograd: gain trained
    assert not model.side.weight.requires_grad
    twin.unwrap()


def test_a_call_that_skips_a_cached_stem_module_stores_nothing_and_says_so():
    model = prepare(StemGain())
    model.gain.requires_grad_(False)  # side is cached with the blocks now
    fm = freezert.wrap(model, 2, cache="fp32")
    pos, neg = vec(4, 8).abs(), -vec(4, 8, seed=1).abs()
    fm(pos)
    with pytest.warns(FreezeWarning, match=r"did not store this batch.*'side' did not run"):
        out = fm(neg)  # the branch skips side: the rows the plan stores cannot all be made
    ref = model.head(model.blocks(neg))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    hits = fm.cache.stats()["hits"]
    torch.testing.assert_close(fm(neg), ref, rtol=1e-12, atol=1e-12)
    assert fm.cache.stats()["hits"] == hits  # neg was never stored
    fm(pos)
    assert fm.cache.stats()["hits"] == hits + 4
    fm.unwrap()


def test_a_frozen_parameter_turned_back_on_by_hand_is_refused_with_the_fix():
    """A trainer's own unfreeze (Lightning's BackboneFinetuning sets requires_grad=True) or a user's loop after wrap():
    the block still ran as inference, so the parameter silently got no gradient and no update."""
    model = prepare(nn.Sequential(*[mlp() for _ in range(4)]))
    fm = freezert.wrap(model, 2)
    x = vec(3, 8)
    fm(x).sum().backward()
    for p in model[1].parameters():
        p.requires_grad_(True)
    with pytest.raises(freezert.FreezeError, match=r"'1\.0\.weight' \(block '1'\).*requires_grad=True.*set_freeze"):
        fm(x)
    for p in model[1].parameters():
        p.requires_grad_(False)
    fm(x)  # as before
    fm.set_freeze(1)  # the way to unfreeze block 1
    model.zero_grad()
    fm(x).sum().backward()
    assert model[1][0].weight.requires_grad and model[1][0].weight.grad is not None
    assert model[0][0].weight.grad is None
    fm.unwrap()
