"""freezert.cache.augment and loop: exact finite augmentation served from the cache, feature-space flip and shift,
and prefetching over a DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import freezert
from freezert import FreezeError
from freezert.cache import FeatureCache, FeatureFlip, FeatureShift, FiniteAugment, prefetching


def _identity(x):
    return x


def _hflip(x):
    return x.flip(-1)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()


def _data(n: int = 24):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 3)


def _call(b):
    return (b[0],), {"cache_ids": b[2], "cache_aug": b[3]}


def test_finite_augment_draws_per_sample_and_epoch_deterministically():
    ds = FiniteAugment(_data(), [_identity, _hflip], seed=3)
    x0, y0 = ds.dataset[5]
    x, y, i, v = ds[5]
    assert i == 5 and v == ds.variant(5) and y == y0
    assert torch.equal(x, _hflip(x0) if v else x0)
    per_epoch = [[ds.variant(i, e) for i in range(len(ds))] for e in range(4)]
    assert per_epoch == [[ds.variant(i, e) for i in range(len(ds))] for e in range(4)]  # no RNG state read
    assert len({tuple(p) for p in per_epoch}) == 4  # each epoch draws anew
    assert per_epoch != [[FiniteAugment(_data(), [_identity, _hflip], seed=4).variant(i, e) for i in range(24)]
                         for e in range(4)]  # fmt: skip
    ds.set_epoch(2)
    assert [ds[i][3] for i in range(len(ds))] == per_epoch[2]
    # weights: the share of each variant over many (index, epoch) draws
    w = FiniteAugment(range(4000), [_identity, _hflip, _identity], weights=[0.7, 0.2, 0.1])
    counts = torch.bincount(torch.tensor([w.variant(i) for i in range(4000)]), minlength=3) / 4000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03), counts
    # a plain (non-tuple) item gets the variant applied and the index and id appended
    assert FiniteAugment([torch.ones(2)], [lambda t: t * 2])[0][0].tolist() == [2.0, 2.0]


def test_finite_augment_epoch_reaches_persistent_workers():
    ds = FiniteAugment(_data(12), [_identity, _hflip], seed=0)
    loader = DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        got = torch.cat([b[3] for b in loader]).tolist()
        assert got == [ds.variant(i, epoch) for i in range(12)]


def test_finite_augment_with_torchvision_v2_moves_boxes_with_the_image():
    v2 = pytest.importorskip("torchvision.transforms.v2")
    tv = pytest.importorskip("torchvision.tv_tensors")
    img = tv.Image(torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6))
    boxes = tv.BoundingBoxes(torch.tensor([[0.0, 0.0, 2.0, 1.0]]), format="XYXY", canvas_size=(4, 6))
    ds = FiniteAugment([(img, {"boxes": boxes})], [v2.Identity(), v2.RandomHorizontalFlip(p=1.0)], on="sample")
    e = next(e for e in range(20) if ds.variant(0, e) == 1)
    ds.set_epoch(e)
    x, target, i, v = ds[0]
    assert (i, v) == (0, 1)
    assert torch.equal(x, img.flip(-1))
    assert target["boxes"].tolist() == [[4.0, 0.0, 6.0, 1.0]]


def test_finite_augment_rejects_what_it_cannot_draw():
    with pytest.raises(FreezeError, match="variants="):
        FiniteAugment(_data(), [])
    with pytest.raises(FreezeError, match="weights="):
        FiniteAugment(_data(), [_identity, _hflip], weights=[1.0])
    with pytest.raises(FreezeError, match="on="):
        FiniteAugment(_data(), [_identity], on="target")


def test_each_variant_is_computed_once_and_served_exactly_after():
    ds = FiniteAugment(_data(), [_identity, _hflip], seed=1)
    m = _model()
    ref = freezert.wrap(_model(), freeze=4)  # the same weights, no cache
    fm = freezert.wrap(m, freeze=4, cache=FeatureCache("fp32"))
    seen: set[tuple[int, int]] = set()
    expected_hits = 0
    loader = DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    for epoch in range(4):
        ds.set_epoch(epoch)
        for x, _, idx, aug in loader:
            pairs = list(zip(idx.tolist(), aug.tolist()))
            expected_hits += sum(p in seen for p in pairs)
            seen.update(pairs)
            with torch.no_grad():
                torch.testing.assert_close(fm(x, cache_ids=idx, cache_aug=aug), ref(x), rtol=1e-6, atol=1e-7)
    st = fm.cache.stats()
    assert st["hits"] == expected_hits > 0
    assert st["misses"] == len(seen) and st["stale"] == 0  # one row per (sample, variant), never a changed input
    assert len(seen) < 4 * len(ds)


def test_feature_flip_flips_each_drawn_sample_in_every_map_alike():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(6, 2, 4, 4), torch.randn(6, 3, 2, 2), torch.randn(6, 5)
    out = FeatureFlip(0.5, generator=torch.Generator().manual_seed(1))({0: a, 1: b, 2: c})
    flipped = [not torch.equal(out[0][i], a[i]) for i in range(6)]
    assert 0 < sum(flipped) < 6
    for i in range(6):
        assert torch.equal(out[0][i], a[i].flip(-1) if flipped[i] else a[i])
        assert torch.equal(out[1][i], b[i].flip(-1) if flipped[i] else b[i])
    assert out[2] is c  # not a map
    keep = {0: a.clone()}
    assert FeatureFlip(0.0)(keep)[0] is keep[0] and torch.equal(FeatureFlip(1.0, generator=g)(keep)[0], a.flip(-1))
    assert torch.equal(keep[0], a)  # out of place: a served cache row is never written
    with pytest.raises(FreezeError, match="probability"):
        FeatureFlip(1.5)


def test_feature_flip_through_wrap_applies_on_training_calls_only():
    m = _model()
    fm = freezert.wrap(m, freeze=4, cache="fp32", feature_aug=FeatureFlip(1.0))
    x = _data()[:][0][:6]
    head = nn.Sequential(*list(_model())[4:])
    prefix = nn.Sequential(*list(_model())[:4])
    with torch.no_grad():
        torch.testing.assert_close(fm(x), head(prefix(x).flip(-1)))  # training mode, computed
        torch.testing.assert_close(fm(x), head(prefix(x).flip(-1)))  # training mode, served from the cache
        assert fm.cache.stats()["hits"] == 6
        fm.eval()
        torch.testing.assert_close(fm(x), head(prefix(x)))


def test_feature_shift_equals_shifting_the_input_by_the_stride_inside():
    """A stride-2 conv prefix: the input moved by 2 px per cell gives the features moved by one cell, except where
    the border's zeros reached."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1, stride=2).double()
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    moved = torch.zeros_like(x)
    moved[..., 4:, 2:] = x[..., :-4, :-2]  # (dy, dx) = (2, 1) cells of stride 2
    with torch.no_grad():
        f, f_moved = conv(x), conv(moved)
    fine = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    seed = next(s for s in range(500) if _drawn(2, s) == [2, 1])
    out = FeatureShift(max_cells=2, p=1.0, generator=torch.Generator().manual_seed(seed))({3: f, 1: fine})
    assert torch.equal(out[3][..., 3:, 2:], f_moved[..., 3:, 2:])  # interior cells: exact
    assert torch.equal(out[1][..., 4:, 2:], fine[..., :-4, :-2]) and not out[1][..., :4, :].any()  # 2 px per cell
    with pytest.raises(FreezeError, match="whole multiple"):
        FeatureShift(p=1.0)({0: torch.zeros(1, 1, 6, 6), 1: torch.zeros(1, 1, 4, 4)})
    with pytest.raises(FreezeError, match="max_cells"):
        FeatureShift(max_cells=0)


def _drawn(max_cells: int, seed: int) -> list[int]:
    """The (dy, dx) a FeatureShift with a generator seeded ``seed`` draws for a batch of one."""
    g = torch.Generator().manual_seed(seed)
    torch.rand(1, generator=g)  # the p draw
    return torch.randint(-max_cells, max_cells + 1, (1, 2), generator=g)[0].tolist()


def test_prefetching_serves_the_next_batch_from_the_prefetch(tmp_path):
    ds = FiniteAugment(_data(), [_identity], seed=0)
    fm = freezert.wrap(_model(), freeze=4, cache=FeatureCache("fp32", "disk", path=tmp_path / "store"))
    ref = freezert.wrap(_model(), freeze=4)
    loader = DataLoader(ds, batch_size=6)
    for _ in range(2):
        outs = []
        for b in prefetching(loader, fm, _call):
            outs.append(fm(b[0], cache_ids=b[2], cache_aug=b[3]))
            outs[-1].sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(torch.cat(outs), ref(ds.dataset[:][0]), rtol=1e-6, atol=1e-7)
    st = fm.cache.stats()
    assert st["hits"] == 24 and st["prefetched"] == 18  # epoch 2: every batch after the first came prefetched
    assert not fm._forward_hooks  # the hook leaves with the loop
    assert list(prefetching([], fm)) == []
    with pytest.raises(FreezeError, match="FrozenModel"):
        next(prefetching(loader, nn.Linear(2, 2)))
    batches = prefetching([{"x": 1}, {"x": 2}], fm)
    next(batches)
    with pytest.raises(FreezeError, match="inputs="):  # said at the model's call, where the next batch is read
        fm(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    batches.close()
    assert not fm._forward_hooks
