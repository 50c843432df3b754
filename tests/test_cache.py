"""FeatureCache storage: codecs and their error bounds, tiers, budgets and eviction, disk persistence,
corruption, invalidation, save/load. CUDA paths (device tier, GPU reading pinned host rows) are marked cuda."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from freezert import CacheError
from freezert.cache import FeatureCache, fingerprint_of

LAYOUT = [((3, 5), torch.float32), ((7,), torch.float32)]  # a sample's boundary: two tensors, 22 values
FP = "0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(n: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) * scale for s, _ in LAYOUT]


def _row_bytes(codec: str) -> int:
    return 22 * {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}[codec] + (8 if codec == "fp8" else 0)


def _cache(codec="fp16", where="host", budget="1MiB", path=None, **kw) -> FeatureCache:
    c = FeatureCache(codec, where, budget, path, **kw)
    c.bind(FP, LAYOUT, torch.device("cpu"))
    return c


def _hit(cache: FeatureCache, keys) -> torch.Tensor:
    """The hit mask of one fetch (its decoded rows dropped)."""
    return cache.fetch(keys, "cpu")[0]


def _got(cache: FeatureCache, keys, device="cpu") -> list[torch.Tensor]:
    """The rows of keys that must all be stored."""
    hit, rows = cache.fetch(keys, device)
    assert hit.all(), f"keys {torch.as_tensor(keys)[~hit].tolist()} missed"
    return rows


def _flip(cache: FeatureCache, key: int, offset: int, mask: int) -> None:
    """XORs one byte of ``key``'s disk record (offset within the record) in its slab file."""
    entry = next(e for (_, k), e in cache._index.rows.items() if k == key)
    slab = entry.slab
    pos = entry.slot * slab.rec + offset
    b = os.pread(slab.fd, 1, pos)
    os.pwrite(slab.fd, bytes([b[0] ^ mask]), pos)


def _slab_file(store, codec: str):
    """The one slab file of ``codec`` in the store (one layout): slab_<layout id>_<codec>.bin."""
    (file,) = [p for p in store.iterdir() if p.name.startswith("slab_") and p.name.endswith(f"_{codec}.bin")]
    return file


def _slab(cache: FeatureCache, tier: int, codec: str):
    """The memory slab of the default layout's rows in ``codec`` in the cache's ``tier``-th tier."""
    return cache._index.tiers[tier].slabs[(cache._default, codec)]


def _lru(cache: FeatureCache) -> list[int]:
    return [k for _, k in cache._index.lru()]


def _take(rows: list[torch.Tensor], idx) -> list[torch.Tensor]:
    idx = torch.as_tensor(idx)
    return [r[idx] for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "fp8"])
def test_codec_error_bounds(codec, where, tmp_path):
    c = _cache(codec, where, path=tmp_path / "s" if where == "disk" else None)
    n = 37
    x = _rows(n, seed=3)
    x = [t * torch.logspace(-2, 2, n)[:, None].reshape(n, *([1] * (t.dim() - 1))) for t in x]  # mixed magnitudes
    if codec == "fp16":
        x = [t.half().float() for t in x]  # fp16-representable: stored exactly
    keys = torch.arange(n) * 3 + 1
    c.put(keys, x)
    perm = torch.randperm(n)
    assert _hit(c, keys[perm]).all()
    got = _got(c, keys[perm])
    for g, t in zip(got, x):
        t = t[perm]
        assert g.shape == t.shape and g.dtype == torch.float32
        err = (g - t).abs()
        if codec in ("fp32", "fp16"):
            assert torch.equal(g, t)
        elif codec == "bf16":
            assert (err <= t.abs() * 2**-8).all()
        else:  # fp8: per row, at most 2^-4 of that row's amax (row = all tensors of one sample, per tensor scale)
            amax = t.reshape(n, -1).abs().amax(1)
            assert (err.reshape(n, -1) <= amax[:, None] * 2**-4 + 1e-12).all()
            assert err.max() > 0  # it is lossy: the bound is not vacuous


def test_fp16_general_rounding_and_dtype_request():
    c = _cache("fp16")
    x = _rows(11, seed=5)
    c.put(torch.arange(11), x)
    got = _got(c, torch.arange(11))
    for g, t in zip(got, x):
        assert ((g - t).abs() <= t.abs() * 2**-11 + 2**-25).all()
    half = [t.half() for t in _got(c, torch.arange(11))]  # fp16 rows come back exactly
    assert torch.equal(half[0].float(), got[0])


def test_out_of_fp16_range_rows_escape_to_fp32():
    c = _cache("fp16")
    x = _rows(4, seed=1)
    x[0][2, 1, 3] = 1.0e6  # beyond fp16's 65504: sample 2 is stored as fp32, exactly
    x[1][3, 0] = -7.0e4
    c.put(torch.tensor([10, 11, 12, 13]), x)
    st = c.stats()
    assert st["escaped"] == 2 and st["stores"] == 4
    got = _got(c, torch.tensor([12, 13, 10]))
    assert got[0][0, 1, 3] == 1.0e6 and got[1][1, 0] == -7.0e4
    assert torch.equal(got[0][:2], x[0][[2, 3]]) and torch.equal(got[1][:2], x[1][[2, 3]])
    assert all(torch.isfinite(g).all() for g in got)
    assert st["bytes_host"] == 2 * _row_bytes("fp16") + 2 * _row_bytes("fp32")
    # bf16 has fp32's range: no escape needed
    b = _cache("bf16")
    b.put(torch.tensor([1]), _take(x, [2]))
    v = _got(b, torch.tensor([1]))[0][0, 1, 3]
    assert b.stats()["escaped"] == 0 and abs(v - 1.0e6) <= 1.0e6 * 2**-8


def test_nonfinite_rows_are_not_stored():
    c = _cache("fp16")
    x = _rows(3)
    x[1][1, 0] = float("nan")
    x[0][2, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="inf/NaN"):
        c.put(torch.tensor([1, 2, 3]), x)
    assert _hit(c, torch.tensor([1, 2, 3])).tolist() == [True, False, False]
    st = c.stats()
    assert st["nonfinite"] == 2 and st["skipped"] == 2 and len(c) == 1


# ---------------------------------------------------------------------------------------------------------------
# fetch / put
# ---------------------------------------------------------------------------------------------------------------
def test_mixed_hits_any_key_order_and_key_dtypes():
    c = _cache("fp32")
    x = _rows(6)
    keys = torch.tensor([5, -9, 2**62, 0, 77, -(2**63)])
    c.put(keys[[0, 2, 4]], _take(x, [0, 2, 4]))
    probe = torch.tensor([77, 5, 3, 2**62, -9, 77], dtype=torch.int64)
    hit, got = c.fetch(probe, "cpu")  # a repeated content key (77) is served twice
    assert hit.dtype == torch.bool and hit.device.type == "cpu"
    assert hit.tolist() == [True, True, False, True, False, True]
    want = _take(x, [4, 0, 2, 4])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert _hit(c, torch.tensor([5, 2], dtype=torch.int32)).tolist() == [True, False]
    assert _hit(c, [5, 2]).tolist() == [True, False] and _hit(c, range(4, 7)).tolist() == [False, True, False]
    with pytest.raises(CacheError, match="int64 keys"):
        _hit(c, torch.tensor([1.0]))


def test_put_checks_layout_and_updates_existing_rows():
    c = _cache("fp32")
    with pytest.raises(CacheError, match=r"shape \(2, 3, 6\).*\(2, 3, 5\)"):
        c.put(torch.tensor([1, 2]), [torch.zeros(2, 3, 6), torch.zeros(2, 7)])
    with pytest.raises(CacheError, match="1 boundary tensor"):
        c.put(torch.tensor([1]), [torch.zeros(1, 3, 5)])
    c.put(torch.tensor([1, 1]), _rows(2, seed=4))  # duplicate keys: the last row wins
    c.put(torch.tensor([1]), _rows(1, seed=9))  # a second put replaces the row
    assert len(c) == 1 and torch.equal(_got(c, torch.tensor([1]))[1], _rows(1, seed=9)[1])
    assert c.stats()["bytes_host"] == _row_bytes("fp32")


def test_unbound_cache_and_argument_validation():
    c = FeatureCache()
    assert not _hit(c, torch.tensor([1, 2])).any()
    with pytest.raises(CacheError, match="not bound"):
        c.put(torch.tensor([1]), _rows(1))
    for kw, match in [
        (dict(codec="int8"), "codec='int8'.*'fp16', 'bf16', 'fp8', 'fp32'"),
        (dict(where="gpu"), "where='gpu'.*'auto', 'cuda', 'host' or 'disk'"),
        (dict(budget="20 parsecs"), "budget='20 parsecs' is not a size.*'20GiB'"),
        (dict(budget=-1), "budget=-1"),
        (dict(budget=True), "budget=True"),
        (dict(host_budget="lots"), "host_budget='lots'"),
        (dict(where="host", path="/tmp/x"), "path='/tmp/x' is only used by the disk tier"),
        (dict(evict="fifo"), "evict='fifo'"),
    ]:
        with pytest.raises(CacheError, match=match):
            FeatureCache(**kw)
    with pytest.raises(CacheError, match="layout tensor|cannot be cached"):
        FeatureCache().bind(FP, [((3,), torch.int64)], "cpu")
    with pytest.raises(CacheError, match="CUDA memory"):
        FeatureCache(where="cuda").bind(FP, LAYOUT, "cpu")


def test_sample_larger_than_every_budget_is_refused():
    c = FeatureCache("fp16", "auto", budget=40, host_budget=40, disk_budget=60)
    with pytest.raises(
        CacheError,
        match=r"cannot hold a sample.*'fp16'.*device: 44 B per sample, budget 40 B, "
        r"host: 44 B per sample, budget 40 B, "
        r"disk: 72 B per sample, budget 60 B",
    ):
        c.bind(FP, LAYOUT, "cpu")
    assert c.fingerprint is None  # nothing half-bound
    FeatureCache("fp8", "host", budget=40).bind(FP, LAYOUT, "cpu")  # 30 bytes a row in fp8: fits


# ---------------------------------------------------------------------------------------------------------------
# budgets, eviction, tiers
# ---------------------------------------------------------------------------------------------------------------
def test_lru_eviction_counts_bytes_and_keeps_in_budget_rows():
    rb = _row_bytes("fp16")
    c = _cache("fp16", budget=4 * rb)
    x = _rows(8, seed=2)
    c.put(torch.arange(4), _take(x, range(4)))
    assert _hit(c, torch.tensor([0])).all()  # key 0 becomes most recently used
    c.put(torch.tensor([4, 5]), _take(x, [4, 5]))  # full: evicts the LRU rows 1 and 2
    st = c.stats()
    assert st["evictions"] == 2 and st["evicted_bytes"] == 2 * rb
    assert st["bytes_host"] == 4 * rb and st["rows_host"] == 4 and len(c) == 4
    assert _hit(c, torch.arange(6)).tolist() == [True, False, False, True, True, True]
    got = _got(c, torch.tensor([5, 0, 3, 4]))
    want = [t.half().float() for t in _take(x, [5, 0, 3, 4])]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_full_budget_never_evicts_the_current_batch_or_last_hits():
    rb = _row_bytes("fp32")
    c = _cache("fp32", budget=3 * rb)
    x = _rows(6, seed=8)
    c.put(torch.arange(6), x)  # a batch larger than the budget: no row of it is evicted for another
    assert len(c) == 3 and c.stats()["evictions"] == 0 and c.stats()["skipped"] == 3
    hit, got = c.fetch(torch.tensor([0, 1, 2, 9]), "cpu")  # the wrapper: fetch -> put(misses)
    c.put(torch.tensor([9]), _take(x, [5]))  # the last fetch's hits are not evicted for it
    assert c.stats()["skipped"] == 4 and c.stats()["evictions"] == 0 and hit.tolist() == [True] * 3 + [False]
    assert all(torch.equal(g, w) for g, w in zip(got, _take(x, [0, 1, 2])))
    _hit(c, torch.tensor([9]))  # the next batch: the old hits are evictable again
    c.put(torch.tensor([9]), _take(x, [5]))
    assert c.stats()["evictions"] == 1 and _hit(c, torch.tensor([9, 0])).tolist() == [True, False]


def test_evict_none_keeps_stored_rows():
    rb = _row_bytes("fp16")
    c = _cache("fp16", budget=2 * rb, evict="none")
    x = _rows(3)
    c.put(torch.arange(2), _take(x, [0, 1]))
    _hit(c, torch.tensor([7]))
    c.put(torch.tensor([2]), _take(x, [2]))
    st = c.stats()
    assert st["evictions"] == 0 and st["skipped"] == 1 and _hit(c, torch.arange(3)).tolist() == [True, True, False]


def test_auto_spills_device_then_host_then_disk(tmp_path):
    rb = _row_bytes("fp16")
    c = FeatureCache("fp16", "auto", budget=2 * rb, host_budget=3 * rb, path=tmp_path / "spill")
    c.bind(FP, LAYOUT, "cpu")
    x = _rows(7, seed=6)
    keys = torch.arange(7) * 11
    c.put(keys[:4], _take(x, range(4)))
    c.put(keys[4:], _take(x, range(4, 7)))
    st = c.stats()
    assert (st["rows_device"], st["rows_host"], st["rows_disk"]) == (2, 3, 2)
    assert (st["bytes_device"], st["bytes_host"]) == (2 * rb, 3 * rb) and st["evictions"] == 0
    assert st["tiers"]["disk"]["budget"] == float("inf") and st["bytes_disk"] > 0
    order = torch.tensor([6, 0, 3, 5, 1, 4, 2])
    assert _hit(c, keys[order]).all()
    got = _got(c, keys[order])
    want = [t.half().float() for t in _take(x, order)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_auto_default_host_budget_and_temp_disk_tier():
    c = FeatureCache("fp32", "auto", budget=_row_bytes("fp32"), host_budget=0)
    c.bind(FP, LAYOUT, "cpu")
    c.put(torch.arange(3), _rows(3))
    st = c.stats()
    assert (st["rows_device"], st["rows_host"], st["rows_disk"]) == (1, 0, 2)
    tmp = st["path"]
    assert tmp and os.path.isdir(tmp)
    assert torch.equal(_got(c, torch.tensor([2]))[0], _rows(3)[0][2:])
    c.close()
    assert not os.path.exists(tmp)  # a temporary disk tier is removed
    d = FeatureCache(budget="1GiB")
    d.bind(FP, LAYOUT, "cpu")
    assert 0 < d.stats()["tiers"]["host"]["budget"] <= 4 * 2**30


# ---------------------------------------------------------------------------------------------------------------
# statistics, clear, invalidation
# ---------------------------------------------------------------------------------------------------------------
def test_stats_are_explicit():
    c = _cache("fp8")
    c.put(torch.arange(5), _rows(5))
    c.note_segment_time(0.5, 5)  # 0.1 s per sample
    c.fetch(torch.arange(7), "cpu")  # 5 of 7 stored
    st = c.stats()
    for key in (
        "hits",
        "misses",
        "stores",
        "evictions",
        "invalidations",
        "corrupt",
        "skipped",
        "escaped",
        "codec",
        "where",
        "rows_device",
        "rows_host",
        "rows_disk",
        "bytes_device",
        "bytes_host",
        "bytes_disk",
        "time_saved_s",
        "tiers",
    ):
        assert key in st
    assert (st["hits"], st["misses"], st["stores"], st["lookups"]) == (5, 5, 5, 7)
    assert st["codec"] == "fp8" and st["where"] == "host" and st["rows_host"] == 5 == len(c)
    assert st["bytes_host"] == 5 * _row_bytes("fp8") == st["bytes"]
    assert 0 < st["time_saved_s"] <= 0.5 and st["segment_s_per_row"] == pytest.approx(0.1)


def test_clear_keeps_binding_and_counters():
    c = _cache("fp16")
    c.put(torch.arange(4), _rows(4))
    c.clear()
    st = c.stats()
    assert len(c) == 0 and st["bytes_host"] == 0 and st["stores"] == 4 and c.fingerprint == FP
    assert not _hit(c, torch.arange(4)).any()
    c.put(torch.arange(2), _rows(2))
    assert _hit(c, torch.arange(2)).all()


def test_new_fingerprint_invalidates(tmp_path):
    c = _cache("fp16", "auto", budget=_row_bytes("fp16"), host_budget=0, path=tmp_path / "inv")
    c.put(torch.arange(3), _rows(3))
    assert c.stats()["rows_disk"] == 2
    c.bind(FP, LAYOUT, "cpu")  # same setup: nothing happens
    assert len(c) == 3 and c.stats()["invalidations"] == 0
    c.bind("ffffffffffffffff", [((4,), torch.float32)], "cpu")  # other weights, other boundary
    assert len(c) == 0 and c.stats()["invalidations"] == 1 and c.fingerprint == "ffffffffffffffff"
    c.put(torch.arange(9), [torch.ones(9, 4)])  # 5 rows of 8 bytes on the device, 4 spill to the re-created store
    assert torch.equal(_got(c, torch.tensor([8]))[0], torch.ones(1, 4)) and c.stats()["rows_disk"] == 4
    c.flush()
    head = json.loads((tmp_path / "inv" / "header.json").read_text())
    assert head["fingerprint"] == "ffffffffffffffff" and [x["tensors"] for x in head["layouts"]] == [[[[4], "float32"]]]


def test_extend_converts_rows_keeps_lru_order_and_traffic_counters():
    c = _cache("fp32", budget=10 * _row_bytes("fp32"))
    x = _rows(6, seed=4)
    c.put(torch.arange(6), x)
    _got(c, torch.tensor([1]))  # key 1 becomes the most recently used
    before = c.stats()
    new_layout = [((5,), torch.float32)]
    seen = []

    def convert(rows):  # a stand-in for the blocks between two cuts: row sums of the first tensor
        seen.append(len(rows[0]))
        return [rows[0].sum(1) + rows[1][:, :1]]

    # 4 rows per chunk (22 fp32 values = 88 bytes each): the 6 rows convert in two chunks
    assert c.extend("fedcba9876543210", new_layout, "cpu", convert, chunk_bytes=4 * 88) == 6
    st = c.stats()
    assert sorted(seen) == [2, 4] and c.fingerprint == "fedcba9876543210" and c.layout == new_layout
    assert st["extended"] == 6 and st["invalidations"] == 0 and st["stores"] == before["stores"] + 6
    assert (st["lookups"], st["hits"], st["misses"]) == (before["lookups"], before["hits"], before["misses"])
    assert _lru(c) == [0, 2, 3, 4, 5, 1]  # the old LRU order
    got = _got(c, torch.arange(6))[0]
    torch.testing.assert_close(got, x[0].sum(1) + x[1][:, :1], rtol=0, atol=0)
    # the new layout fills a 10-row budget with 6 rows of 20 bytes: nothing was evicted
    assert st["evictions"] == 0 and st["rows_host"] == 6


def test_extend_refuses_a_convert_of_the_wrong_shape():
    c = _cache("fp16")
    c.put(torch.arange(3), _rows(3))
    with pytest.raises(CacheError, match=r"convert\(\) returned shapes \[\(3, 4\)\].*needs \[\(3, 5\)\]"):
        c.extend("fedcba9876543210", [((5,), torch.float32)], "cpu", lambda rows: [torch.zeros(3, 4)])
    assert len(c) == 3 and c.fingerprint == FP  # nothing the cache had is lost
    assert _lru(c) == [0, 1, 2] and c.stats()["lookups"] == 0 and _hit(c, torch.arange(3)).all()


def test_fingerprint_of():
    w = [torch.randn(300, 301), torch.randn(5)]
    facts = dict(freeze=[0, 1, 2], bn="frozen", dtype="torch.float32", codec="fp16", inputs="[3, 64, 64] float32")
    a = fingerprint_of(w, **facts)
    assert len(a) == 16 and int(a, 16) >= 0 and a == fingerprint_of([t.clone() for t in w], **facts)
    w2 = [w[0].clone(), w[1].clone()]
    w2[0][123, 45] += 1e-3
    assert fingerprint_of(w2, **facts) != a
    assert fingerprint_of(w, **{**facts, "bn": "train"}) != a
    assert fingerprint_of(w, **{**facts, "codec": "fp8"}) != a
    assert fingerprint_of([w[0].reshape(301, 300), w[1]], **facts) != a  # shape matters
    assert fingerprint_of([w[0].half(), w[1]], **facts) != a


# ---------------------------------------------------------------------------------------------------------------
# disk tier: persistence, corruption, truncation, foreign stores
# ---------------------------------------------------------------------------------------------------------------
def _worker(*args) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "tests._cache_worker", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_disk_store_persists_across_processes(tmp_path):
    store = tmp_path / "persist"
    assert _worker("write", store, 9) == {"rows": 9}
    head = json.loads((store / "header.json").read_text())
    assert head["fingerprint"] == "feedc0de00000001" and head["codec"] == "fp32" and head["version"] == 3
    out = _worker("read", store, 9)
    assert out["hits"] == [True] * 9 + [False] and out["max_err"] == 0.0 and out["corrupt"] == 0
    # corrupt one record's payload and truncate the data file: detected in a fresh process, never returned
    data, rec = _slab_file(store, "fp32"), 24 + 22 * 4  # an fp32 record: checksum, key, content, 22 floats
    raw = bytearray(data.read_bytes())
    raw[3 * rec + 40] ^= 0xFF  # a payload byte of record 3
    data.write_bytes(bytes(raw[: 7 * rec + 50]))  # record 7 cut in half, record 8 gone
    out = _worker("read", store, 9)
    assert out["hits"] == [True, True, True, False, True, True, True, False, False, False]
    assert out["max_err"] == 0.0 and out["corrupt"] == 3


def test_flipped_bytes_are_detected_and_recomputed(tmp_path):
    c = _cache("fp16", "disk", path=tmp_path / "flip")
    x = _rows(5, seed=7)
    c.put(torch.arange(5), x)
    _flip(c, 2, 24 + 10, 0x10)  # a payload bit of key 2
    _flip(c, 4, 9, 0x01)  # the stored key of key 4
    assert _hit(c, torch.arange(5)).tolist() == [True, True, False, True, False]
    assert c.stats()["corrupt"] == 2 and len(c) == 3
    c.put(torch.tensor([2, 4]), _take(x, [2, 4]))  # the wrapper recomputes the misses
    got = _got(c, torch.arange(5))
    assert all(torch.equal(g, t.half().float()) for g, t in zip(got, x))
    # a record that goes bad after it was served: the next fetch reads it again and reports a miss
    _flip(c, 1, 20, 0x40)  # its content field
    hit, rows = c.fetch(torch.tensor([0, 1]), "cpu")
    assert hit.tolist() == [True, False] and rows[0].shape[0] == 1 and c.stats()["corrupt"] == 3


def test_truncated_while_open_does_not_crash(tmp_path):
    c = _cache("fp32", "disk", path=tmp_path / "trunc")
    c.put(torch.arange(20), _rows(20))
    c.flush()
    os.truncate(_slab_file(tmp_path / "trunc", "fp32"), 5 * (24 + 22 * 4))
    hit = _hit(c, torch.arange(20))
    assert hit[:5].all() and not hit[5:].any() and c.stats()["corrupt"] == 15
    assert torch.equal(_got(c, torch.arange(5))[0], _rows(20)[0][:5])
    c.put(torch.arange(5, 20), _take(_rows(20), range(5, 20)))  # grows the file again
    assert _hit(c, torch.arange(20)).all()


def test_unreadable_index_is_rebuilt_from_records(tmp_path):
    c = _cache("fp16", "disk", path=tmp_path / "idx")
    c.put(torch.arange(6) + 100, _rows(6))
    c.close()
    (tmp_path / "idx" / "index.pt").write_bytes(b"garbage")
    d = FeatureCache("fp16", "disk", "1MiB", tmp_path / "idx")
    with pytest.warns(UserWarning, match="rebuilt from 6 verified records"):
        d.bind(FP, LAYOUT, "cpu")
    assert _hit(d, torch.arange(6) + 100).all()


def test_foreign_store_is_refused_with_both_fingerprints(tmp_path):
    store = tmp_path / "foreign"
    c = _cache("fp16", "disk", path=store)
    c.put(torch.arange(3), _rows(3))
    c.close()
    other = FeatureCache("fp16", "disk", "1MiB", store)
    with pytest.raises(CacheError, match=f"{FP}.*fedcba9876543210.*clear it.*another path"):
        other.bind("fedcba9876543210", LAYOUT, "cpu")
    assert other.fingerprint is None and len(other) == 0
    with pytest.raises(CacheError, match="codec 'fp16'.*codec 'bf16'"):
        FeatureCache("bf16", "disk", "1MiB", store).bind(FP, LAYOUT, "cpu")
    more = FeatureCache("fp16", "disk", "1MiB", store)  # another layout of the same setup (another input shape)
    more.bind(FP, [((9,), torch.float32)], "cpu")  # is held beside the first, in files of its own
    more.put(torch.arange(2), [torch.ones(2, 9)])
    assert _hit(more, torch.arange(3)).tolist() == [True, True, False] and len(more) == 5
    more.close()
    same = FeatureCache("fp16", "disk", "1MiB", store)
    same.bind(FP, LAYOUT, "cpu")
    assert _hit(same, torch.arange(3)).all()  # the right model reads it
    same.close()
    other.clear()  # the documented fix: wipe the store, then bind
    other.bind("fedcba9876543210", LAYOUT, "cpu")
    assert len(other) == 0 and json.loads((store / "header.json").read_text())["fingerprint"] == "fedcba9876543210"


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_across_tiers(tmp_path):
    rb = _row_bytes("fp16")
    c = FeatureCache("fp16", "auto", budget=2 * rb, host_budget=2 * rb, path=tmp_path / "live")
    c.bind(FP, LAYOUT, "cpu")
    x = _rows(7, seed=11)
    x[0][5, 0, 0] = 3.0e5  # an escaped fp32 row
    c.put(torch.arange(7) + 40, x)
    before = _got(c, torch.arange(7) + 40)
    c.save(tmp_path / "snap")
    loaded = FeatureCache.load(tmp_path / "snap")
    assert loaded.fingerprint == FP and loaded.codec == "fp16" and loaded.where == "auto" and len(loaded) == 7
    st = loaded.stats()
    assert (st["rows_device"], st["rows_host"]) == (2, 2) and st["tiers"]["device"]["budget"] == 2 * rb
    loaded.bind(FP, LAYOUT, "cpu")
    after = _got(loaded, torch.arange(7) + 40)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # bit-identical: encoded bytes copied
    with pytest.raises(CacheError, match="not empty"):
        c.save(tmp_path / "snap")
    wrong = FeatureCache.load(tmp_path / "snap")
    with pytest.raises(CacheError, match=f"{FP}.*0000000000000000"):
        wrong.bind("0000000000000000", LAYOUT, "cpu")


def test_save_load_disk_cache_opens_in_place(tmp_path):
    c = _cache("fp8", "disk", path=tmp_path / "d1")
    x = _rows(4)
    c.put(torch.arange(4), x)
    before = _got(c, torch.arange(4))
    c.save(tmp_path / "d2")
    c.save(tmp_path / "d1")  # its own directory: a flush
    c.close()  # one writer per directory: loading d1 in place opens it for writing
    for p in ("d1", "d2"):
        loaded = FeatureCache.load(tmp_path / p)
        assert loaded.where == "disk" and loaded.fingerprint == FP and len(loaded) == 4
        assert all(torch.equal(a, b) for a, b in zip(before, _got(loaded, torch.arange(4))))
        loaded.close()
    with pytest.raises(CacheError, match="no saved FeatureCache"):
        FeatureCache.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the device tier and the GPU reading pinned host rows directly
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("codec", ["fp16", "fp8"])
def test_cuda_tiers_gather_into_the_batch(codec, tmp_path):
    rb = _row_bytes(codec)
    c = FeatureCache(codec, "auto", budget=3 * rb, host_budget=3 * rb, path=tmp_path / "gpu")
    c.bind(FP, LAYOUT, "cuda")
    x = [t.cuda() for t in _rows(8, seed=12)]
    keys = torch.arange(8, device="cuda") * 5
    c.put(keys, x)
    st = c.stats()
    assert (st["rows_device"], st["rows_host"], st["rows_disk"]) == (3, 3, 2)
    host = _slab(c, 1, codec)
    assert host.stores[0].is_pinned() and _slab(c, 0, codec).stores[0].is_cuda
    ref = _cache(codec)  # the same rows through the CPU path
    ref.put(keys.cpu(), [t.cpu() for t in x])
    order = torch.tensor([7, 3, 0, 5, 1, 6, 2, 4])
    assert _hit(c, keys[order]).all()
    got = _got(c, keys[order], "cuda")
    want = _got(ref, keys.cpu()[order])
    for g, w in zip(got, want):
        assert g.is_cuda and torch.equal(g.cpu(), w)
    assert all(g.dtype == torch.float32 for g in got)  # the layout's dtype


@pytest.mark.cuda
def test_cuda_where_cuda_and_rebind_device(tmp_path):
    c = FeatureCache("fp16", "host", "1MiB")
    c.bind(FP, LAYOUT, "cpu")
    x = _rows(4)
    c.put(torch.arange(4), x)
    c.bind(FP, LAYOUT, "cuda")  # the model moved: host rows get pinned, served to the GPU
    assert _slab(c, 0, "fp16").stores[0].is_pinned()
    assert torch.equal(_got(c, torch.arange(4), "cuda")[0].cpu(), x[0].half().float())
    g = FeatureCache("fp32", "cuda", "1MiB")
    g.bind(FP, LAYOUT, "cuda")
    g.put(torch.arange(4), [t.cuda() for t in x])
    assert torch.equal(_got(g, torch.tensor([2, 0]))[1], x[1][[2, 0]])


@pytest.mark.cuda
def test_cuda_pinned_store_is_not_freed_or_rewritten_under_a_pending_gather():
    c = FeatureCache("fp16", "host", "1MiB")
    c.bind(FP, LAYOUT, "cuda")
    x = [t.cuda() for t in _rows(4, seed=2)]
    c.put(torch.arange(4), x)
    slab = _slab(c, 0, "fp16")
    assert _hit(c, torch.arange(4)).all()
    got = _got(c, torch.arange(4), "cuda")
    assert slab._reading is not None  # the gather may still be reading the pinned store
    c.put(torch.arange(4, 40), [t.repeat(9, *([1] * (t.dim() - 1))) for t in x])  # grows: the old store is freed
    assert slab._reading is None and slab.cap >= 40
    for g, t in zip(got, x):
        assert torch.equal(g.cpu(), t.half().float().cpu())
