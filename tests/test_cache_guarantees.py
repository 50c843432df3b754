"""The guarantees of issue 10: no flushed, foreign, stale or crossed rows, no crash, a clear error for every bad
input. Each test here failed on the code before the fix (see docs/CACHE.md, "Guarantees")."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from freezert import CacheError
from freezert.cache import FeatureCache, ids_to_keys

LAYOUT = [((3, 5), torch.float32), ((7,), torch.float32)]
FP, FP2 = "0123456789abcdef", "fedcba9876543210"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(n: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) * scale for s, _ in LAYOUT]


def _cache(codec="fp16", where="host", budget="1MiB", path=None, fp=FP, **kw) -> FeatureCache:
    c = FeatureCache(codec, where, budget, path, **kw)
    c.bind(fp, LAYOUT, torch.device("cpu"))
    return c


def _slab_file(store, codec: str):
    """The one slab file of ``codec`` in the store (one layout): slab_<layout id>_<codec>.bin."""
    (file,) = [p for p in store.iterdir() if p.name.startswith("slab_") and p.name.endswith(f"_{codec}.bin")]
    return file


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=120
    )


# ---------------------------------------------------------------------------------------------------------------
# 1. reduced-precision codecs keep each row-tensor's relative precision at any magnitude
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("scale", [1e-8, 1e-30, 1e-39, 1e4, 1e30])
def test_tiny_and_huge_rows_keep_their_relative_precision(codec, where, scale, tmp_path):
    c = _cache(codec, where, path=tmp_path / "s" if where == "disk" else None)
    x = _rows(6, seed=2)
    x[1] = x[1] * scale  # the second boundary tensor alone is tiny (YOLO's block-9 output at init: ~1e-8)
    c.put(torch.arange(6), x)
    hit, got = c.fetch(torch.arange(6), "cpu")
    assert hit.all()
    rel = {"fp16": 2**-11, "bf16": 2**-8, "fp8": 2**-4}[codec]
    for g, t in zip(got, x):
        amax = t.reshape(6, -1).abs().amax(1)
        err = (g - t).reshape(6, -1).abs()
        assert (err <= amax[:, None] * rel).all(), (codec, scale, float((err / amax[:, None]).max()))
    st = c.stats()
    assert st["escaped"] == st["escaped_small"] + st["escaped_large"]
    if codec == "fp16" and scale in (1e-8, 1e-30, 1e-39):
        assert st["escaped_small"] == 6
    if codec == "fp16" and scale in (1e4, 1e30) and x[1].abs().max() > 65504:
        assert st["escaped_large"] >= 1


def test_fp16_underflow_through_a_wrapped_model():
    import freezert

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)
    )
    with torch.no_grad():
        model[1].weight.mul_(1e-8)  # the frozen boundary sits at ~1e-8, below fp16's normal range
        model[1].bias.mul_(1e-8)
    ref = copy.deepcopy(model).train()
    for p in list(ref[0].parameters()) + list(ref[1].parameters()):
        p.requires_grad_(False)
    fm = freezert.wrap(model, freeze=2, cache="fp16").train()
    x = torch.randn(32, 8)
    fm(x)  # fills the cache
    out = fm(x)  # served from it: the train-mode BatchNorm renormalises the tiny boundary
    assert fm.cache.stats()["hits"] == 32 and fm.cache.stats()["escaped_small"] == 32
    torch.testing.assert_close(out, ref(x), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# 2. records are bound to their store's fingerprint; an unverifiable header is never adopted
# ---------------------------------------------------------------------------------------------------------------
def test_records_copied_from_another_model_are_never_served(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ca = _cache("fp32", "disk", path=a, fp=FP)
    ca.put(torch.arange(8), _rows(8, seed=1))
    ca.close()
    cb = _cache("fp32", "disk", path=b, fp=FP2)
    cb.put(torch.arange(8), _rows(8, seed=2))
    cb.close()
    for name in (_slab_file(a, "fp32").name, "index.pt"):  # same architecture, other weights: same layout files
        shutil.copy(a / name, b / name)
    cb = _cache("fp32", "disk", path=b, fp=FP2)
    hit, rows = cb.fetch(torch.arange(8), "cpu")
    assert not hit.any() and cb.stats()["corrupt"] == 8 and rows[0].shape == (0, 3, 5)


@pytest.mark.parametrize(
    "damage",
    [
        "garbage",
        "layout_value",
        "layout_type",
        "layout_dtype",
        "layout_id",
        "edited_fingerprint",
        "no_header",
        "version2",
    ],
)
def test_an_unverifiable_header_is_refused_and_nothing_deleted(damage, tmp_path):
    from freezert.cache.disk import _header_check

    store = tmp_path / "s"
    c = _cache("fp16", "disk", path=store)
    c.put(torch.arange(4), _rows(4))
    c.close()
    head = json.loads((store / "header.json").read_text())
    if damage == "garbage":
        (store / "header.json").write_bytes(b"\x00{not json")
    elif damage == "no_header":
        (store / "header.json").unlink()
    else:
        if damage == "layout_value":
            head["layouts"][0]["tensors"] = [[["a"], "float32"]]
        elif damage == "layout_type":
            head["layouts"] = 7
        elif damage == "layout_dtype":
            head["layouts"][0]["tensors"] = [[[3, 5], "Tensor"], [[7], "float32"]]
        elif damage == "layout_id":  # a layout whose id does not name its contents: its files are not its rows
            head["layouts"][0]["tensors"] = [[[15], "float32"], [[7], "float32"]]
        elif damage == "edited_fingerprint":
            head["fingerprint"] = FP2  # adopting it would serve FP's rows to FP2's model
        elif damage == "version2":
            head["version"] = 2  # before a store held many layouts
        if damage.startswith("layout"):  # self-consistent: the layout check itself must refuse it
            head["header_check"] = _header_check(head)
        (store / "header.json").write_text(json.dumps(head))
    before = sorted(os.listdir(store))
    with pytest.raises(CacheError, match=r"cannot be verified.*clear it.*another path"):
        _cache("fp16", "disk", path=store, fp=FP2 if damage == "edited_fingerprint" else FP)
    assert sorted(os.listdir(store)) == before
    FeatureCache("fp16", "disk", "1MiB", store).clear()  # the documented fix works
    assert _cache("fp16", "disk", path=store).fetch(torch.arange(4), "cpu")[0].sum() == 0


def test_death_before_the_first_flush_never_serves_the_previous_models_rows(tmp_path):
    store = tmp_path / "s"
    c = _cache("fp32", "disk", path=store, fp=FP)
    c.put(torch.arange(5), _rows(5))
    c.close()
    # another model clears and re-creates the store, stores rows and dies (kill -9) before any flush
    code = """
        import os, sys, torch
        from freezert.cache import FeatureCache
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1])
        c.clear()
        c.bind(sys.argv[2], [((3, 5), torch.float32), ((7,), torch.float32)], "cpu")
        c.put(torch.arange(5) + 100, [torch.ones(5, 3, 5), torch.ones(5, 7)])
        os._exit(9)
    """
    assert _run(code, str(store), FP2).returncode == 9
    d = _cache("fp32", "disk", path=store, fp=FP2)
    hit, _ = d.fetch(torch.arange(5), "cpu")  # FP's keys: its index is gone, and its records would not verify
    assert not hit.any()


# ---------------------------------------------------------------------------------------------------------------
# 3. one id, two inputs in one batch; 4. an id whose input changed (augmentation); content keys never reused
# ---------------------------------------------------------------------------------------------------------------
def test_duplicate_ids_with_different_inputs_are_refused():
    c = _cache()
    x = _rows(3)
    with pytest.raises(CacheError, match=r"id 5 appears at positions 0 and 2.*different inputs.*unique ids"):
        c.put(torch.tensor([5, 6, 5]), x, content=torch.tensor([11, 12, 13]))
    with pytest.raises(CacheError, match="id 5 appears"):
        c.fetch(torch.tensor([5, 6, 5]), "cpu", content=torch.tensor([11, 12, 13]))
    assert len(c) == 0
    # the same sample drawn twice (a sampler with replacement): the same id and the same input is fine
    c.put(torch.tensor([5, 6, 5]), [x[0][[0, 1, 0]], x[1][[0, 1, 0]]], content=torch.tensor([11, 12, 11]))
    hit, rows = c.fetch(torch.tensor([5, 5, 6]), "cpu", content=torch.tensor([11, 11, 12]))
    assert hit.all() and torch.equal(rows[0][0], rows[0][1]) and len(c) == 2
    # content keys (content=None): a repeated key is the same input
    c.put(torch.tensor([1, 1]), [x[0][[2, 2]], x[1][[2, 2]]])
    assert len(c) == 3


@pytest.mark.parametrize("where", ["host", "disk"])
def test_an_id_whose_input_changed_is_recomputed_with_one_warning(where, tmp_path):
    c = _cache("fp32", where, path=tmp_path / "s" if where == "disk" else None)
    ids = torch.arange(4)
    c.put(ids, _rows(4, seed=1), content=torch.tensor([10, 11, 12, 13]))
    hit, _ = c.fetch(ids, "cpu", content=torch.tensor([10, 11, 12, 13]))
    assert hit.all()
    with pytest.warns(UserWarning, match=r"different input.*recomputed.*random augmentation") as rec:
        hit, rows = c.fetch(ids, "cpu", content=torch.tensor([10, 99, 12, 98]))  # epoch 2, augmented
    assert len(rec) == 1 and hit.tolist() == [True, False, True, False] and rows[0].shape[0] == 2
    assert c.stats()["stale"] == 2 and len(c) == 2
    c.put(ids[[1, 3]], _take(_rows(4, seed=2), [1, 3]), content=torch.tensor([99, 98]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        assert c.fetch(ids, "cpu", content=torch.tensor([10, 97, 12, 96]))[0].tolist() == [True, False, True, False]
    s = _cache("fp32", strict=True)
    s.put(ids, _rows(4), content=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(CacheError, match=r"sample id 3.*different input.*strict=True.*augmentation"):
        s.fetch(ids, "cpu", content=torch.tensor([1, 2, 3, 5]))
    assert len(s) == 4  # strict refuses; it drops nothing


def _take(rows, idx):
    return [r[torch.as_tensor(idx)] for r in rows]


def test_content_keys_that_never_repeat_are_reported_after_an_epoch():
    c = _cache("fp32", budget="1GiB", epoch_rows=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):  # 64 rows: the first epoch, where nothing can repeat yet
            keys = torch.arange(16) + 1000 * step
            assert not c.fetch(keys, "cpu")[0].any()
            c.put(keys, _rows(16, seed=step))
    with pytest.warns(
        UserWarning,
        match=r"stored 80 rows, more than an epoch's worth \(64, epoch_rows=\).*"
        r"no input has arrived twice.*augmentation",
    ):
        c.put(torch.arange(16) + 9000, _rows(16))  # epoch 2, augmented: new keys again
    # the default: 65,536 rows; a small cache that fills in the first epoch says nothing
    d = _cache("fp32", budget=10 * 88)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            d.put(torch.arange(8) + 100 * step, _rows(8))
    d._index.counters.content_misses = 65_530
    with pytest.warns(UserWarning, match=r"more than an epoch's worth \(65536, the default\)"):
        d.put(torch.arange(8) + 900, _rows(8))
    # a cache that is reused never says it
    e = _cache("fp32", budget="1GiB", epoch_rows=8)
    e.put(torch.arange(8), _rows(8))
    assert e.fetch(torch.arange(8), "cpu")[0].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e.put(torch.arange(8) + 50, _rows(8))


def test_fetch_contract():
    c = _cache("fp16")
    hit, rows = c.fetch(torch.arange(3), "cpu")
    assert hit.dtype == torch.bool and hit.device.type == "cpu" and not hit.any()
    assert [tuple(r.shape) for r in rows] == [(0, 3, 5), (0, 7)] and all(r.dtype == torch.float32 for r in rows)
    x = _rows(4)
    c.put(torch.tensor([7, 9]), _take(x, [1, 3]))
    hit, rows = c.fetch(torch.tensor([9, 1, 7]), "cpu")
    assert hit.tolist() == [True, False, True]
    assert torch.equal(rows[1], torch.stack([x[1][3], x[1][1]]).half().float())  # keys[hit], in order
    u = FeatureCache("fp16", "host", "1MiB")
    assert u.fetch(torch.arange(2), "cpu")[0].tolist() == [False, False]  # unbound: all misses


# ---------------------------------------------------------------------------------------------------------------
# 5. no SIGBUS; one writer per directory
# ---------------------------------------------------------------------------------------------------------------
def test_writes_after_someone_truncated_the_slab_never_crash(tmp_path):
    code = """
        import os, sys, torch
        from freezert.cache import FeatureCache
        lay = [((3, 5), torch.float32), ((7,), torch.float32)]
        c = FeatureCache("fp32", "disk", 8 * 112, sys.argv[1])  # 8 records: at its budget, slots are reused
        c.bind("0123456789abcdef", lay, "cpu")
        x = [torch.randn(8, 3, 5), torch.randn(8, 7)]
        c.put(torch.arange(8), x)
        (slab,) = [n for n in os.listdir(sys.argv[1]) if n.startswith("slab_")]
        os.truncate(os.path.join(sys.argv[1], slab), 0)  # as another process's clear() would
        for step in range(1, 4):  # evicts and reuses slots past the (now empty) file's end
            c.put(torch.arange(8) + 100 * step, x)
        hit, rows = c.fetch(torch.arange(8) + 300, "cpu")
        assert hit.all() and torch.equal(rows[0], x[0])
        print("ok", c.stats()["evictions"])
    """
    r = _run(code, str(tmp_path / "s"))
    assert r.returncode == 0, f"exit {r.returncode} (-7 is SIGBUS): {r.stderr[-2000:]}"
    assert r.stdout.startswith("ok")


def test_a_second_writer_of_one_directory_is_refused(tmp_path):
    store = tmp_path / "s"
    c = _cache("fp32", "disk", path=store)
    c.put(torch.arange(3), _rows(3))
    with pytest.raises(CacheError, match=r"open for writing by another FeatureCache.*readonly=True"):
        _cache("fp32", "disk", path=store)
    code = """
        import sys, torch
        from freezert import CacheError
        from freezert.cache import FeatureCache
        lay = [((3, 5), torch.float32), ((7,), torch.float32)]
        try:
            FeatureCache("fp32", "disk", "1MiB", sys.argv[1]).bind("0123456789abcdef", lay, "cpu")
        except CacheError as e:
            print("refused:", e)
        r = FeatureCache("fp32", "disk", "1MiB", sys.argv[1], readonly=True)
        r.bind("0123456789abcdef", lay, "cpu")
        print("read", int(r.fetch(torch.arange(3), "cpu")[0].sum()))
    """
    c.flush()
    r = _run(code, str(store))
    assert "refused: the cache directory" in r.stdout and "read 3" in r.stdout, r.stderr
    c.close()
    d = _cache("fp32", "disk", path=store)  # closed: the next writer may open it
    assert d.fetch(torch.arange(3), "cpu")[0].all()


def test_a_read_only_store_is_served_and_never_written(tmp_path):
    store = tmp_path / "s"
    c = _cache("fp32", "disk", path=store)
    c.put(torch.arange(3), _rows(3))
    c.close()
    r = _cache("fp32", "disk", path=store, readonly=True)
    assert r.fetch(torch.arange(3), "cpu")[0].all()
    r.put(torch.tensor([50]), _take(_rows(3), [0]))  # nowhere to store it: skipped, the store is untouched
    assert r.stats()["skipped"] == 1 and r.stats()["tiers"]["disk"]["readonly"]
    with pytest.raises(CacheError, match="read-only store"):
        r.clear()
    r.close()
    # a directory this process cannot write (root ignores permission bits: drop that capability with setpriv)
    code = """
        import sys, torch, warnings
        from freezert.cache import FeatureCache
        warnings.simplefilter("always")
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1])
        with warnings.catch_warnings(record=True) as w:
            c.bind("0123456789abcdef", [((3, 5), torch.float32), ((7,), torch.float32)], "cpu")
        hit, _ = c.fetch(torch.arange(3), "cpu")
        c.put(torch.tensor([9]), [torch.zeros(1, 3, 5), torch.zeros(1, 7)])
        c.close()
        print(int(hit.sum()), any("not writable" in str(x.message) for x in w), c.stats()["skipped"])
    """
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory unwritable to this process")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    for name in os.listdir(store):
        os.chmod(store / name, 0o444)
    os.chmod(store, 0o555)
    try:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run(
            [*prefix, sys.executable, "-c", textwrap.dedent(code), str(store)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        os.chmod(store, 0o755)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["3", "True", "1"]


# ---------------------------------------------------------------------------------------------------------------
# clear errors for bad inputs
# ---------------------------------------------------------------------------------------------------------------
def test_path_naming_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match=r"is a file, not a directory"):
        FeatureCache("fp16", "disk", "1MiB", f)


@pytest.mark.parametrize("name", ["slab", "index.pt"])
@pytest.mark.parametrize("kind", ["directory", "devnull"])
def test_store_files_that_are_not_regular_files_are_refused(name, kind, tmp_path):
    store = tmp_path / "s"
    c = _cache("fp16", "disk", path=store)
    c.put(torch.arange(3), _rows(3))
    c.close()
    name = _slab_file(store, "fp16").name if name == "slab" else name
    os.remove(store / name)
    if kind == "directory":
        os.mkdir(store / name)
    else:
        os.symlink("/dev/null", store / name)
    with pytest.raises(CacheError, match=r"is (a directory|not a regular file).*remove it"):
        _cache("fp16", "disk", path=store)


@pytest.mark.parametrize("value", [10**400, "9" * 400, "1" * 40 + "GiB", 2**63, float("inf")])
def test_absurd_budgets_are_refused_clearly(value):
    with pytest.raises(CacheError, match=r"budget=.*(larger than any machine|is not a size)"):
        FeatureCache("fp16", "host", value)


def test_budget_message_states_each_tiers_own_row_size():
    c = FeatureCache("fp32", "disk", 130)
    with pytest.raises(CacheError, match=r"disk: 136 B per sample, budget 130 B"):  # 24 B head + 108 B, padded to 8
        c.bind(FP, [((3, 5), torch.float32), ((12,), torch.float32)], "cpu")


@pytest.mark.parametrize("ids", [[2**63], [-(2**63) - 1], [1, 2**64]])
def test_ids_outside_int64_are_refused_clearly(ids):
    with pytest.raises(CacheError, match=r"outside int64.*fit in int64"):
        ids_to_keys(ids, "cache_ids")
    with pytest.raises(CacheError, match=r"outside int64"):
        _cache().fetch(ids, "cpu")


def test_deepcopy_and_pickle_of_a_disk_cache(tmp_path):
    import pickle

    c = _cache("fp16", "disk", path=tmp_path / "s")
    c.put(torch.arange(3), _rows(3))
    for d in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert len(d) == 0 and d.fingerprint is None and d.codec == "fp16" and d.path is None
        d.bind(FP, LAYOUT, "cpu")  # a private temporary disk tier: the original keeps its path and its lock
        d.put(torch.arange(2), _take(_rows(3), [0, 1]))
        assert d.stats()["path"] != c.stats()["path"]
    assert c.fetch(torch.arange(3), "cpu")[0].all()


def test_deepcopy_of_a_wrapped_model_with_a_disk_cache(tmp_path):
    import freezert

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fm = freezert.wrap(model, freeze=2, cache=FeatureCache("fp16", "disk", path=tmp_path / "s"))
    x = torch.randn(4, 8)
    want = fm(x)
    twin = copy.deepcopy(fm)  # Ultralytics' EMA does this
    torch.testing.assert_close(twin(x), want)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the same guarantees on the device tier, the pinned host tier read by the GPU, and a CUDA model's disk tier
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("where", ["cuda", "host"])
def test_cuda_tiny_rows_keep_their_precision(codec, where):
    c = FeatureCache(codec, where, "64MiB")
    c.bind(FP, LAYOUT, "cuda")
    x = [t.cuda() for t in _rows(6, seed=4)]
    x[1] = x[1] * 1e-8
    c.put(torch.arange(6), x)
    hit, got = c.fetch(torch.arange(6), "cuda")
    assert hit.all() and all(g.is_cuda for g in got)
    if where == "host":
        slab_codec = c.codec if not c.stats()["escaped"] else "fp32"
        assert c._index.tiers[0].slabs[(c._default, slab_codec)].stores[0].is_pinned()
    rel = {"fp16": 2**-11, "bf16": 2**-8, "fp8": 2**-4}[codec]
    for g, t in zip(got, x):
        amax = t.reshape(6, -1).abs().amax(1)
        assert ((g - t).reshape(6, -1).abs() <= amax[:, None] * rel).all()
    assert c.stats()["escaped_small"] == (6 if codec == "fp16" else 0)


@pytest.mark.cuda
def test_cuda_model_disk_tier_survives_a_truncated_slab(tmp_path):
    code = """
        import os, sys, torch
        from freezert.cache import FeatureCache
        lay = [((3, 5), torch.float32), ((7,), torch.float32)]
        c = FeatureCache("fp32", "disk", 8 * 112, sys.argv[1])
        c.bind("0123456789abcdef", lay, "cuda")
        x = [torch.randn(8, 3, 5, device="cuda"), torch.randn(8, 7, device="cuda")]
        c.put(torch.arange(8), x)
        (slab,) = [n for n in os.listdir(sys.argv[1]) if n.startswith("slab_")]
        os.truncate(os.path.join(sys.argv[1], slab), 0)
        for step in range(1, 4):
            c.put(torch.arange(8) + 100 * step, x)
        hit, rows = c.fetch(torch.arange(8) + 300, "cuda")
        assert hit.all() and rows[0].is_cuda and torch.equal(rows[0], x[0])
        print("ok")
    """
    r = _run(code, str(tmp_path / "s"))
    assert r.returncode == 0 and r.stdout.startswith("ok"), f"exit {r.returncode}: {r.stderr[-2000:]}"


@pytest.mark.cuda
def test_cuda_fetch_mixes_device_pinned_host_and_disk_rows(tmp_path):
    rb = 22 * 2
    c = FeatureCache("fp16", "auto", budget=3 * rb, host_budget=3 * rb, path=tmp_path / "d")
    c.bind(FP, LAYOUT, "cuda")
    x = [t.cuda() for t in _rows(9, seed=8)]
    c.put(torch.arange(9), x)
    assert c.stats()["rows_device"] == 3 and c.stats()["rows_host"] == 3 and c.stats()["rows_disk"] == 3
    perm = torch.randperm(9)
    hit, got = c.fetch(perm, "cuda")
    assert hit.all()
    for g, t in zip(got, x):
        assert torch.equal(g, t[perm.cuda()].half().float())


# ---------------------------------------------------------------------------------------------------------------
# through the wrapper: ids mode passes each row's content hash to fetch() and put()
# ---------------------------------------------------------------------------------------------------------------
def _tiny_wrapped():
    import freezert

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    return m, freezert.wrap(m, freeze=1, cache="fp32").eval()


def test_wrap_refuses_one_id_for_two_inputs():
    _, fm = _tiny_wrapped()
    with pytest.raises(CacheError, match="appears at positions 0 and 2"):
        fm(torch.randn(3, 4), cache_ids=[0, 1, 0])


def test_wrap_recomputes_an_augmented_sample_under_its_id():
    m, fm = _tiny_wrapped()
    fm(torch.randn(3, 4), cache_ids=[0, 1, 2])
    x2 = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="augmentation"):
        out = fm(x2, cache_ids=[0, 1, 2])
    torch.testing.assert_close(out, m(x2))


def test_wrap_cache_ids_beyond_int64_is_a_clear_error():
    _, fm = _tiny_wrapped()
    with pytest.raises(CacheError, match="outside int64"):
        fm(torch.randn(1, 4), cache_ids=[2**63])


def test_a_read_only_store_outlived_by_a_new_fingerprint_is_left_alone(tmp_path):
    store = tmp_path / "s"
    c = _cache("fp32", "disk", path=store)
    c.put(torch.arange(3), _rows(3))
    c.close()
    r = _cache("fp32", "auto", path=store, readonly=True)
    assert r.fetch(torch.arange(3), "cpu")[0].all()
    with pytest.warns(UserWarning, match="read-only cache store.*previous frozen setup"):
        r.bind(FP2, LAYOUT, "cpu")  # the weights changed: its rows are stale, and the store is not ours to wipe
    assert not r.fetch(torch.arange(3), "cpu")[0].any()
    r.put(torch.arange(2), _take(_rows(3), [0, 1]))  # kept in memory tiers
    assert r.fetch(torch.arange(2), "cpu")[0].all() and r.stats()["rows_disk"] == 0
    assert json.loads((store / "header.json").read_text())["fingerprint"] == FP and len(os.listdir(store)) == 3


def test_partial_hits_count_as_reuse_for_the_no_reuse_warning():
    c = _cache("fp32", budget="1GiB", epoch_rows=8)
    c.put(torch.arange(8), _rows(8))
    assert c.fetch(torch.arange(4) + 6, "cpu")[0].tolist() == [True, True, False, False]  # the batch is recomputed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.put(torch.arange(8) + 100, _rows(8))


def test_a_dropped_cache_in_a_reference_cycle_does_not_hold_the_lock(tmp_path):
    import gc

    c = _cache("fp32", "disk", path=tmp_path / "s")
    c.put(torch.arange(3), _rows(3))
    c.flush()
    cycle = [c]
    cycle.append(cycle)  # only the garbage collector can free it
    del c, cycle
    gc.disable()
    try:
        d = _cache("fp32", "disk", path=tmp_path / "s")  # the lock is retried after a collection
    finally:
        gc.enable()
    assert d.fetch(torch.arange(3), "cpu")[0].all()


def test_the_fingerprint_reads_the_codec_from_the_one_table(monkeypatch):
    import dataclasses

    from freezert import _codecs as codecs
    from freezert.cache import fingerprint_of

    w = [torch.randn(4, 3)]
    a = fingerprint_of(w, codec="fp16", bn="frozen")
    monkeypatch.setitem(codecs.CODECS, "fp16", dataclasses.replace(codecs.CODECS["fp16"], min_amax=0.0))
    assert fingerprint_of(w, codec="fp16", bn="frozen") != a  # rows stored under the old underflow rule: stale
    assert fingerprint_of(w, codec="custom", bn="frozen") == fingerprint_of(w, codec="custom", bn="frozen")
