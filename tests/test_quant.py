"""freezert.quant: weight-only int8 / fp8 frozen layers within their format's error bounds, at one byte a weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from freezert import FreezeError
from freezert.models import calibrate_batchnorm, cnn_classifier, yolov5
from freezert.quant import QuantConv, QuantLinear, dequantize, quantize_frozen_, quantize_weight, quantized_bytes


def _elementwise_bound(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The largest |w - dequantize(quantize(w))| the format allows, per element.

    int8, symmetric per channel: round to the nearest step ``scale = amax / 127``, so half a step.
    fp8 e4m3 after scaling to amax = 448: 3 mantissa bits give a relative error of at most 2^-4 for normal
    values; below 2^-6 (subnormal) the step is 2^-9, so at most 2^-10 absolute, in scaled units.
    """
    amax = w.abs().reshape(w.shape[0], -1).amax(1).view((-1,) + (1,) * (w.dim() - 1))
    if fmt == "int8":
        return (amax / 127 / 2).expand_as(w)
    scale = amax / 448
    return w.abs() * 2.0**-4 + scale * 2.0**-10


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", [(37, 53), (16, 3, 3, 5), (5, 1)], ids=str)
def test_weight_round_trip_within_the_format_bound(fmt, shape):
    w = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 3
    w[0] = 0  # an all-zero channel must not divide by zero
    q, scale = quantize_weight(w, fmt)
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn) and scale.shape == (shape[0],)
    err = (dequantize(q, scale, torch.float64) - w).abs()
    assert (err <= _elementwise_bound(w, fmt) * (1 + 1e-6) + 1e-12).all()
    assert (dequantize(q, scale)[0] == 0).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_linear_output_error_within_derived_bound(fmt):
    """|y_q - y|_j <= sum_k bound_jk |x_k| (triangle inequality over the weight errors), and the relative
    Frobenius error is near its expected size for Gaussian weights (int8: amax/(254 sqrt 3 rms) ~ 0.8%)."""
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    holder = nn.Sequential(copy.deepcopy(lin))
    assert quantize_frozen_(holder, fmt) == ["0"]
    q = holder[0]
    assert isinstance(q, QuantLinear)
    y, yq = lin(x), q(x)
    bound = x.abs() @ _elementwise_bound(lin.weight.detach(), fmt).t()
    assert ((yq - y).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    rel = ((yq - y).norm() / y.norm()).item()
    assert rel < (0.02 if fmt == "int8" else 0.06), rel


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_conv_layers_and_bytes(fmt):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 6, 3, groups=2, bias=False),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    )
    ref = copy.deepcopy(model)
    names = quantize_frozen_(model, fmt)
    assert names == ["0", "2"]  # a reflect-padded conv pads in its own forward: left alone
    assert isinstance(model[0], QuantConv) and isinstance(model[2], QuantConv) and model[3] is not ref[3]
    x, s = torch.randn(2, 3, 9, 7), torch.randn(3, 4, 11)
    for a, b, inp in ((model[0], ref[0], x), (model[2], ref[2], s)):
        y, yq = b(inp), a(inp)
        assert yq.shape == y.shape
        assert ((yq - y).norm() / y.norm()).item() < (0.02 if fmt == "int8" else 0.06)
    nbytes = quantized_bytes(model)
    n_weights = ref[0].weight.numel() + ref[2].weight.numel()
    assert nbytes["weights"] == n_weights  # one byte a weight
    assert nbytes["scales"] == 4 * (8 + 6)  # one fp32 scale per output channel


def test_user_layers_are_not_edited_and_half_inputs_work():
    model = cnn_classifier(width=8)
    copy_ = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_frozen_(copy_, "int8", filter=lambda name, m: name.startswith("features"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(copy_.fc, nn.Linear) and isinstance(copy_.features[0][0], QuantConv)
    copy_.eval().half()  # a segment's pre-cast: the quantized weights and their scales keep their dtypes
    assert copy_.features[0][0].qweight.dtype == torch.int8 and copy_.features[0][0].scale.dtype == torch.float32
    out = copy_(torch.rand(2, 3, 16, 16).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    holder = nn.Sequential(nn.Linear(4, 3))
    quantize_frozen_(holder, "fp8")
    holder.to(torch.bfloat16)
    assert holder[0].qweight.dtype == torch.float8_e4m3fn and holder[0].bias.dtype == torch.bfloat16


def _group_bound(w: torch.Tensor, fmt: str, g: int) -> torch.Tensor:
    """Per element, the format's bound with each group's own amax (a group: g consecutive weights of a row)."""
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    pad = -n % g
    amax = torch.nn.functional.pad(rows.abs(), (0, pad)).reshape(w.shape[0], -1, g).amax(2)
    amax = amax.repeat_interleave(g, 1)[:, :n].reshape(w.shape)
    if fmt == "int8":
        return amax / 127 / 2
    return w.abs() * 2.0**-4 + amax / 448 * 2.0**-10


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape,g", [((37, 53), 16), ((16, 3, 3, 5), 32), ((5, 7), 64), ((6, 100), 8)], ids=str)
def test_group_scales_round_trip_within_each_groups_bound(fmt, shape, g):
    w = torch.randn(shape, dtype=torch.float64) * 3
    w.reshape(shape[0], -1)[:, :g] *= 20  # one loud group per row: the others keep their fine steps
    q, scale = quantize_weight(w, fmt, group_size=g)
    n = w[0].numel()
    assert q.shape == w.shape and scale.shape == (shape[0], -(-n // min(g, n)))
    err = (dequantize(q, scale, torch.float64, group_size=g) - w).abs()
    assert (err <= _group_bound(w, fmt, min(g, n)) * (1 + 1e-6) + 1e-12).all()
    if fmt == "int8" and n > g:  # per channel the loud group sets every step: grouping is strictly finer
        per_channel = (dequantize(*quantize_weight(w, fmt), torch.float64) - w).norm()
        assert err.norm() < per_channel


def test_group_layers_min_weights_and_weight_attribute():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.rand(1, 3, 9, 9))
    ref = copy.deepcopy(model)
    names = quantize_frozen_(model, "int8", group_size=32, min_weights=200)
    assert names == ["2", "4"]  # the 108-weight first conv stays in float
    assert model[2].scale.shape == (64, 2) and model[4].scale.shape == (5, 50)
    x = torch.rand(2, 3, 9, 9)
    assert ((model(x) - ref(x)).norm() / ref(x).norm()).item() < 0.02
    # code that reads layer.weight (transformers' ViT checks the patch projection's dtype) gets the dequantized one
    assert model[2].weight.shape == ref[2].weight.shape and model[2].weight.dtype == torch.float32
    model.half()
    assert model[2].weight.dtype == torch.float16 and model[2].scale.dtype == torch.float32
    with pytest.raises(FreezeError, match="group_size=0"):
        quantize_frozen_(nn.Sequential(nn.Linear(2, 2)), "int8", group_size=0)
    q, scale = quantize_weight(torch.randn(3, 10), "int8", group_size=4)
    with pytest.raises(FreezeError, match="pass the group_size"):
        dequantize(q, scale)


def test_refusals_name_the_value():
    with pytest.raises(FreezeError, match="'int4'"):
        quantize_frozen_(nn.Sequential(nn.Linear(2, 2)), "int4")
    with pytest.raises(FreezeError, match="bare Linear"):
        quantize_frozen_(nn.Linear(2, 2))


def test_yolo_frozen_backbone_int8_keeps_outputs_close():
    """Error after the first two blocks stays at the per-layer bound's size; a random network amplifies it
    block by block (quantizing block 0 alone gives ~7% at block 9 on this seed), so the end is looser."""
    torch.manual_seed(0)
    model = yolov5("n")
    x = torch.rand(2, 3, 64, 64)
    calibrate_batchnorm(model, x)  # fresh statistics would shrink every activation to the Detect biases
    model.eval()
    q = copy.deepcopy(model)
    for i in range(10):
        quantize_frozen_(q.model[i], "int8")

    def rel(a, b):
        return ((a - b).norm() / (b - b.mean()).norm()).item()

    with torch.no_grad():
        assert rel(q.model[1](q.model[0](x)), model.model[1](model.model[0](x))) < 0.02
        ref = torch.cat([t.flatten() for t in model(x)[1]])
        out = torch.cat([t.flatten() for t in q(x)[1]])
    assert 1e-4 < rel(out, ref) < 0.3


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg), lambda m: m.model.layers


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=6, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg), lambda m: m.transformer.h


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("fmt,tol", [("int8", 0.03), ("fp8", 0.1)])
def test_transformer_first_two_thirds_quantized(build, fmt, tol):
    torch.manual_seed(0)
    model, layers = build()
    model.eval()
    q = copy.deepcopy(model)
    names = [n for layer in layers(q)[:4] for n in quantize_frozen_(layer, fmt)]
    assert len(names) >= 16
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < tol
    frozen_fp32 = sum(p.numel() * 4 for layer in layers(model)[:4] for p in layer.parameters() if p.dim() == 2)
    qb = sum(quantized_bytes(layer)["weights"] for layer in layers(q)[:4])
    assert qb * 4 == frozen_fp32  # the frozen matrices at one byte a weight


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cuda_hardware_matmul_close_to_dequantized(fmt):
    lin = nn.Linear(256, 128).cuda()
    holder = nn.Sequential(copy.deepcopy(lin))
    quantize_frozen_(holder, fmt)
    q = holder[0]
    x = torch.randn(64, 256, device="cuda")
    ref = lin(x)
    hw = q(x)
    q.compute = "dequantize"
    deq = q(x)
    # the hardware path also quantizes the activations per row: at most about twice the weight-only error
    tol = 0.03 if fmt == "int8" else 0.12
    assert ((hw - ref).norm() / ref.norm()).item() < tol
    assert ((deq - ref).norm() / ref.norm()).item() < tol / 2


def test_a_one_byte_segment_reads_none_of_the_float_weights_it_quantized():
    """What offload_frozen=True moves to host with weights= on CUDA: the user's float tensors no private copy reads.
    Here they are replaced by NaNs, as a release replaces their storage: the segment's outputs do not change."""
    import freezert
    from freezert.models import transformer_encoder

    torch.manual_seed(0)
    model = transformer_encoder(vocab_size=50, d_model=128, nhead=2, num_layers=4, dim_ff=256, num_classes=3).eval()
    fm = freezert.wrap(model, freeze=3, weights="int8")
    ids = torch.randint(0, 50, (4, 9))
    with torch.no_grad():
        fm(ids)  # prepares the segment: quantized copies
        before = fm(ids)
        seg = fm.segment
        unused = seg.unused_originals()
        quantized = [m for r in seg.runners for m in r.target.modules() if hasattr(m, "qweight")]
        assert quantized and sum(t.numel() for t in unused) >= sum(q.qweight.numel() for q in quantized)
        for t in unused:
            t.data = torch.full_like(t, float("nan"))
        seg._refresh_records()  # as release_originals does after moving them
        torch.testing.assert_close(fm(ids), before)  # nothing the segment runs read a released tensor
        assert fm.segment is seg


@pytest.mark.cuda
def test_one_byte_weights_with_offload_frozen_leave_the_float_originals_on_the_host():
    import freezert
    from freezert.models import transformer_encoder

    torch.manual_seed(0)
    model = transformer_encoder(vocab_size=50, d_model=128, nhead=2, num_layers=4, dim_ff=256, num_classes=3)
    model = model.cuda().eval()
    fm = freezert.wrap(model, freeze=3, weights="int8", offload_frozen=True)
    ids = torch.randint(0, 50, (4, 9), device="cuda")
    with torch.no_grad():
        first = fm(ids)
        again = fm(ids)
    unused = fm.segment.unused_originals()
    assert unused and all(t.device.type == "cpu" for t in unused)  # the float weights the segment never reads
    torch.testing.assert_close(again, first)
    fm.unwrap()
    assert all(p.device.type == "cuda" for p in model.parameters())  # unwrap() gives them back where they were
