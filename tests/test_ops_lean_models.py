"""The lean plan on whole models, frozen as naive freezing does: bytes saved for backward drop, and gradients,
outputs and BatchNorm statistics stay eager's bit for bit (float64, dropout on where the model has it)."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freezert.bench.zoo import naive_freeze_modules
from freezert.memory import saved_bytes
from freezert.models import detection_loss, detection_targets_like, yolov5
from freezert.ops import _exact, lean_plan, plan_substitutions, swapped
from freezert.ops.substitute import LeanRegion


def _skip(frozen):
    return lambda n: any(n == f or n.startswith(f + ".") or f.startswith(n + ".") for f in frozen)


def _same(a, b, what):
    assert a.shape == b.shape and _exact.same_bits(a, b), f"{what}: max |diff| {(a - b).abs().max().item():.3e}"


def check(model: nn.Module, frozen: list[str], loss, max_ratio: float) -> float:
    """Naive freezing vs the lean plan: returns lean/naive saved bytes after asserting eager's results exactly."""
    model = naive_freeze_modules(model.double(), frozen)
    lean = copy.deepcopy(model)
    plan = lean_plan(lean, skip=_skip(frozen))
    assert plan and not any(_skip(frozen)(n) for n, _ in plan)
    keys = list(lean.state_dict())
    out = {}

    def naive_step():
        torch.manual_seed(7)
        value = loss(model)
        out["naive"] = value.detach()
        value.backward()

    def lean_step():
        torch.manual_seed(7)
        with swapped(lean, plan):
            value = loss(lean)
        out["lean"] = value.detach()
        value.backward()

    exclude = [*model.parameters(), *model.buffers(), *lean.parameters(), *lean.buffers()]
    base = saved_bytes(naive_step, exclude=exclude)
    ours = saved_bytes(lean_step, exclude=exclude)
    _same(out["lean"], out["naive"], "loss")
    pairs = [(n, a.grad, b.grad) for (n, a), b in zip(lean.named_parameters(), model.parameters())]
    assert any(g is not None for _, _, g in pairs)
    for name, a, b in pairs:
        assert (a is None) == (b is None), name
        if b is not None:
            _same(a, b, f"grad {name}")
    for (name, a), b in zip(lean.named_buffers(), model.buffers()):
        _same(a, b, f"buffer {name}")
    assert list(lean.state_dict()) == keys
    assert ours <= max_ratio * base, (ours, base, ours / base)
    return ours / base


def _ce(x, y):
    return lambda m: F.cross_entropy(m(x), y)


def test_resnet_bottleneck_and_basic_block():
    """torchvision ResNets: in-place ReLU shared by the block's calls, ``out += identity``, downsample."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    bottleneck = ResNet(Bottleneck, [1, 1, 2, 2], num_classes=10)
    assert check(bottleneck, ["conv1", "bn1", "layer1", "layer2"], _ce(x, y), 0.75) < 0.75
    check(tv.models.resnet18(num_classes=10), ["conv1", "bn1", "layer1"], _ce(x, y), 0.8)


def test_mobilenet_v3():
    """Hardswish / ReLU Conv-BN-act, squeeze-excitation's ``scale * input``, ``result += input``."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(num_classes=10)
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    check(model, [f"features.{i}" for i in range(4)], _ce(x, y), 0.6)


def test_yolov5_freeze10():
    torch.manual_seed(0)
    model = yolov5("n")
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        targets = detection_targets_like(model.double()(x), torch.Generator().manual_seed(1))

    check(model, [f"model.{i}" for i in range(10)], lambda m: detection_loss(m(x), targets), 0.6)


def test_ultralytics_yolov8n_freeze10():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = DetectionModel("yolov8n.yaml", verbose=False)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)

    def loss(m):
        out = m(x)
        return sum(t.square().mean() for k, t in out.items() if k != "feats")

    check(model, [f"model.{i}" for i in range(10)], loss, 0.6)


def test_bert_with_dropout():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    model = t.BertForSequenceClassification(cfg)
    ids, labels = torch.randint(0, 64, (2, 9)), torch.tensor([0, 1])
    frozen = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    check(model, frozen, lambda m: m(input_ids=ids, labels=labels).loss, 0.8)


def test_gpt2_new_gelu_formula_with_dropout():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=16)
    model = t.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 9))
    frozen = ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1"]
    check(model, frozen, lambda m: m(input_ids=ids, labels=ids).loss, 0.8)


def test_vit():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    cfg.image_size, cfg.patch_size, cfg.num_labels = 32, 8, 3
    model = t.ViTForImageClassification(cfg)
    x, y = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    layers = [n for n, _ in model.named_modules() if n.endswith("layer.0") or n.endswith("layers.0")]
    stack = layers[0].rsplit(".", 1)[0]
    frozen = ["vit.embeddings", f"{stack}.0", f"{stack}.1"]
    check(model, frozen, lambda m: m(pixel_values=x, labels=y).loss, 0.8)


def test_llama_rms_norm_and_swiglu():
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    cfg.num_key_value_heads = 2
    model = t.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 9))
    kinds = {type(r).__name__ for _, r in lean_plan(model, skip=_skip(["model.embed_tokens", "model.layers.0"]))}
    assert {"LeanRMSNorm", "LeanActivation", "LeanRegion"} <= kinds
    check(model, ["model.embed_tokens", "model.layers.0"], lambda m: m(input_ids=ids, labels=ids).loss, 0.8)


def test_plan_shape_regions_and_swaps():
    """Regions only where there is something to route; swaps share the module's tensors; triton has no regions."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(2))
    model = nn.Sequential(nn.Linear(2, 2), block)
    plan = lean_plan(model, skip=lambda n: n == "0")
    assert [(n, type(r).__name__) for n, r in plan] == [
        ("1", "LeanRegion"),
        ("1.1", "LeanBatchNorm"),
        ("1.2", "LeanActivation"),
        ("1.3", "LeanDropout"),
        ("1.4", "LeanLayerNorm"),
    ]
    region = plan[0][1]
    assert isinstance(region, LeanRegion) and region.saves and not region.ops  # Sequential's forward: no arithmetic
    swap = plan[1][1]
    assert list(swap.parameters())[0] is block[1].weight and swap.running_mean is block[1].running_mean
    model.eval()
    with swapped(model, plan):
        assert model[1][1] is swap and not swap.training
        model.train()
    assert model[1][1] is block[1] and block[1].training  # train() while swapped reached the original
    assert not any(isinstance(r, LeanRegion) for _, r in plan_substitutions(model, impl="triton"))


def test_checkpoint_replay_keeps_the_plan():
    """torch.utils.checkpoint's recompute (in backward, after swapped closed) runs the same lean modules."""
    from freezert.memory import checkpointed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).double()
    ref = copy.deepcopy(model)
    plan = lean_plan(model)
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    for _ in range(2):  # the second step is where the CheckpointError used to come
        with swapped(model, plan), checkpointed(model, ["0", "1"]):
            loss = model(x).square().sum()
        loss.backward()
        ref(x).square().sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        _same(a.grad, b.grad, "grad")
    for a, b in zip(model.buffers(), ref.buffers()):
        _same(a, b, "buffer")


class _ConvFirstAct(nn.Module):
    """Children named conv / bn / act, but another forward: not ``act(bn(conv(x)))``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.SiLU()

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


def test_conv_bn_act_runs_as_one_lean_op_only_where_the_forward_is_exactly_that():
    """``nn.Sequential(conv, bn, act)`` and Ultralytics' ``Conv`` (forward ``act(bn(conv(x)))``) become one lean
    op; a module with the same children and another forward keeps its own forward (its parts swapped)."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish())
    odd = _ConvFirstAct()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), seq, odd)
    kinds = dict((n, type(r).__name__) for n, r in lean_plan(model))
    assert kinds["1"] == "LeanConvBNAct" and "1.1" not in kinds
    assert kinds["2.bn"] == "LeanBatchNorm" and kinds["2.act"] == "LeanActivation" and kinds.get("2") != "LeanConvBNAct"
    seq[1].register_forward_hook(lambda *a: None)  # a hook on the BatchNorm: it must run as the module
    kinds = dict((n, type(r).__name__) for n, r in lean_plan(model))
    assert kinds["1"] != "LeanConvBNAct" and kinds["1.1"] == "LeanRegion"  # itself, its F.batch_norm routed
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 12, 12, dtype=torch.float64), torch.tensor([1, 0])
    fresh = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()))
    check(fresh, ["0"], lambda m: F.cross_entropy(m(x).mean((2, 3))[:, :2], y), 0.7)
    pytest.importorskip("ultralytics")
    from ultralytics.nn.modules.conv import Conv

    kinds = dict((n, type(r).__name__) for n, r in lean_plan(nn.Sequential(nn.Identity(), Conv(3, 4, 3))))
    assert kinds["1"] == "LeanConvBNAct"
