"""Hugging Face transformers built from tiny configs (random weights, nothing downloaded) against naive freezing."""

from __future__ import annotations

import pytest
import torch

from ._conformance import DTYPE, Bases, conform, need, under

transformers = need("transformers")
transformers.logging.set_verbosity_error()

B, T = 2, 12
G = torch.Generator().manual_seed(3)
IDS = torch.randint(0, 97, (B, T), generator=G)
MASK = torch.ones(B, T, dtype=torch.long)
MASK[1, 9:] = 0  # padding: the mask reaches the frozen blocks
PIXELS = torch.randn(B, 3, 32, 32, generator=G, dtype=DTYPE)
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48)


def bert():
    cfg = transformers.BertConfig(vocab_size=97, num_hidden_layers=4, max_position_embeddings=32, **SMALL, **NO_DROP)
    return transformers.BertForSequenceClassification(cfg)


def vit():
    cfg = transformers.ViTConfig(num_hidden_layers=4, image_size=32, patch_size=8, **SMALL, **NO_DROP)
    return transformers.ViTForImageClassification(cfg)


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_positions=32,
        n_embd=32,
        n_layer=4,
        n_head=4,
        use_cache=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


TEXT = {"input_ids": IDS, "attention_mask": MASK}
BUILD = {
    "bert": (bert, TEXT, "bert.embeddings", "bert.encoder.layer"),
    "vit": (vit, {"pixel_values": PIXELS}, "vit.embeddings", "vit.encoder.layer"),
    "gpt2": (gpt2, TEXT, ("transformer.wte", "transformer.wpe"), "transformer.h"),
    "llama": (llama, TEXT, "model.embed_tokens", "model.layers"),
}
base = Bases(lambda name: (BUILD[name][0](), (), BUILD[name][1]))


CASES = [(name, f, train, cache) for name in BUILD for f, train, cache in [(1, True, None), (3, False, "fp32")]]


@pytest.mark.parametrize(
    "name,freeze,train,cache",
    CASES,
    ids=[f"{c[0]}-freeze{c[1]}-{'train' if c[2] else 'eval'}{'-' + c[3] if c[3] else ''}" for c in CASES],
)
def test_same_function_as_naive_freezing(name, freeze, train, cache):
    _, inputs, stem, layers = BUILD[name]
    model = base(name)
    if name == "vit" and hasattr(model.vit, "layers"):  # transformers 5 names ViT's blocks vit.layers
        layers = "vit.layers"
    stem = (stem,) if isinstance(stem, str) else stem
    expect = under(*stem, *(f"{layers}.{i}" for i in range(freeze)))
    conform(model, freeze, (), dict(inputs), train=train, cache=cache, expect_frozen=expect)


def falcon(use_cache: bool):
    cfg = transformers.FalconConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, use_cache=use_cache
    )
    return transformers.FalconForCausalLM(cfg)


falcons = Bases(lambda use_cache: (falcon(use_cache), (), {"input_ids": IDS}))


def test_memory_budget_never_recomputes_a_layer_handed_the_key_value_cache():
    """With use_cache=True (the config's default) each layer appends its keys to the DynamicCache it is handed; a
    recompute appended them again (Falcon: a crash in backward, 24 keys against a mask of 12). Such layers keep
    their saves, said once, and a budget only their recompute could meet is refused with the minimum; with
    use_cache=False they are recomputed, exactly."""
    import freezert

    budget = 120_000  # the layers save about 80 KB each, the final norm 6.5 KB
    fm = freezert.wrap(falcons(True), 2, memory_budget=budget)
    with pytest.warns(freezert.FreezeWarning, match=r"not recompute 'transformer.h.\d'.*DynamicCache.*use_cache=False"):
        with pytest.raises(freezert.FreezeError, match=r"below the minimum .* it may recompute"):
            fm(input_ids=IDS).logits.sum().backward()
    res = conform(falcons(False), 2, (), {"input_ids": IDS}, memory_budget=budget, epochs=3)
    assert set(res.fm.recompute) & {"transformer.h.2", "transformer.h.3"}


def test_the_cache_serves_around_transformers_idle_output_hooks_and_runs_when_one_records():
    """transformers installs output-capturing hooks on every layer and attention module the first time a call asks for
    hidden states or attentions; they stay, doing nothing unless the call asks for their output. A hit skips an idle
    one (hidden states asked, attentions not: every row served); a call that asks for attentions runs the prefix, so
    the frozen layers' attention maps are real."""
    import copy

    import freezert

    torch.manual_seed(0)
    model = bert().double().train()
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, 2, cache="fp32")
    kw = {"input_ids": IDS, "attention_mask": MASK, "output_hidden_states": True}
    for _ in range(3):
        out = fm(**kw)
    assert fm.cache.stats()["hits"] == 2 * B  # calls 2 and 3 served, the idle attention hooks skipped
    want = ref(**kw)
    assert len(out.hidden_states) == len(want.hidden_states) == 5
    for a, b in zip(out.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 rows
    hits = fm.cache.stats()["hits"]
    got = fm(**kw, output_attentions=True)
    assert fm.cache.stats()["hits"] == hits  # the prefix ran: its attention hooks record
    want = ref(**kw, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 4
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
