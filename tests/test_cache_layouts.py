"""The cache where people train (issue 17), in one process: one store holding rows of many input shapes, codec
ladders by depth, bytes per row per tier, a disk that fills up, and prefetching the next batch's disk rows."""

from __future__ import annotations

import errno
import os
import warnings

import pytest
import torch

from freezert import CacheError
from freezert.cache import FeatureCache, Layout, fingerprint_of

FP = "0123456789abcdef"
SMALL = [((4, 4, 4), torch.float32)]  # a boundary at one input size ...
LARGE = [((4, 6, 6), torch.float32)]  # ... and at a larger one (multi-scale training, rectangular batches)


def _rows(ids, layout, version: int = 0) -> list[torch.Tensor]:
    """A deterministic function of (sample id, layout, version): what a frozen prefix would compute."""
    (shape, _), n = layout[0], len(ids)
    base = torch.tensor(ids, dtype=torch.float32).view(n, *[1] * len(shape))
    return [base + torch.linspace(-1, 1, int(torch.tensor(shape).prod())).view(shape) * (1 + version)]


def _bound(codec="fp32", where="host", budget="1MiB", path=None, **kw) -> FeatureCache:
    c = FeatureCache(codec, where, budget, path, **kw)
    c.bind(FP, None, "cpu")
    return c


def _lru(cache: FeatureCache) -> list[tuple[str, int]]:
    return [(lay.tag, k) for lay, k in cache._index.lru()]


# ---------------------------------------------------------------------------------------------------------------
# 1. one store, many layouts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["host", "disk"])
def test_alternating_input_sizes_hit_from_the_second_epoch_in_one_store(where, tmp_path):
    c = _bound(where=where, path=tmp_path / "s" if where == "disk" else None)
    small, large = c.layout_for(SMALL, tag="32x32"), c.layout_for(LARGE, tag="48x48")
    batches = [(list(range(i, i + 4)), small if i % 8 == 0 else large) for i in range(0, 32, 4)]  # alternating
    per_epoch = []
    for _ in range(3):
        hits = 0
        for ids, lay in batches:
            hit, rows = c.fetch(ids, "cpu", layout=lay)
            hits += int(hit.sum())
            want = _rows([i for i, h in zip(ids, hit.tolist()) if h], lay.tensors)
            assert torch.equal(rows[0], want[0])
            miss = [i for i, h in zip(ids, hit.tolist()) if not h]
            c.put(miss, _rows(miss, lay.tensors), layout=lay)
        per_epoch.append(hits)
    assert per_epoch == [0, 32, 32]
    st = c.stats()
    assert st["invalidations"] == 0 and len(c) == 32 and st["stores"] == 32
    assert sorted((x["shapes"], x["tag"], x["rows"]) for x in st["layouts"]) == [
        ([[4, 4, 4]], "32x32", 16),
        ([[4, 6, 6]], "48x48", 16),
    ]


def test_a_key_stored_under_another_layout_is_a_miss_and_both_rows_live():
    c = _bound()
    small, large = c.layout_for(SMALL, tag="32"), c.layout_for(LARGE, tag="48")
    c.put([7], _rows([7], SMALL), layout=small)
    assert not c.fetch([7], "cpu", layout=large)[0].any()  # the key itself carries its layout: never crossed
    c.put([7], _rows([7], LARGE, version=1), layout=large)
    assert torch.equal(c.fetch([7], "cpu", layout=small)[1][0], _rows([7], SMALL)[0]) and len(c) == 2
    # the same boundary shapes under another tag (inputs whose boundaries coincide) are another layout too
    pooled = c.layout_for(SMALL, tag="64")
    assert pooled is not small and not c.fetch([7], "cpu", layout=pooled)[0].any()
    assert c.layout_for(SMALL, tag="32") is small  # one handle per layout
    with pytest.raises(CacheError, match="tag=5 is not a str"):
        c.layout_for(SMALL, tag=5)
    with pytest.raises(CacheError, match="bound without a layout; pass layout="):
        c.fetch([7], "cpu")


def test_budgets_are_shared_and_lru_evicts_across_layouts():
    small_b, large_b = 4 * 4 * 4 * 2, 4 * 6 * 6 * 2  # fp16 bytes of one row: 128 and 288
    c = _bound("fp16", budget=2 * small_b + 2 * large_b)
    small, large = c.layout_for(SMALL, tag="s"), c.layout_for(LARGE, tag="l")
    c.put([0, 1], _rows([0, 1], SMALL), layout=small)
    c.put([0, 1], _rows([0, 1], LARGE), layout=large)
    assert c.stats()["bytes"] == c.stats()["tiers"]["host"]["budget"]
    c.fetch([0], "cpu", layout=small)  # small row 0 becomes the most recent
    c.put([2], _rows([2], LARGE), layout=large)  # needs 288 bytes: evicts small 1 (128), then large 0 (288)
    st = c.stats()
    assert st["evictions"] == 2 and st["evicted_bytes"] == small_b + large_b
    assert st["bytes"] <= st["tiers"]["host"]["budget"]
    assert _lru(c) == [("l", 1), ("s", 0), ("l", 2)]
    assert st["tiers"]["host"]["bytes_per_row"] == pytest.approx((small_b + 2 * large_b) / 3)


def test_the_wrapper_contract_without_a_layout_still_works():
    c = FeatureCache("fp16", "host", "1MiB")
    c.bind(FP, SMALL, "cpu")  # bind(fingerprint, layout, device): the layout is the default of fetch/put
    c.put([1, 2], _rows([1, 2], SMALL))
    assert c.fetch([2, 3], "cpu")[0].tolist() == [True, False] and c.layout == SMALL
    c.bind(FP, LARGE, "cpu")  # the same setup, another shape: a second layout, nothing invalidated
    assert c.stats()["invalidations"] == 0 and not c.fetch([1], "cpu")[0].any()
    assert c.fetch([1], "cpu", layout=c.layout_for(SMALL))[0].all()
    assert isinstance(c.layout_for(SMALL), Layout)


# ---------------------------------------------------------------------------------------------------------------
# 4. codec ladders by depth; bytes per row
# ---------------------------------------------------------------------------------------------------------------
def test_progressive_codec_tightens_with_depth():
    c = FeatureCache("progressive", "host", "1MiB")
    c.bind(FP, SMALL, "cpu", depth=0.25)  # a shallow cut: fp16
    c.put([1], _rows([1], SMALL))
    shallow = c.stats()["tiers"]["host"]["bytes_per_row"]
    c.bind("fedcba9876543210", SMALL, "cpu", depth=0.75)  # past half the blocks: fp8
    c.put([1], _rows([1], SMALL))
    st = c.stats()
    assert (shallow, st["tiers"]["host"]["bytes_per_row"]) == (64 * 2, 64 * 1 + 4)
    assert [x["codec"] for x in st["layouts"]] == ["fp8"] and st["codec"] == "progressive"
    got = c.fetch([1], "cpu")[1][0]
    want = _rows([1], SMALL)[0]
    assert (got - want).abs().max() <= want.abs().max() * 2**-4  # fp8's stated bound
    d = FeatureCache("fp32,bf16@0.3,fp8@0.9", "host", "1MiB")
    d.bind(FP, SMALL, "cpu", depth=0.5)
    d.put([1], _rows([1], SMALL))
    assert d.stats()["layouts"][0]["codec"] == "bf16"
    for bad in ("fp16,fp8", "fp8@0.5", "fp16,fp8@0.5,bf16@0.4", "fp16,int4@0.5", "fp16,fp8@2"):
        with pytest.raises(CacheError, match="ladder like 'fp16,fp8@0.5'"):
            FeatureCache(bad)


def test_the_fingerprint_of_a_ladder_reads_every_codec_in_it():
    w = [torch.randn(3, 3)]
    a = fingerprint_of(w, codec="progressive")
    assert a == fingerprint_of(w, codec="fp16,fp8@0.5") and a != fingerprint_of(w, codec="fp16,fp8@0.6")
    assert a != fingerprint_of(w, codec="fp16")


# ---------------------------------------------------------------------------------------------------------------
# 5. a disk that fills up: said once, rows not stored, nothing stored before lost
# ---------------------------------------------------------------------------------------------------------------
def test_a_full_disk_skips_rows_with_one_warning_and_keeps_what_was_stored(tmp_path, monkeypatch):
    c = _bound(where="disk", path=tmp_path / "s")
    lay = c.layout_for(SMALL)
    c.put(range(4), _rows(range(4), SMALL), layout=lay)
    real = os.pwrite

    def full(fd, data, offset):  # the OS boundary: what pwrite does on a full filesystem
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.warns(UserWarning, match=r"writing .* to '.*slab_.*\.bin' failed \(No space left on device\).*kept"):
        c.put(range(4, 8), _rows(range(4, 8), SMALL), layout=lay)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        c.put(range(8, 10), _rows(range(8, 10), SMALL), layout=lay)
    st = c.stats()
    assert st["write_errors"] == 6 and st["skipped"] == 6 and len(c) == 4 and st["rows_disk"] == 4
    hit, rows = c.fetch(range(10), "cpu", layout=lay)
    assert hit.tolist() == [True] * 4 + [False] * 6 and torch.equal(rows[0], _rows(range(4), SMALL)[0])
    monkeypatch.setattr(os, "pwrite", real)  # space freed: the next put stores again, in the slots left free
    c.put(range(4, 8), _rows(range(4, 8), SMALL), layout=lay)
    assert c.fetch(range(8), "cpu", layout=lay)[0].all() and os.path.getsize(next(_slabs(tmp_path / "s"))) == 8 * 280


def test_an_index_that_cannot_be_written_keeps_the_previous_one(tmp_path, monkeypatch):
    c = _bound(where="disk", path=tmp_path / "s")
    lay = c.layout_for(SMALL)
    c.put(range(3), _rows(range(3), SMALL), layout=lay)
    c.flush()
    c.put(range(3, 6), _rows(range(3, 6), SMALL), layout=lay)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.warns(UserWarning, match=r"writing the cache index .* failed \(No space left on device\)"):
        c.close()
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path / "s") if ".tmp" in n]  # the temporary index was removed
    d = _bound(where="disk", path=tmp_path / "s")
    assert d.fetch(range(6), "cpu", layout=d.layout_for(SMALL))[0].tolist() == [True] * 3 + [False] * 3


def _slabs(path):
    return (p for p in path.iterdir() if p.name.startswith("slab_"))


# ---------------------------------------------------------------------------------------------------------------
# 3. prefetch: the next batch's disk rows on a background thread; verified rows only; never stale
# ---------------------------------------------------------------------------------------------------------------
def test_prefetched_rows_serve_the_next_fetch(tmp_path):
    c = _bound("fp16", where="disk", path=tmp_path / "s")
    lay = c.layout_for(SMALL)
    c.put(range(8), _rows(range(8), SMALL), layout=lay)
    plain = c.fetch([3, 1, 9], "cpu", layout=lay)
    c.prefetch([3, 1, 9], "cpu", layout=lay)
    got = c.fetch([3, 1, 9], "cpu", layout=lay)
    assert got[0].tolist() == [True, True, False] and torch.equal(got[1][0], plain[1][0])
    assert c.stats()["prefetched"] == 2
    c.prefetch([0, 2], "cpu", layout=lay)  # a fetch of other keys reads them itself
    assert c.fetch([4], "cpu", layout=lay)[0].all() and c.stats()["prefetched"] == 2


def test_a_corrupt_record_is_a_miss_even_when_prefetched(tmp_path):
    c = _bound(where="disk", path=tmp_path / "s")
    lay = c.layout_for(SMALL)
    c.put(range(4), _rows(range(4), SMALL), layout=lay)
    e = c._index.get((lay, 2))
    os.pwrite(e.slab.fd, b"\xff", e.slot * e.slab.rec + 40)
    c.prefetch(range(4), "cpu", layout=lay)
    hit, rows = c.fetch(range(4), "cpu", layout=lay)
    assert hit.tolist() == [True, True, False, True] and c.stats()["corrupt"] == 1
    assert torch.equal(rows[0], _rows([0, 1, 3], SMALL)[0]) and c.stats()["prefetched"] == 3


def test_no_stale_prefetched_row_after_a_put_or_an_eviction(tmp_path):
    rec = 24 + 64 * 4  # one fp32 record of SMALL
    c = _bound(where="disk", budget=4 * rec, path=tmp_path / "s")
    lay = c.layout_for(SMALL)
    c.put(range(4), _rows(range(4), SMALL), layout=lay)
    c.prefetch(range(4), "cpu", layout=lay)
    c.put([1], _rows([1], SMALL, version=1), layout=lay)  # replaced after the prefetch started
    c.put([9], _rows([9], SMALL), layout=lay)  # the store is full: evicts key 0 and takes its slot
    hit, rows = c.fetch([0, 1, 2, 9], "cpu", layout=lay)
    assert hit.tolist() == [False, True, True, True]
    assert torch.equal(rows[0][0], _rows([1], SMALL, version=1)[0][0])  # the new row, not the prefetched one
    assert torch.equal(rows[0][2], _rows([9], SMALL)[0][0]) and c.stats()["prefetched"] == 1  # only key 2 was
    # a clear() or close() in between waits for the thread and drops what it read
    c.prefetch([2, 9], "cpu", layout=lay)
    c.clear()
    assert not c.fetch([2, 9], "cpu", layout=lay)[0].any()
    c.prefetch([2], "cpu", layout=lay)
    c.close()
