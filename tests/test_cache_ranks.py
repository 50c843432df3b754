"""Several processes share one disk store (issue 17): one shard per writer (its own lock), every shard read by all;
rows another rank stored become hits after ``sync()``/``refresh()``; a store of another setup is refused; a store is
reopened by a new process (resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from freezert import CacheError
from freezert.cache import FeatureCache, feature_cache

from . import _cache_rank_worker as w

FP, FP2 = "0123456789abcdef", "fedcba9876543210"
LAYOUT = [((3, 4), torch.float32)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(path, rank, fp=FP, budget="1MiB", **kw) -> FeatureCache:
    c = FeatureCache("fp32", "disk", budget, path, rank=rank, **kw)
    c.bind(fp, LAYOUT, "cpu")
    return c


def test_two_writers_share_one_store_through_their_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "_SHARE_S", 1e9)  # no automatic sharing: only the calls below
    store, rec = tmp_path / "s", 24 + 12 * 4  # a record: checksum, key, content, 12 floats
    r0, r1 = _rank(store, 0, budget=8 * rec), _rank(store, 1, budget=8 * rec)  # one writer per shard: no conflict
    r0.put(range(0, 8), w.rows(list(range(0, 8))))
    r1.put(range(8, 16), w.rows(list(range(8, 16))))
    assert r0.fetch(range(16), "cpu")[0].sum() == 8  # the other's rows are not visible before it flushes
    r1.flush()
    assert r0.refresh() == 8
    hit, got = r0.fetch(range(16), "cpu")
    assert hit.all() and torch.equal(got[0], w.rows(list(range(16)))[0])
    st = r0.stats()
    assert st["tiers"]["disk"]["shared_rows"] == 8 and st["rows_disk"] == 16 and st["refreshes"] == 1
    assert st["bytes_disk"] == 16 * rec and st["tiers"]["disk"]["budget"] == 8 * rec  # its budget counts its own
    assert not r0.fetch([50], "cpu")[0].any()  # the next batch: the last fetch's hits are evictable again
    r0.put([50], w.rows([50]))  # full: evicts one of its own rows, never another rank's
    assert r0.stats()["evictions"] == 1 and r0.fetch(range(8, 16), "cpu")[0].all()
    assert r0.fetch([50], "cpu")[0].all() and r0.fetch(range(8), "cpu")[0].sum() == 7
    with pytest.raises(CacheError, match=r"rank1' is open for writing by another FeatureCache.*rank=r"):
        _rank(store, 1)
    assert {"header.json", "rank1"} <= set(os.listdir(store)) and os.path.isdir(store / "rank1")
    # rank 1 reuses a slot (evicts key 8 for key 99): rank 0's index still names key 8 there and reads key 99's
    # record: a miss, never a wrong row; after rank 1's next flush, rank 0 serves key 99
    r1.put([99], w.rows([99]))
    assert r0.fetch([8, 99], "cpu")[0].tolist() == [False, False]
    r1.flush()
    r0.refresh()
    hit, got = r0.fetch([99], "cpu")
    assert hit.all() and torch.equal(got[0], w.rows([99])[0])
    r0.clear()  # its own rows go, its shard is truncated; the other rank's rows are read again at the next refresh
    assert len(r0) == 0 and r0.refresh() == 8 and r0.fetch([99], "cpu")[0].all() and len(r1) == 8
    r0.close()
    r1.close()


def test_rows_become_visible_without_a_call_every_few_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "_SHARE_S", 0.0)  # the interval, shortened for the test
    store = tmp_path / "s"
    r0, r1 = _rank(store, 0), _rank(store, 1)
    r0.put(range(4), w.rows(list(range(4))))  # a put flushes the writer's index ...
    assert r1.fetch(range(4), "cpu")[0].all()  # ... and a fetch reads the other shards' new indexes


def test_a_shard_of_another_setup_is_refused_and_nothing_deleted(tmp_path):
    store = tmp_path / "s"
    r1 = _rank(store, 1, fp=FP2)
    r1.put(range(2), w.rows([0, 1]))
    r1.close()
    before = sorted(os.listdir(store / "rank1"))
    with pytest.raises(CacheError, match=rf"rank1' holds features of fingerprint {FP2}.*{FP}.*clear it"):
        _rank(store, 0)
    assert sorted(os.listdir(store / "rank1")) == before
    FeatureCache("fp32", "disk", "1MiB", store).clear()  # the fix: every shard wiped, each under its lock
    assert not (store / "rank1").exists() and _rank(store, 0).fetch(range(2), "cpu")[0].sum() == 0


def _spawn(tmp_path, world: int = 2, timeout: int = 180) -> list[dict]:
    ctx = mp.start_processes(
        _rank_main,
        args=(world, str(tmp_path / "init"), str(tmp_path / "store"), str(tmp_path / "out")),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    for _ in range(timeout):
        if ctx.join(timeout=1):
            return [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    for p in ctx.processes:
        p.kill()
    pytest.fail("the cache ranks did not finish in time")


def _rank_main(rank: int, world: int, init: str, store: str, out: str) -> None:
    w.run(rank, world, init, store, f"{out}.{rank}")


def test_ddp_ranks_share_one_store_with_a_shuffling_sampler(tmp_path):
    outs = _spawn(tmp_path)
    for o in outs:
        rates = [h / n for h, n in zip(o["hits"], o["lookups"])]
        assert rates[0] == 0 and min(rates[2:]) >= 0.9, rates  # per-rank caches alone would hit ~1/2
        assert o["wrong"] == 0
    assert sum(o["lookups"][0] for o in outs) == w.N
    # resume: a new process (here, this one) reopens the store with the same setup and is served every row ...
    again = FeatureCache("fp32", "disk", "64MiB", tmp_path / "store")
    again.bind(w.FP, w.LAYOUT, "cpu")
    hit, got = again.fetch(range(w.N), "cpu")
    assert hit.all() and torch.equal(got[0], w.rows(list(range(w.N)))[0])
    again.close()
    # ... and one of another setup is refused, as a single process's store is
    with pytest.raises(CacheError, match=f"holds features of fingerprint {w.FP}"):
        FeatureCache("fp32", "disk", "64MiB", tmp_path / "store").bind(FP2, w.LAYOUT, "cpu")


def _two_layouts(cache: FeatureCache):
    for size in (4, 6):
        yield cache.layout_for([((2, size), torch.float32)], tag=f"{size}px"), size


def _layout_rows(size: int) -> list[torch.Tensor]:
    return [torch.arange(5.0).view(5, 1, 1).expand(5, 2, size) + size]


def test_a_store_of_many_layouts_resumes_in_a_new_process(tmp_path):
    c = FeatureCache("fp16", "disk", "1MiB", tmp_path / "s")
    c.bind(FP, None, "cpu")
    for lay, size in _two_layouts(c):
        c.put(range(5), _layout_rows(size), layout=lay)
    c.close()
    code = """
        import sys, torch
        from freezert.cache import FeatureCache
        from tests.test_cache_ranks import _layout_rows, _two_layouts
        c = FeatureCache("fp16", "disk", "1MiB", sys.argv[1])
        c.bind(sys.argv[2], None, "cpu")
        for lay, size in _two_layouts(c):
            hit, rows = c.fetch(range(6), "cpu", layout=lay)
            print(hit.tolist(), torch.equal(rows[0], _layout_rows(size)[0]))
    """
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "s"), FP]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["[True, True, True, True, True, False] True"] * 2
    with pytest.raises(CacheError, match=f"holds features of fingerprint {FP}"):  # another setup: refused
        FeatureCache("fp16", "disk", "1MiB", tmp_path / "s").bind(FP2, None, "cpu")


def test_a_shard_another_rank_is_creating_is_skipped_then_read(tmp_path, monkeypatch):
    """Ranks bind at the same moment: another rank's shard may hold its lock (or data) before its header, which
    is written whole. Binding then skips it (no error: nothing in it can be verified yet) and reads it once it is
    complete; the rank's own store without a header stays an error."""
    monkeypatch.setattr(feature_cache, "_SHARE_S", 1e9)
    store = tmp_path / "s"
    r1 = _rank(store, 1)
    r1.put(range(4), w.rows(list(range(4))))
    r1.flush()
    header = store / "rank1" / "header.json"
    kept = header.read_bytes()
    header.unlink()  # rank 1 as it is between taking its lock and writing its header
    r0 = _rank(store, 0)
    assert not r0.fetch(range(4), "cpu")[0].any()
    header.write_bytes(kept)
    assert r0.refresh() == 4 and r0.fetch(range(4), "cpu")[0].all()
    r0.close()
    r1.close()
    (store / "header.json").unlink()
    with pytest.raises(CacheError, match="no header.json"):
        _rank(store, 0)
