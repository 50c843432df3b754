"""``fm.memory_report``'s total against a byte count taken without the report's code (``tests/_ref.py``), on the real
packages' models: within 1% (issue 15)."""

from __future__ import annotations

import pytest
import torch

import freezert
from freezert.bench import loss_of

from .._ref import independent_total
from ._conformance import need

G = torch.Generator().manual_seed(0)
IMAGES = torch.rand(2, 3, 64, 64, generator=G)
IDS = torch.randint(0, 97, (2, 12), generator=G)
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=4)


def yolov8n():
    need("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", nc=3, verbose=False), 10, (IMAGES,), {}


def resnet50():
    return need("torchvision").models.resnet50(num_classes=10), 3, (IMAGES,), {}


def bert():
    t = need("transformers")
    return t.BertForSequenceClassification(t.BertConfig(vocab_size=97, **SMALL)), 2, (), {"input_ids": IDS}


def gpt2():
    t = need("transformers")
    cfg = t.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=4, use_cache=False, embd_pdrop=0.0)
    return t.GPT2LMHeadModel(cfg), 2, (), {"input_ids": IDS}


def vit():
    t = need("transformers")
    cfg = t.ViTConfig(image_size=32, patch_size=8, num_labels=10, **SMALL)
    return t.ViTForImageClassification(cfg), 2, (IMAGES[:, :, :32, :32],), {}


@pytest.mark.parametrize("build", [yolov8n, resnet50, bert, gpt2, vit], ids=lambda b: b.__name__)
@pytest.mark.parametrize("kernels", ["auto", "lean"])
def test_the_reports_total_is_every_byte_counted_independently(build, kernels):
    torch.manual_seed(0)
    model, freeze, args, kwargs = build()
    fm = freezert.wrap(model.train(), freeze, cache="fp32", kernels=kernels)
    opt = torch.optim.Adam(fm.trainable_parameters(), lr=1e-4)
    for _ in range(2):  # the cache holds the rows, the optimizer its state
        loss_of(fm(*args, **kwargs)).backward()
        opt.step()
        opt.zero_grad()
    report = fm.memory_report(*args, **kwargs)  # the optimizer is found by itself
    expected = independent_total(fm, opt, args, kwargs)
    assert abs(report.total - expected) <= 0.01 * expected, (report.total, expected, report.rows)
    fm.unwrap()
