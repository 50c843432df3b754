"""Real model shapes from ``transformers`` (built from small configs, nothing downloaded)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import freezert

from ._ref import assert_grads_match, assert_outputs_close, loss_of, naive_reference, pretrained_like

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")


def _check(model, freeze, make_inputs, expect_path, expect_stem):
    src = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=freeze).train().plan(**make_inputs())
    ref = naive_reference(src, fm)
    assert fm._plan.table.path == expect_path
    assert [n for n, _ in fm._plan.table.stem] == expect_stem
    assert all(not p.requires_grad for _, m in fm._plan.table.stem for p in m.parameters())
    for _ in range(2):
        kwargs = make_inputs()
        out, ref_out = fm(**kwargs), ref(**kwargs)
        assert_outputs_close(out, ref_out, 1e-4)
        loss_of(out).backward()
        loss_of(ref_out).backward()
    assert_grads_match(model, ref, 1e-3)
    return fm


def test_bert():
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=80,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    model = transformers.BertForSequenceClassification(cfg)

    def inputs():
        ids = torch.randint(0, 97, (3, 17))
        mask = torch.ones_like(ids)
        mask[2, 11:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    fm = _check(model, 3, inputs, "bert.encoder.layer", ["bert.embeddings"])
    assert fm.frozen_indices == [0, 1, 2]


def test_vit():
    cfg = transformers.ViTConfig(
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=72,
        image_size=30,
        patch_size=6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.ViTModel(cfg)
    fm = _check(model, 3, lambda: {"pixel_values": torch.randn(2, 3, 30, 30)}, _vit_path(model), ["embeddings"])
    assert fm.prefix_length == 3


def _vit_path(model):
    return "layers" if hasattr(model, "layers") else "encoder.layer"


def test_resnet_folds_batchnorm():
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 2, 1])
    model = pretrained_like(transformers.ResNetForImageClassification(cfg), torch.randn(4, 3, 48, 48))
    fm = _check(
        model, 2, lambda: {"pixel_values": torch.randn(3, 3, 45, 45)}, "resnet.encoder.stages", ["resnet.embedder"]
    )
    assert fm.segment.folded >= 5
