"""Every memory option composes with every other (issue 15): a pairwise matrix of kernels x memory_budget x cache x
dtype/weights x bn x autocast on five real families (YOLO, ResNet, BERT, GPT-2, ViT), each row two training steps
beside naive freezing, and memory_report on each. Exact options must give naive freezing's outputs and gradients;
lossy ones (bf16, one-byte weights, autocast) stay finite and close."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import freezert
from freezert.bench.zoo import naive_freeze, no_dropout, output_tensors

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

# A pairwise covering array over (kernels, memory_budget, cache, precision, bn, autocast): every pair of values of
# any two factors appears in some row. precision: None, "bf16" (dtype=torch.bfloat16), "int8" (weights="int8").
ROWS = [
    # kernels  budget cache   precision bn        autocast
    ("lean", True, "fp16", None, "frozen", False),
    ("lean", False, None, "bf16", "train", True),
    ("lean", True, "fp32", "int8", "frozen", True),
    (False, True, None, None, "train", False),
    (False, False, "fp16", "int8", "frozen", False),
    (False, True, "fp32", "bf16", "frozen", True),
    ("auto", False, "fp32", None, "frozen", True),
    ("auto", True, None, "int8", "train", False),
    ("auto", False, None, "bf16", "frozen", False),
    ("lean", False, None, None, "frozen", False),
]


def _yolo():
    from freezert.models import yolov5

    return yolov5("n", nc=3), (torch.randn(2, 3, 64, 64),), {}, 10


def _resnet():
    return torchvision.models.resnet18(num_classes=4), (torch.randn(2, 3, 64, 64),), {}, 3


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertForSequenceClassification(cfg), (), {"input_ids": torch.randint(0, 64, (2, 9))}, 3


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=2, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), (), {"input_ids": torch.randint(0, 64, (2, 9))}, 3


def _vit():
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    return transformers.ViTForImageClassification(cfg), (), {"pixel_values": torch.randn(2, 3, 32, 32)}, 3


MODELS = {"yolo": _yolo, "resnet": _resnet, "bert": _bert, "gpt2": _gpt2, "vit": _vit}
# kernels="auto" runs tensors below ops.lean.MIN_ELEMENTS through eager's ops: every tensor of these small models
# is. A threshold inside each model's range of sizes makes the "auto" rows compose a mix of lean and eager ops (the
# smaller maps or the hidden states eager, the larger maps or the MLPs lean), as they mix in real models.
MIXED = {"yolo": 3000, "resnet": 6000, "bert": 1000, "gpt2": 1000, "vit": 1100}


def _loss(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in output_tensors(out) if t.is_floating_point() and t.requires_grad)


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max|a - b| over max|b|, the latter at least ``floor`` (a gradient of pure rounding is compared to the
    largest one)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(floor)).item()


@pytest.mark.parametrize("row", ROWS, ids=["-".join(map(str, r)) for r in ROWS])
@pytest.mark.parametrize("name", list(MODELS))
def test_options_compose(name, row, monkeypatch):
    kernels, budget, cache, precision, bn, amp = row
    if bn == "train" and (cache or precision):
        pytest.skip("bn='train' refuses cache= and dtype/weights (batch statistics): checked in test_config")
    monkeypatch.setattr(freezert.ops.lean, "MIN_ELEMENTS", MIXED[name])
    torch.manual_seed(0)
    model, args, kwargs, freeze = MODELS[name]()
    model = no_dropout(model).train()
    ref = copy.deepcopy(model)
    opts = {"kernels": kernels, "bn": bn}
    if cache:
        opts["cache"] = cache
    if precision == "bf16":
        opts["dtype"] = torch.bfloat16
    elif precision == "int8":
        opts["weights"] = "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", freezert.FreezeWarning)
        fm = freezert.wrap(model, freeze, **opts)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        with ctx():
            fm(*args, **kwargs)  # the record (and the budget's measurement, when it is set later) happen here
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if budget:
            # just under what the trainable part saves: a budget that makes the planner checkpoint something
            with ctx():  # activations, as the budget counts them (parameters saved for backward are not)
                exclude = [*model.parameters(), *model.buffers()]
                saved = freezert.memory.saved_bytes(lambda: fm(*args, **kwargs), exclude=exclude)
            fm = _rewrapped(fm, model, freeze, opts, memory_budget=saved * 9 // 10)
        naive_freeze(ref, frozen)
        if bn == "train":
            for m in ref.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        exact = precision is None and not amp and cache != "fp16"
        for step in range(2):
            with ctx():
                out = fm(*args, **kwargs)
                ref_out = ref(*args, **kwargs)
            loss, ref_loss = _loss(out), _loss(ref_out)
            assert torch.isfinite(loss), f"step {step}: loss {loss}"
            loss.backward()
            ref_loss.backward()
            grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
            assert grads and all(g is not None and torch.isfinite(g).all() for g, _ in grads)
            assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
            if exact:
                for a, b in zip(output_tensors(out), output_tensors(ref_out)):
                    assert _rel(a, b) < 1e-4
                big = max(h.abs().max().item() for _, h in grads)
                for g, h in grads:
                    # float32, BatchNorm folded: rounding reaches ~3e-5 of the largest gradient on YOLO's head; a
                    # wrong gradient is off by its own size
                    assert (g.float() - h.float()).abs().max() <= 1e-4 * big
            for p in (*model.parameters(), *ref.parameters()):
                p.grad = None
        if budget:
            assert fm.recompute  # the budget made the planner checkpoint at least one block
        report = fm.memory_report(*args, **kwargs)
        assert report.total > 0 and report.saved
    fm.unwrap()


def _rewrapped(fm, model, freeze, opts, **more):
    fm.unwrap()
    return freezert.wrap(model, freeze, **opts, **more)
