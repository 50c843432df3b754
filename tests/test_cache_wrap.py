"""The feature cache inside wrap(): hits equal fresh results, later epochs skip the backbone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import freezert
from freezert import CacheError
from freezert.models import transformer_encoder, yolov5

from ._ref import assert_outputs_close, pretrained_like

pytest.importorskip("freezert.cache")


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.fixture()
def yolo():
    return pretrained_like(yolov5("n", nc=3))


def test_second_epoch_hits_and_skips_the_backbone(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache="fp16").eval()
    data = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        epoch1 = [fm(x) for x in data]
        f_miss = _flops(lambda: fm(torch.randn(2, 3, 64, 64)))
        st = fm.cache.stats()
        assert st["hits"] == 0 and st["misses"] >= 6
        f_hit = _flops(lambda: fm(data[0]))
        epoch2 = [fm(x) for x in data]
        # the trainable part alone, on the boundary
        y = fm.segment.run(data[0])
        f_tail = _flops(lambda: fm._tail.blocks_after(dict(y)))
    assert f_hit == f_tail < 0.8 * f_miss
    assert fm.cache.stats()["hits"] >= 8
    for a, b, x in zip(epoch1, epoch2, data):
        assert_outputs_close(a, ref(x), 1e-4)  # misses are exact (fresh)
        assert_outputs_close(b, ref(x), 2e-2)  # hits are within fp16 of the fresh result


def test_changed_input_misses_and_is_right(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        x2 = x.clone()
        x2[1, 0, 5, 5] += 0.25  # one pixel of one sample: that sample is a miss
        before = fm.cache.stats()["misses"]
        out = fm(x2)
        assert fm.cache.stats()["misses"] == before + 1
        assert_outputs_close(out, ref(x2), 2e-2)


def test_mixed_batch_comes_back_in_order(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").eval()
    a, b = torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(a)
        mixed = torch.cat([b[:1], a[2:], b[1:], a[:1]])  # miss, hit, miss, hit
        out = fm(mixed)
        assert_outputs_close(out, ref(mixed), 1e-4)


def test_explicit_ids_and_their_shape(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        fm(x, cache_ids=torch.arange(4))
        out = fm(x[[3, 1]], cache_ids=[3, 1])
        assert fm.cache.stats()["hits"] == 2
        assert_outputs_close(out, ref(x[[3, 1]]), 1e-4)
        big = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        # the same ids at another size: other rows, never the 64 px ones (a served row would be off by its own
        # size; float32 BatchNorm folding alone reaches ~1e-4 of the largest output at 96 px on some inputs)
        assert_outputs_close(fm(big, cache_ids=[0, 1]), ref(big), 1e-3)
        assert fm.cache.stats()["hits"] == 2
        assert_outputs_close(fm(x[:2], cache_ids=[0, 1]), ref(x[:2]), 1e-4)
        assert fm.cache.stats()["hits"] == 4
        with pytest.raises(CacheError, match="one integer id per sample"):
            fm(x, cache_ids=[0, 1])


@pytest.mark.parametrize("mode", ["driven", "swap"])
def test_alternating_input_sizes_all_hit_from_the_second_epoch_in_one_store(yolo, mode):
    if mode == "driven":  # multi-scale YOLO: two image sizes
        model, sizes = yolo, [(2, 3, 64, 64), (2, 3, 96, 96)]
        data = [torch.randn(*s) for s in sizes * 2]
    else:  # bucketed sequence lengths through the model's own forward
        model = transformer_encoder(vocab_size=50, d_model=32, nhead=2, num_layers=4, dim_ff=64, num_classes=3)
        data = [torch.randint(0, 50, (2, n)) for n in (7, 11, 7, 11)]
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=3, cache="fp32").eval()
    with torch.no_grad():
        for x in data:
            fm(x)
        st = fm.cache.stats()
        assert st["hits"] == 0 and st["misses"] == 8 and st["invalidations"] == 0
        for x in data:  # epoch 2: every batch of either size is served (1e-3: folded BatchNorm rounding at 96 px)
            assert_outputs_close(fm(x), ref(x), 1e-3)
        st = fm.cache.stats()
        assert st["hits"] == 8 and st["misses"] == 8 and st["invalidations"] == 0 and len(fm.cache) == 8


def test_augmentation_parameters_key_each_variant(yolo):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").eval()
    x = torch.randn(4, 3, 64, 64)
    ids = torch.arange(4)
    flip = torch.tensor([0, 1, 0, 1])
    variant = torch.where(flip.bool().view(-1, 1, 1, 1), x.flip(-1), x)  # a flip drawn per sample
    with torch.no_grad():
        for _ in range(2):  # two epochs
            for aug in (flip, 1 - flip):
                xs = torch.where(aug.bool().view(-1, 1, 1, 1), x.flip(-1), x)
                assert_outputs_close(fm(xs, cache_ids=ids, cache_aug=aug), ref(xs), 1e-4)
        st = fm.cache.stats()
        assert st["misses"] == 8 and st["hits"] == 8 and st["stale"] == 0  # each (sample, flip) computed once
        fm(variant, cache_ids=ids, cache_aug=[(int(f), "h") for f in flip])  # plain values key as well
        with pytest.raises(CacheError, match="cache_aug holds a object"):
            fm(x, cache_ids=ids, cache_aug=[object()] * 4)
        with pytest.raises(CacheError, match="one row per sample"):
            fm(x, cache_ids=ids, cache_aug=torch.zeros(3))


def test_prefetch_reads_the_next_batch_ahead_and_serves_the_same_rows(tmp_path):
    model = transformer_encoder(vocab_size=50, d_model=32, nhead=2, num_layers=4, dim_ff=64, num_classes=3).eval()
    ref = copy.deepcopy(model)
    cache = freezert.FeatureCache("fp32", where="disk", path=tmp_path / "store")
    fm = freezert.wrap(model, freeze=3, cache=cache)
    data = [torch.randint(0, 50, (3, 9)) for _ in range(3)]
    with torch.no_grad():
        assert not fm.prefetch(data[0])  # nothing stored yet for this shape: nothing to start
        for x in data:
            fm(x)
        for i, x in enumerate(data):
            out = fm(x)
            if i + 1 < len(data):
                assert fm.prefetch(data[i + 1])  # the next batch's rows, read on a background thread
            assert_outputs_close(out, ref(x), 1e-5)
    st = fm.cache.stats()
    assert st["hits"] == 9 and st["prefetched"] == 6


def test_weights_change_invalidates(yolo):
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        fm(x)
        assert fm.cache.stats()["hits"] == 2
        other = pretrained_like(yolov5("n", nc=3), seed=9)
        fm.load_state_dict(other.state_dict())
        out = fm(x)
        assert_outputs_close(out, other.eval()(x), 1e-4)
        assert fm.cache.stats()["invalidations"] >= 1
        fm.set_freeze(8)  # a shallower cut cannot be made from the stored boundary: a different cache
        out = fm(x)
        assert fm.cache.stats()["invalidations"] >= 2 and fm.cache.stats()["extended"] == 0
        assert_outputs_close(out, other.eval()(x), 1e-4)


def test_training_with_cache_matches_training_without(yolo):
    plain = copy.deepcopy(yolo)
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").train()
    fm_ref = freezert.wrap(plain, freeze=10).train()
    data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    opts = [torch.optim.SGD(m.trainable_parameters(), lr=1e-2) for m in (fm, fm_ref)]
    for _ in range(2):  # the second epoch is served from the cache
        for x in data:
            for m, opt in zip((fm, fm_ref), opts):
                out = m(x)
                loss = sum(o.float().pow(2).mean() for o in out)
                opt.zero_grad()
                loss.backward()
                opt.step()
    assert fm.cache.stats()["hits"] == 4
    for p, q in zip(fm.trainable_parameters(), fm_ref.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_swap_mode_encoder_replays_boundary():
    model = transformer_encoder(vocab_size=101, d_model=48, nhead=4, num_layers=6, dim_ff=72, num_classes=5)
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=4, cache="fp32").eval()
    ids = torch.randint(0, 101, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, 8:] = 0
    with torch.no_grad():
        fm(ids, attention_mask=mask)
        f_hit = _flops(lambda: fm(ids, attention_mask=mask))
        f_full = _flops(lambda: ref(ids, attention_mask=mask))
        out = fm(ids, attention_mask=mask)
        assert_outputs_close(out, ref(ids, attention_mask=mask), 1e-4)
        mask2 = mask.clone()
        mask2[1, 10:] = 0  # the mask is part of the key: a miss, and right
        assert_outputs_close(fm(ids, attention_mask=mask2), ref(ids, attention_mask=mask2), 1e-4)
    assert fm.cache.stats()["hits"] >= 6
    assert f_hit < 0.5 * f_full


def test_cache_errors(yolo):
    with pytest.raises(CacheError, match="bn='train'"):
        freezert.wrap(yolo, freeze=10, bn="train", cache=True)
    with pytest.raises(CacheError, match="not understood"):
        freezert.wrap(yolo, freeze=10, cache=3)
    fm = freezert.wrap(yolo, freeze=10)
    with pytest.raises(CacheError, match="no cache"):
        fm(torch.randn(1, 3, 64, 64), cache_ids=[0])
    fm0 = freezert.wrap(copy.deepcopy(yolo), freeze=[3], cache=True)
    with pytest.raises(CacheError, match="frozen prefix"):
        fm0(torch.randn(1, 3, 64, 64))


_DISK_RUN = """
import sys, json, torch, freezert
from freezert.models import yolov5
torch.manual_seed(0)
model = yolov5("n", nc=3).eval()
fm = freezert.wrap(model, freeze=10, cache=freezert.FeatureCache(codec="fp16", where="disk", path=sys.argv[1]))
g = torch.Generator().manual_seed(5)
data = torch.rand(6, 3, 64, 64, generator=g)
with torch.no_grad():
    out = fm(data, cache_ids=torch.arange(6))
fm.cache.flush()
torch.save(out[0], sys.argv[2])
print(json.dumps({k: fm.cache.stats()[k] for k in ("hits", "misses")}))
"""


def test_disk_tier_persists_across_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = []
    for i in range(2):
        p = subprocess.run(
            [sys.executable, "-c", _DISK_RUN, str(tmp_path / "store"), str(tmp_path / f"out{i}.pt")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"hits": 0, "misses": 6}
    assert runs[1] == {"hits": 6, "misses": 0}  # the second process never ran the backbone
    first, second = torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt")
    assert (first - second).abs().max() / first.abs().max() < 2e-2


def test_offload_is_a_no_op_on_cpu(yolo):
    fm = freezert.wrap(yolo, freeze=10, cache="fp32", offload_frozen=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        fm(x)
    assert fm.offloads == 0 and all(p.device.type == "cpu" for p in fm.frozen_parameters())


@pytest.mark.cuda
def test_offload_frozen_weights_and_bring_them_back():
    model = pretrained_like(yolov5("n", nc=3)).cuda()
    ref = copy.deepcopy(model).eval()
    fm = freezert.wrap(model, freeze=10, cache="fp32", offload_frozen=True).eval()
    x, x2 = torch.randn(2, 3, 64, 64, device="cuda"), torch.randn(2, 3, 64, 64, device="cuda")
    frozen = fm.frozen_parameters()
    with torch.no_grad():
        fm(x)
        assert all(p.is_cuda for p in frozen)
        out = fm(x)  # a full hit: the frozen weights leave the GPU
        assert fm.offloads == 1 and all(p.device.type == "cpu" for p in frozen)
        assert_outputs_close(out, ref(x), 1e-4)
        out2 = fm(x2)  # a miss brings them back
        assert all(p.is_cuda for p in frozen)
        assert_outputs_close(out2, ref(x2), 1e-4)
    assert fm.frozen_parameters()[0] is frozen[0]


def test_records_that_fail_verification_in_fetch_are_recomputed(yolo, monkeypatch):
    ref = copy.deepcopy(yolo).eval()
    fm = freezert.wrap(yolo, freeze=10, cache="fp32").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        real_fetch = fm.cache.fetch
        calls = []

        def flaky_fetch(keys, device, *, layout=None, content=None):
            calls.append(len(keys))
            if len(calls) == 1:  # as if the stored records went bad: fetch drops them and reports misses
                for k in keys.tolist():
                    fm.cache._index.drop((layout, k), corrupt=True)
            return real_fetch(keys, device, layout=layout, content=content)

        monkeypatch.setattr(fm.cache, "fetch", flaky_fetch)
        out = fm(x)
    st = fm.cache.stats()
    assert calls == [2] and st["hits"] == 0 and st["corrupt"] == 2  # recomputed, never served from a bad record
    assert len(fm.cache) == 2  # and stored again
    assert_outputs_close(out, ref(x), 1e-4)
