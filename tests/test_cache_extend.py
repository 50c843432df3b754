"""Freezing deeper keeps the feature cache: stored rows are carried to the new cut by the blocks in between."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import freezert
from freezert import CacheError
from freezert.models import transformer_encoder, yolov5
from freezert.schedule import Linear

from ._ref import assert_outputs_close, pretrained_like


@pytest.fixture()
def yolo():
    return pretrained_like(yolov5("n", nc=3))


def _rows_through(runner, counts: list[int]):
    return runner.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[0]))


def test_deeper_freeze_carries_rows_without_running_the_old_prefix(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=6, cache="fp32").eval()
    data = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        for x in data:
            fm(x)
        assert len(fm.cache) == 6 and fm.cache.stats()["misses"] == 6
        fm.set_freeze(10)
        seg = fm._prefix.segment_now()  # built now so its runners can be watched
        stem_rows: list[int] = []
        mid_rows: list[int] = []
        # counted on the segment's private copies: a hook on the user's blocks would keep the cache out
        hooks = [_rows_through(seg.runners[0].target, stem_rows), _rows_through(seg.block_runners[6].target, mid_rows)]
        outs = [fm(x) for x in data]
        for h in hooks:
            h.remove()
    st = fm.cache.stats()
    # the new boundary came from the stored one: the old prefix ran only for the 1-row layout probe
    assert sum(stem_rows) == 1 and sum(mid_rows) == 1 + 6
    assert st["extended"] == 6 and st["misses"] == 6 and st["hits"] == 6 and st["invalidations"] == 0
    assert len(fm.cache) == 6 and fm.boundary == [4, 6, 9]
    for o, x in zip(outs, data):
        assert_outputs_close(o, ref(x), 1e-4)  # fp32 codec: exact up to float rounding


def test_extended_rows_stay_within_the_codec_tolerance(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=4, cache="fp16").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        fm.set_freeze(10)
        out = fm(x)
    assert fm.cache.stats()["extended"] == 3 and fm.cache.stats()["hits"] == 3
    assert_outputs_close(out, ref(x), 2e-2)


def test_deeper_freeze_with_changed_weights_starts_over(yolo):
    fm = freezert.wrap(yolo, freeze=6, cache="fp32").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        other = pretrained_like(yolov5("n", nc=3), seed=5)
        fm.load_state_dict(other.state_dict())
        fm.set_freeze(10)
        out = fm(x)
    st = fm.cache.stats()
    assert st["extended"] == 0 and st["invalidations"] == 1 and st["misses"] == 4
    assert_outputs_close(out, other.eval()(x), 1e-4)


def test_swap_mode_deeper_freeze_starts_over():
    model = transformer_encoder(vocab_size=101, d_model=48, nhead=4, num_layers=6, dim_ff=72, num_classes=5)
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=3, cache="fp32").eval()
    ids = torch.randint(0, 101, (3, 11))
    with torch.no_grad():
        fm(ids)
        fm.set_freeze(5)
        out = fm(ids)
        assert fm.cache.stats()["extended"] == 0 and fm.cache.stats()["invalidations"] == 1
        assert_outputs_close(out, ref(ids), 1e-4)
        assert_outputs_close(fm(ids), ref(ids), 1e-4)  # served from the new cut
    assert fm.cache.stats()["hits"] == 3


def test_extension_rewrites_a_disk_store_for_the_new_cut(yolo, tmp_path):
    path = tmp_path / "store"
    cache = freezert.FeatureCache(codec="fp32", where="disk", path=path)
    fm = freezert.wrap(yolo, freeze=6, cache=cache).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        fm.set_freeze(10)
        want = fm(x)
        cache.close()
        assert json.loads((path / "header.json").read_text())["fingerprint"] == cache.fingerprint
        # a new run at the new depth opens the rewritten store and is served from it
        again = freezert.wrap(copy.deepcopy(yolo), freeze=10, cache=freezert.FeatureCache("fp32", "disk", path=path))
        got = again.eval()(x)
    assert again.cache.stats()["hits"] == 4 and again.cache.stats()["misses"] == 0
    assert_outputs_close(got, want, 1e-5)


def test_extension_drops_bad_records_instead_of_carrying_them(yolo, tmp_path):
    cache = freezert.FeatureCache(codec="fp32", where="disk", path=tmp_path / "s")
    fm = freezert.wrap(yolo, freeze=6, cache=cache).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        cache.flush()
        slab = next(iter(cache._index.rows.values())).slab  # the one slab: fp32 records of one layout
        pos = slab.rec + 64  # one payload byte of the second record
        os.pwrite(slab.fd, bytes([os.pread(slab.fd, 1, pos)[0] ^ 0x5A]), pos)
        fm.set_freeze(10)
        ref = copy.deepcopy(yolo).eval()
        out = fm(x)
    st = cache.stats()
    assert st["corrupt"] == 1 and st["extended"] == 2 and st["misses"] == 3 + 1  # the bad row recomputed
    assert_outputs_close(out, ref(x), 1e-4)


def test_progressive_schedule_with_cache_grows_the_cut_and_keeps_rows(yolo):
    ref = copy.deepcopy(yolo).eval()
    n = len(freezert.wrap(copy.deepcopy(yolo), freeze=1).blocks)
    fm = freezert.wrap(yolo, freeze=Linear(freeze_start=0.0, freeze_level=0.5), cache="fp32").eval()
    data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    depths = []
    with torch.no_grad():
        for progress in (0.0, 0.2, 0.4, 1.0):
            fm.schedule.step(progress)
            depths.append(fm.prefix_length)
            for x in data:
                assert_outputs_close(fm(x), ref(x), 1e-4)
    assert depths == [0, int(0.1 * (n - 1)), int(0.2 * (n - 1)), int(0.5 * (n - 1))]
    st = fm.cache.stats()
    # filled once at the first non-empty prefix, then carried at each deeper cut: no sample recomputed
    assert st["misses"] == 4 and st["invalidations"] == 0 and st["extended"] == 4 * (len(set(depths[1:])) - 1)


def test_a_fixed_freeze_without_a_prefix_cannot_cache(yolo):
    fm = freezert.wrap(yolo, freeze=[3, 4], cache=True)
    with pytest.raises(CacheError, match="needs frozen blocks from block 0"):
        fm(torch.randn(1, 3, 64, 64))


@pytest.mark.cuda
def test_deeper_freeze_extends_a_device_tier_cache():
    model = pretrained_like(yolov5("n", nc=3)).cuda()
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=6, cache=freezert.FeatureCache("fp16", "cuda", budget="64MiB")).eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        fm(x)
        fm.set_freeze(10)
        out = fm(x)
    st = fm.cache.stats()
    assert st["extended"] == 4 and st["hits"] == 4 and st["rows_device"] == 4
    assert_outputs_close(out, ref(x), 2e-2)


@pytest.mark.cuda
def test_deeper_freeze_after_moving_to_cuda_converts_on_the_new_device(yolo):
    ref = copy.deepcopy(yolo).cuda().eval()
    fm = freezert.wrap(yolo, freeze=6, cache=freezert.FeatureCache("fp32", "host")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fm(x)  # rows stored from a CPU run
        fm.cuda()
        fm.set_freeze(10)
        out = fm(x.cuda())  # the same content on CUDA: the stored rows are carried, decoded on CUDA
    assert fm.cache.stats()["extended"] == 3 and fm.cache.stats()["hits"] == 3
    assert_outputs_close(out, ref(x.cuda()), 1e-3)
