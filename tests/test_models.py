"""The built-in example models: structure, shapes, Detect's two modes, gradients."""

import copy

import pytest
import torch
import torch.nn as nn

from freezert.models import (
    CNNClassifier,
    TransformerEncoderClassifier,
    YOLOv5,
    cnn_classifier,
    detection_loss,
    detection_targets_like,
    synthetic_images,
    transformer_encoder,
    yolov5,
)
from freezert.models.yolo import C3, SPPF, Concat, Conv, Detect, Focus


def _n(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def y5n():
    torch.manual_seed(0)
    return yolov5("n", nc=3)


def test_yolov5_layer_table(y5n):
    m = y5n
    assert isinstance(m, YOLOv5)
    assert isinstance(m.model, nn.Sequential) and len(m.model) == 25
    assert [layer.i for layer in m.model] == list(range(25))
    assert m.save == [4, 6, 10, 14, 17, 20, 23]
    f = [layer.f for layer in m.model]
    assert f[12] == [-1, 6] and f[16] == [-1, 4] and f[19] == [-1, 14] and f[22] == [-1, 10]
    assert f[24] == [17, 20, 23]
    assert all(f[i] == -1 for i in range(25) if i not in (12, 16, 19, 22, 24))
    kinds = [type(layer) for layer in m.model]
    assert kinds[0] is Focus and kinds[9] is SPPF and kinds[24] is Detect
    assert kinds[11] is nn.Upsample and kinds[15] is nn.Upsample and kinds[12] is Concat
    assert kinds.count(C3) == 8 and all(layer.type.endswith(type(layer).__name__) for layer in m.model)
    assert all(layer.np == _n(layer) for layer in m.model)
    assert torch.equal(m.stride, torch.tensor([8.0, 16.0, 32.0]))


def test_yolov5_conv_and_bn_init(y5n):
    conv = y5n.model[1]
    assert isinstance(conv, Conv)
    assert isinstance(conv.conv, nn.Conv2d) and conv.conv.bias is None
    assert isinstance(conv.bn, nn.BatchNorm2d) and isinstance(conv.act, nn.SiLU)
    for bn in (mod for mod in y5n.modules() if isinstance(mod, nn.BatchNorm2d)):
        assert bn.eps == 1e-3 and bn.momentum == 0.03
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    # Detect bias prior: objectness log(8 / (640 / s)^2) on a zero-ish init
    det = y5n.model[-1]
    b = det.m[0].bias.view(det.na, -1)
    assert torch.all(b[:, 4] < -4)


def test_yolov5_sizes_match_upstream_param_counts():
    # YOLOv5 v6.0 (a 6x6 Conv stem has exactly the parameters of Focus(64, 3)), nc=80
    counts = {s: _n(yolov5(s)) for s in "nsm"}
    assert counts == {"n": 1872157, "s": 7235389, "m": 21190557}
    # depth gain: C3 repeats of layer 6 (9 in the table) are 3 for n/s and 6 for m
    assert len(yolov5("m", nc=1).model[6].m) == 6


def test_yolov5_train_and_eval_outputs(y5n):
    m = copy.deepcopy(y5n)
    x = synthetic_images(2, 96, torch.Generator().manual_seed(1))
    m.train()
    out = m(x)
    assert isinstance(out, list) and len(out) == 3
    assert [tuple(o.shape) for o in out] == [(2, 3, 12, 12, 8), (2, 3, 6, 6, 8), (2, 3, 3, 3, 8)]
    m.eval()
    with torch.no_grad():
        z, raw = m(x)
    assert z.shape == (2, 3 * (144 + 36 + 9), 8)
    assert [tuple(o.shape) for o in raw] == [tuple(o.shape) for o in out]
    # decoded boxes are in pixels, confidences in (0, 1)
    assert torch.all(z[..., 4:] > 0) and torch.all(z[..., 4:] < 1)
    assert 0 < z[..., 0].mean() < 96 and torch.all(z[..., 2:4] > 0)
    # decoding of one cell by hand: level 0, anchor 1, row 2, col 5
    p = raw[0][0, 1, 2, 5].sigmoid()
    st, anchor = 8.0, m.model[-1].anchors[0, 1] * 8.0
    xy = (p[:2] * 2 - 0.5 + torch.tensor([5.0, 2.0])) * st
    wh = (p[2:4] * 2) ** 2 * anchor
    row = z[0, 1 * 144 + 2 * 12 + 5]
    torch.testing.assert_close(row[:4], torch.cat((xy, wh)))


def test_yolov5_forward_does_not_touch_bn_stats_in_eval(y5n):
    m = copy.deepcopy(y5n).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m(synthetic_images(1, 64))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_yolov5_gradients_flow(y5n):
    m = copy.deepcopy(y5n).train()
    x = synthetic_images(2, 64)
    out = m(x)
    loss = detection_loss(out, detection_targets_like(out, torch.Generator().manual_seed(0)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.model[0].conv.conv.weight.grad.abs().sum() > 0


def test_detection_helpers_accept_eval_form(y5n):
    m = copy.deepcopy(y5n).eval()
    with torch.no_grad():
        out = m(synthetic_images(1, 64))
    t = detection_targets_like(out)
    assert [x.shape for x in t] == [x.shape for x in out[1]]
    assert detection_loss(out, t) > 0
    with pytest.raises(ValueError):
        detection_loss(out, t[:2])


def test_yolov5_rejects_unknown_size():
    with pytest.raises(ValueError, match="size"):
        yolov5("q")


def test_cnn_classifier():
    m = cnn_classifier(num_classes=7, width=8)
    assert isinstance(m, CNNClassifier)
    assert len(m.features) == 6 and all(isinstance(s, nn.Sequential) for s in m.features)
    assert [type(x) for x in m.features[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert sum(s[0].stride[0] == 2 for s in m.features) == 3
    x = torch.randn(3, 3, 33, 33)
    y = m(x)
    assert y.shape == (3, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert _n(cnn_classifier(width=16)) > _n(cnn_classifier(width=8))


def test_transformer_encoder():
    m = transformer_encoder(vocab_size=50, d_model=32, nhead=4, num_layers=3, dim_ff=48, num_classes=5, max_len=40)
    assert isinstance(m, TransformerEncoderClassifier)
    assert isinstance(m.layers, nn.ModuleList) and len(m.layers) == 3
    ids = torch.randint(0, 50, (2, 13))
    y = m(ids)
    assert y.shape == (2, 5)
    torch.testing.assert_close(m(ids), y, rtol=0, atol=0)  # dropout 0: deterministic in train mode
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_transformer_encoder_mask_ignores_padding():
    m = transformer_encoder(vocab_size=50, d_model=32, nhead=2, num_layers=2, dim_ff=32, max_len=20).eval()
    ids = torch.randint(0, 50, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[:, 7:] = 0
    other = ids.clone()
    other[:, 7:] = (other[:, 7:] + 1) % 50  # change only padded tokens
    with torch.no_grad():
        a, b = m(ids, mask), m(other, mask)
        short = m(ids[:, :7])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, short, rtol=1e-5, atol=1e-5)
