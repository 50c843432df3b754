"""Device-independent facts: FLOPs of the backward pass, bytes saved for backward, dead outputs freed."""

from __future__ import annotations

import copy
import weakref

import torch
from torch.utils.flop_counter import FlopCounterMode

import freezert
from freezert.models import cnn_classifier, yolov5

from ._ref import loss_of, naive_reference, pretrained_like


def _backward_flops(out) -> int:
    with FlopCounterMode(display=False) as fc:
        loss_of(out).backward()
    return fc.get_total_flops()


def _forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


def test_no_backward_work_in_the_prefix():
    model = pretrained_like(yolov5("n", nc=3))
    full = copy.deepcopy(model).train()
    fm = freezert.wrap(model, freeze=10).train()
    x = torch.randn(2, 3, 32, 32)
    fm(x)  # fold once
    bw_fm = _backward_flops(fm(x))
    # the trainable part alone, fed boundary tensors that need no gradient
    with torch.no_grad():
        boundary = fm.segment.run(x)
    bw_tail = _backward_flops(fm._tail.blocks_after(dict(boundary)))
    bw_full = _backward_flops(full(x))
    assert bw_fm == bw_tail > 0
    assert bw_fm < 0.8 * bw_full
    # forward: the segment does the prefix's convolutions once and nothing more
    fw_fm, _ = _forward_flops(lambda: fm(x))
    fw_full, _ = _forward_flops(lambda: full(x))
    assert fw_fm == fw_full


def _saved_bytes(fn) -> int:
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_saved_bytes_no_more_than_naive_and_far_below_full():
    model = pretrained_like(yolov5("n", nc=3))
    full = copy.deepcopy(model).train()
    ref_src = copy.deepcopy(model)
    fm = freezert.wrap(model, freeze=10).train()
    naive = naive_reference(ref_src, fm)
    x = torch.randn(2, 3, 32, 32)
    fm(x)
    b_fm, _ = _saved_bytes(lambda: fm(x))
    b_naive, _ = _saved_bytes(lambda: naive(x))
    b_full, _ = _saved_bytes(lambda: full(x))
    assert 0 < b_fm <= b_naive < b_full


def test_segment_frees_outputs_it_no_longer_needs():
    model = yolov5("n", nc=3)
    fm = freezert.wrap(model, freeze=10)
    part = fm._plan.part
    # outputs 0..3, 5, 7, 8 are dropped inside the segment as soon as their last reader ran
    dropped = sorted(j for v in part.free_after.values() for j in v)
    assert dropped == [0, 1, 2, 3, 5, 7, 8]
    x = torch.randn(1, 3, 64, 64)
    seg = fm._prefix.segment_now()
    seg.run(x)  # fold first
    refs: dict[int, weakref.ref] = {}
    alive_at_9: list[int] = []
    blocks = [m for _, m in fm.blocks]  # the user's blocks: hooks on them fire as the segment runs them
    for i, b in enumerate(blocks[:10]):
        b.register_forward_hook(lambda m, a, o, i=i: refs.__setitem__(i, weakref.ref(o)))
    blocks[9].register_forward_pre_hook(lambda m, a: alive_at_9.extend(j for j, w in refs.items() if w() is not None))
    out = seg.run(x)
    assert sorted(out) == [4, 6, 9]
    assert sorted(alive_at_9) == [4, 6, 8]  # 8 is block 9's input; 0..3, 5, 7 are already gone


def test_cnn_swap_mode_backward_flops_match_tail():
    model = pretrained_like(cnn_classifier(num_classes=5, width=16))
    fm = freezert.wrap(model, freeze=4).train()
    x = torch.randn(3, 3, 32, 32)
    fm(x)
    bw_fm = _backward_flops(fm(x))
    with torch.no_grad():
        h = x
        for m in model.features[:4]:
            h = m.eval()(h)
    tail = torch.nn.Sequential(*model.features[4:])
    bw_tail = _backward_flops(model.fc(model.pool(tail(h)).flatten(1)))
    assert bw_fm == bw_tail > 0
