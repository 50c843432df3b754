"""Same function: wrapped models against naive freezing, on fresh random inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import freezert
from freezert.models import cnn_classifier, transformer_encoder, yolov5

from ._ref import assert_grads_match, assert_outputs_close, loss_of, naive_reference, pretrained_like, rel_err

FP32_TOL = 1e-4


def _compare(model, freeze, make_inputs, *, bn="frozen", steps=2, **kw):
    """Wraps ``model`` and checks outputs, gradients and a few optimizer steps against naive freezing."""
    ref_src = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=freeze, bn=bn, **kw)
    fm.train()
    a0, k0 = make_inputs()
    fm.plan(*a0, **k0)  # the record: the stem (what runs before block 0) is frozen from here on
    ref = naive_reference(ref_src, fm, bn=bn)
    opt = torch.optim.SGD(fm.trainable_parameters(), lr=1e-3, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    frozen_before = [p.detach().clone() for p in fm.frozen_parameters()]
    for _ in range(steps):
        args, kwargs = make_inputs()
        out, ref_out = fm(*args, **kwargs), ref(*args, **kwargs)
        assert_outputs_close(out, ref_out, FP32_TOL)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        loss_of(out).backward()
        loss_of(ref_out).backward()
        assert_grads_match(model, ref, 1e-3)
        opt.step()
        ref_opt.step()
    for p, before in zip(fm.frozen_parameters(), frozen_before):
        assert p.grad is None and torch.equal(p, before)
    return fm, ref


def _images(batch=2, size=64):
    return lambda: ((torch.randn(batch, 3, size, size),), {})


YOLO_BOUNDARIES = {
    0: (),
    3: (2,),
    10: (4, 6, 9),
    11: (4, 6, 10),
    13: (4, 10, 12),
    24: (17, 20, 23),
}


@pytest.mark.parametrize("freeze", sorted(YOLO_BOUNDARIES))
def test_yolo_matches_naive_freezing(freeze):
    model = pretrained_like(yolov5("n", nc=3))
    fm, _ = _compare(model, freeze, _images())
    assert tuple(fm.boundary) == YOLO_BOUNDARIES[freeze]
    assert fm.frozen_indices == list(range(freeze))
    if freeze:
        assert fm.segment.folded > 0  # BN really was folded, and outputs still matched


def test_yolo_non_prefix_freeze_keeps_autograd_through_the_gaps():
    model = pretrained_like(yolov5("n", nc=3))
    fm, _ = _compare(model, [0, 2, 4], _images())
    assert fm.frozen_indices == [0, 2, 4]
    assert fm.prefix_length == 1 and fm.boundary == [0]
    # block 1 trains, and its gradient had to flow back through frozen blocks 2 and 4
    assert all(p.grad is not None for p in model.model[1].parameters())


def test_yolo_eval_mode_output_matches():
    model = pretrained_like(yolov5("n", nc=3))
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)  # the first call folds BN
        assert_outputs_close(fm(x), ref(x), FP32_TOL)


def test_yolo_freeze_prefixes_like_yolov5_cli():
    model = yolov5("n", nc=3)
    fm = freezert.wrap(model, freeze=[f"model.{x}." for x in range(10)])
    assert fm.frozen_indices == list(range(10))
    fm2 = freezert.wrap(yolov5("n", nc=3), freeze="module.model.1")  # DDP prefix tolerated
    assert fm2.frozen_indices == [1]  # whole dotted components: model.1 never matches model.11


def test_cnn_classifier_matches():
    _compare(pretrained_like(cnn_classifier(num_classes=7, width=16)), 3, _images(3, 33))


def test_transformer_encoder_matches():
    model = transformer_encoder(vocab_size=101, d_model=48, nhead=4, num_layers=6, dim_ff=72, num_classes=5)

    def inputs():
        ids = torch.randint(0, 101, (3, 13))
        mask = torch.ones(3, 13, dtype=torch.long)
        mask[1, 9:] = 0
        return (ids,), {"attention_mask": mask}

    fm, _ = _compare(model, 4, inputs)
    assert fm.prefix_length == 4


def test_fraction_and_predicate():
    model = transformer_encoder(vocab_size=50, d_model=32, nhead=4, num_layers=8, dim_ff=40, num_classes=3)
    assert freezert.wrap(copy.deepcopy(model), freeze=0.5).frozen_indices == [0, 1, 2, 3]
    fm = freezert.wrap(model, freeze=lambda name, m: name.endswith(("0", "1")))
    assert fm.frozen_indices == [0, 1]


def test_bn_train_is_yolov5_freezing_bit_for_bit():
    model = pretrained_like(yolov5("n", nc=3))
    ref = copy.deepcopy(model)
    for name, p in ref.named_parameters():
        if any(name.startswith(f"model.{i}.") for i in range(10)):
            p.requires_grad_(False)
    fm = freezert.wrap(model, freeze=10, bn="train").train()
    ref.train()
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64)
        out, ref_out = fm(x), ref(x)
        for a, b in zip(out, ref_out):
            assert torch.equal(a, b)
        loss_of(out).backward()
        loss_of(ref_out).backward()
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n  # running statistics updated exactly as YOLOv5's
    moved = [n for n, b in model.named_buffers() if n.startswith("model.0.") and "running_mean" in n]
    assert moved and not torch.equal(
        model.get_buffer(moved[0]), pretrained_like(yolov5("n", nc=3)).get_buffer(moved[0])
    )
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n


def test_bn_frozen_leaves_running_stats_bit_identical():
    model = pretrained_like(yolov5("n", nc=3))
    before = {n: b.clone() for n, b in model.named_buffers()}
    fm = freezert.wrap(model, freeze=10)
    fm.train()  # .train() must not undo frozen BN (pytorch#66073)
    opt = torch.optim.SGD(fm.trainable_parameters(), lr=0.01)
    for _ in range(3):
        loss_of(fm(torch.randn(2, 3, 64, 64))).backward()
        opt.step()
        opt.zero_grad()
    for n, b in model.named_buffers():
        if any(n.startswith(f"model.{i}.") for i in range(10)):
            assert torch.equal(b, before[n]), n
        elif "running_mean" in n and n.startswith("model.13."):
            assert not torch.equal(b, before[n])  # the trainable part's BN does keep learning
    frozen_bn = [m for m in model.model[:10].modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen_bn and not any(m.training for m in frozen_bn)


def test_optimizer_over_trainable_parameters_trains():
    torch.manual_seed(3)
    model = cnn_classifier(num_classes=4, width=16)
    fm = freezert.wrap(model, freeze=2)
    opt = torch.optim.Adam(fm.trainable_parameters(), lr=3e-3)
    x, y = torch.randn(16, 3, 24, 24), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(fm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    trainable = {id(p) for p in fm.trainable_parameters()}
    assert not trainable & {id(p) for p in fm.frozen_parameters()}
    assert len(trainable) + len(fm.frozen_parameters()) == len(list(model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_precast_dtype_within_tolerance(dtype):
    model = pretrained_like(cnn_classifier(num_classes=5, width=16))
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=3, dtype=dtype).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fm(x)
        out = fm(x)
        assert out.dtype == torch.float32
        assert_outputs_close(out, ref(x), 2e-2 if dtype == torch.bfloat16 else 5e-3)
    copies = [t for r in fm.segment.runners for t in r.target.parameters()]
    assert copies and all(t.dtype == dtype for t in copies)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the user's weights untouched


def test_channels_last_segment():
    model = pretrained_like(yolov5("n", nc=3))
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=10, channels_last=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        assert_outputs_close(fm(x), ref(x), FP32_TOL)
    assert all(p.is_contiguous() for p in model.parameters())  # the user's weights keep their layout
    copies = [t for r in fm.segment.runners for t in r.target.parameters() if t.dim() == 4 and t.shape[-1] > 1]
    assert copies and all(t.is_contiguous(memory_format=torch.channels_last) for t in copies)


def _layouts_after_segment(fm, model, first_trainable: nn.Module, x):
    """The memory layouts the first trainable module receives (the segment's outputs as the model reads them)."""
    seen = []
    h = first_trainable.register_forward_pre_hook(lambda m, args: seen.extend(a.is_contiguous() for a in args))
    try:
        out = fm(x)
        out2 = fm(x)  # the first call prepares the segment (folds, lays out): the second runs it
    finally:
        h.remove()
    return seen, out, out2


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="channels_last='auto' needs oneDNN on CPU")
@pytest.mark.parametrize("kind", ["yolo", "classifier"])
def test_channels_last_auto_lays_out_the_cpu_segment_and_hands_back_the_model_layout(kind):
    """The default ``channels_last="auto"``: a float32 segment of 2-D convolutions on CPU runs channels_last
    (oneDNN's fast layout), and what leaves the segment is back in the model's layout (the trainable part runs as
    under naive freezing); outputs and gradients as naive freezing's."""
    if kind == "yolo":
        model, freeze, first = pretrained_like(yolov5("n", nc=3)), 6, lambda m: m.model[6]
        x = torch.randn(2, 3, 64, 64)
    else:
        model, freeze, first = pretrained_like(cnn_classifier(width=16)), 2, lambda m: m.features[2]
        x = torch.randn(2, 3, 32, 32)
    ref = naive_reference(copy.deepcopy(model), freezert.wrap(copy.deepcopy(model), freeze=freeze))
    fm = freezert.wrap(model, freeze=freeze)
    seen, _, out = _layouts_after_segment(fm, model, first(model), x)
    seg = fm.segment
    assert seg.channels_last and seg.layout == "auto"
    copies = [t for r in seg.runners for t in r.target.parameters() if t.dim() == 4 and t.shape[-1] > 1]
    assert copies and all(t.is_contiguous(memory_format=torch.channels_last) for t in copies)
    assert all(p.is_contiguous() for p in model.parameters())  # the user's weights keep their layout
    assert seen and all(seen), "the trainable part received a channels_last tensor"
    ref_out = ref(x)
    assert_outputs_close(out, ref_out, FP32_TOL)
    loss_of(out).backward()
    loss_of(ref_out).backward()
    assert_grads_match(model, ref, 1e-3)


@pytest.mark.parametrize("option", [dict(channels_last=False), dict(dtype=torch.float64)])
def test_channels_last_auto_stays_off_where_it_was_not_measured_or_is_turned_off(option):
    """``channels_last=False`` keeps the model's layout; float64 (no oneDNN kernel) does too, under "auto"."""
    model = pretrained_like(cnn_classifier(width=16))
    if option.get("dtype") is torch.float64:
        model, option = model.double(), {}
    fm = freezert.wrap(model, freeze=2, **option)
    x = torch.randn(2, 3, 32, 32, dtype=next(model.parameters()).dtype)
    fm(x)
    fm(x)
    assert fm.segment.prepared and not fm.segment.channels_last
    assert all(t.is_contiguous() for r in fm.segment.runners for t in r.target.parameters())


def test_channels_last_must_be_a_bool_or_auto():
    with pytest.raises(freezert.FreezeError, match="channels_last='yes' must be True, False or 'auto'"):
        freezert.wrap(cnn_classifier(width=16), freeze=2, channels_last="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_segment_with_graphs(graphs):
    model = pretrained_like(yolov5("n", nc=3)).cuda()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=10, graphs=graphs).train()
    ref_fm = naive_reference(ref, fm)
    for _ in range(3):
        x = torch.randn(2, 3, 64, 64, device="cuda")
        out, ref_out = fm(x), ref_fm(x)
        assert_outputs_close(out, ref_out, FP32_TOL)
        loss_of(out).backward()
        loss_of(ref_out).backward()
    assert_grads_match(model, ref_fm, 1e-3)
    if graphs:
        assert fm.segment._graphs


def test_kernels_substituted_in_the_trainable_part_only():
    pytest.importorskip("triton")
    import freezert.ops as ops

    model = pretrained_like(cnn_classifier(num_classes=5, width=8))
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=3, kernels=True).train()
    fm_ref = freezert.wrap(ref, freeze=3, kernels=False).train()
    keys = list(model.state_dict().keys())
    x = torch.randn(2, 3, 19, 19)
    out, ref_out = fm(x), fm_ref(x)
    assert ops.backend()["batch_norm_act"] in ("triton", "triton-interpreter")
    assert_outputs_close(out, ref_out, 1e-4)
    loss_of(out).backward()
    loss_of(ref_out).backward()
    assert_grads_match(model, ref, 1e-3)
    names = [n for n, _ in fm._tail._kernel_plan]
    assert names and all(not n.startswith(("features.0", "features.1", "features.2")) for n in names)
    assert list(model.state_dict().keys()) == keys  # swapped back after the call
    assert type(model.features[4]) is nn.Sequential
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)  # running stats updated alike


def test_bn_train_in_swap_mode_matches_naive_freezing():
    model = pretrained_like(cnn_classifier(num_classes=5, width=16))
    src = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=3, bn="train").train().plan(torch.randn(4, 3, 24, 24))
    ref = naive_reference(src, fm, bn="train").train()
    for _ in range(2):
        x = torch.randn(4, 3, 24, 24)
        out, ref_out = fm(x), ref(x)
        assert torch.equal(out, ref_out)
        loss_of(out).backward()
        loss_of(ref_out).backward()
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n  # running statistics of the frozen blocks kept updating, identically
    assert_grads_match(model, ref, 1e-6)


@pytest.mark.slow
def test_wrapped_yolo_with_kernels_trains_like_without():
    """The built-in YOLO model, wrapped, with the Triton head forced on (the interpreter on CPU, about 25 s) vs
    off: same loss, same gradients, same running statistics for a training step (the CUDA test below runs 30
    steps in fp16/bf16). Batch 6: at 32 px the head's first blocks are 1x1, so BN sees one value per sample."""
    pytest.importorskip("triton")
    import freezert.ops as ops
    from freezert.models import detection_loss, detection_targets_like

    base = pretrained_like(yolov5("n", nc=3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    runs = {}
    for kernels in (True, False):
        model = copy.deepcopy(base)
        fm = freezert.wrap(model, freeze=10, kernels=kernels).train()
        out = fm(x)
        loss = detection_loss(out, detection_targets_like(out, generator=torch.Generator().manual_seed(2)))
        loss.backward()
        if kernels:
            assert len(fm._tail._kernel_plan) >= 20
            assert ops.backend()["batch_norm_act"] in ("triton", "triton-interpreter")
        runs[kernels] = (loss.detach(), model)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    assert_grads_match(runs[True][1], runs[False][1], 1e-4)  # frozen ones: None in both
    for (n, a), (_, b) in zip(runs[True][1].named_buffers(), runs[False][1].named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_true_trains_like_kernels_off_on_cuda(dtype):
    """The built-in YOLO model, wrapped, with the Triton head (``kernels=True``; the default ``"auto"`` is the lean
    path, not Triton) vs without: same loss curve over 30 steps."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on: run CUDA tests with TRITON_INTERPRET=0")
    import freezert.ops as ops
    from freezert.models import detection_loss, detection_targets_like

    torch.manual_seed(0)
    base = pretrained_like(yolov5("n", nc=3)).cuda()
    curves = {}
    for kernels in (True, False):
        model = copy.deepcopy(base)
        fm = freezert.wrap(model, freeze=10, kernels=kernels).train()
        opt = torch.optim.SGD(fm.trainable_parameters(), lr=1e-2, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(30):
            x = torch.rand(4, 3, 96, 96, generator=g).cuda()
            with torch.autocast("cuda", dtype=dtype):
                out = fm(x)
            loss = detection_loss(out, detection_targets_like(out, generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if kernels is True:
            assert fm._tail._kernel_plan and ops.backend()["batch_norm_act"] == "triton"
        curves[kernels] = torch.tensor(losses)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(curves[True], curves[False], rtol=tol, atol=tol)
    assert curves[False][-1] < curves[False][0]


def test_root_sequential_is_driven_and_matches():
    def stage(c1, c2):
        return nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU())

    model = nn.Sequential(stage(3, 8), stage(8, 8), stage(8, 12), stage(12, 12), nn.Flatten(), nn.Linear(12 * 81, 4))
    model = pretrained_like(model, torch.randn(4, 3, 9, 9))
    fm, _ = _compare(model, 3, lambda: ((torch.randn(3, 3, 9, 9),), {}))
    assert fm._plan.table.kind == "sequential" and fm.boundary == [2] and fm.segment.folded == 3


def test_inputs_that_need_a_gradient_get_it_through_the_frozen_blocks():
    model = pretrained_like(cnn_classifier(num_classes=5, width=16))
    src = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=3, cache="fp32").train().plan(torch.randn(2, 3, 24, 24))
    ref = naive_reference(src, fm)  # in fm's mode, frozen BN in eval
    x = torch.randn(2, 3, 24, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    loss_of(fm(x)).backward()
    loss_of(ref(x_ref)).backward()
    assert x.grad is not None and rel_err(x.grad, x_ref.grad) < 1e-4
    assert_grads_match(model, ref, 1e-3)
    assert fm.cache.stats()["misses"] == 0  # that call bypassed the cache


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_one_byte_frozen_weights_stay_close_and_leave_the_users_model_alone(fmt):
    from freezert.quant import QuantLinear

    # layers of at least 16K weights are stored in one byte (smaller ones stay float: segment.ONE_BYTE)
    model = transformer_encoder(vocab_size=50, d_model=128, nhead=2, num_layers=4, dim_ff=256, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=3, weights=fmt).eval()
    ids = torch.randint(0, 50, (4, 9))
    fm(ids)  # the first call prepares the segment (runs it unquantized)
    out = fm(ids)
    quant = [m for r in fm.segment.runners for m in r.target.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 3 * 4  # attention in/out projections and both feed-forward layers of 3 frozen layers
    assert all(q.qweight.element_size() == 1 for q in quant)
    assert rel_err(out, ref(ids)) < (2e-3 if fmt == "int8" else 3e-2)
    loss_of(out).backward()
    assert model.head.weight.grad is not None
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


def _saved(fn, model) -> int:
    """Activation bytes saved for backward while ``fn`` runs (parameters and buffers not counted)."""
    from freezert.memory import saved_bytes

    return saved_bytes(fn, exclude=[*model.parameters(), *model.buffers()])


def test_memory_budget_checkpoints_the_cheapest_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    base = pretrained_like(cnn_classifier(num_classes=5, width=16))
    x = torch.randn(4, 3, 32, 32)
    # eager kernels: the lean default already keeps so little that 90% of it is below recomputation's minimum
    free = freezert.wrap(copy.deepcopy(base), freeze=1, kernels=False).train()
    free(x)  # planned (record) so both measure the same thing
    params = list(free.parameters())
    unbudgeted = _saved(lambda: free(x), free)
    for p in params:
        p.grad = None
    budget = unbudgeted * 9 // 10
    fm = freezert.wrap(copy.deepcopy(base), freeze=1, memory_budget=budget, kernels=False).train()
    assert fm.recompute is None
    first = fm(x)  # measures and plans
    assert fm.recompute and fm.recompute_plan["budget"] == budget
    loss_of(first).backward()
    for p in fm.parameters():
        p.grad = None
    assert _saved(lambda: fm(x), fm) <= budget  # what later steps save fits the budget
    out, ref_out = fm(x), free(x)
    assert_outputs_close(out, ref_out, 1e-6)
    loss_of(out).backward()
    loss_of(ref_out).backward()
    assert_grads_match(fm.model, free.model, 1e-5)


def test_a_budget_below_the_minimum_is_refused_with_the_minimum():
    fm = freezert.wrap(pretrained_like(cnn_classifier(num_classes=5, width=16)), freeze=1, memory_budget="1KiB")
    with pytest.raises(freezert.FreezeError, match="below the minimum of"):
        fm.train()(torch.randn(4, 3, 32, 32))


def test_kernels_lean_saves_less_for_backward_with_the_same_gradients():
    model = pretrained_like(yolov5("n", nc=3))
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=10, kernels="lean").train()
    plain = freezert.wrap(ref, freeze=10, kernels=False).train()
    x = torch.randn(2, 3, 64, 64)
    lean_bytes = _saved(lambda: loss_of(fm(x)).backward(), fm)
    naive_bytes = _saved(lambda: loss_of(plain(x)).backward(), plain)
    assert lean_bytes <= 0.7 * naive_bytes
    assert_grads_match(model, ref, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))  # running statistics too
    assert "'lean'" in str(pytest.raises(freezert.FreezeError, freezert.wrap, yolov5("n"), kernels="fast").value)


class _SharedBias(nn.Module):
    """Each block adds a bias shared by the whole batch and hands it on (T5's position bias)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 6))
        self.lin = nn.Linear(6, 6)

    def forward(self, x, bias=None):
        bias = self.bias if bias is None else bias
        return self.lin(x) + bias, bias


class _SharedBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_SharedBias() for _ in range(3))

    def forward(self, x):
        bias = None
        for b in self.blocks:
            x, bias = b(x, bias)
        return x


def test_a_frozen_output_shared_by_the_batch_keeps_the_cache_out_and_says_which_block():
    torch.manual_seed(0)
    model = _SharedBiasNet()
    ref = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=2, cache="fp32")
    x = torch.randn(4, 6)
    with pytest.warns(
        freezert.FreezeWarning, match="'blocks.1' hands the rest of the model a tensor whose first dimension is not the"
    ):
        out = fm(x)
    assert_outputs_close(out, ref(x), 1e-6)
    assert fm.cache.stats()["lookups"] == 0  # never serves rows it could not key per sample


def test_memory_budget_on_the_lean_defaults_is_measured_until_it_fits():
    """The plan's arithmetic is an estimate; the steps after it are measured, and a plan that overshoots is
    tightened by its overshoot (YOLOv5n on the lean defaults overshot by about 1% before)."""
    torch.manual_seed(0)
    model = pretrained_like(yolov5("n", nc=3))
    x = torch.randn(2, 3, 96, 96)
    free = freezert.wrap(copy.deepcopy(model), freeze=10).train()
    free(x)
    unbudgeted = _saved(lambda: free(x), free)
    for budget in (unbudgeted * 95 // 100, unbudgeted * 85 // 100):
        fm = freezert.wrap(copy.deepcopy(model), freeze=10, memory_budget=budget).train()
        for _ in range(4):
            loss_of(fm(x)).backward()
        assert fm.recompute and _saved(lambda fm=fm: fm(x), fm) <= budget
        assert fm.recompute_plan["measured"] <= budget
