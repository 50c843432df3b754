"""freezert._native: native kernels vs references, hash stability, codec bounds, boundary checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import freezert
from freezert import NativeError
from freezert import _native as nat

INFO = nat.native_info()
needs_native = pytest.mark.skipif(not INFO["built"], reason=f"freezert._C not built: {INFO['reason']}")

HASH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
HASH_SHAPES = [(7, 13), (5, 3, 11, 9), (6, 5), (4, 3), (9,), (3, 1, 7), (0, 5), (5, 0), (1, 70_001)]
IO_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODECS = list(nat.CODECS)

# Golden values: hashes are persisted (cache keys), so the algorithm must never drift.
ARANGE_4x6_F32 = [4367645694633070795, 5243377175072362639, -2327549195847194196, 4241774271845221618]


def _rand(shape, dtype, device="cpu"):
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if dtype in (torch.uint8, torch.int64):
        return torch.randint(0, 250, shape, device=device).to(dtype)
    return (torch.randn(shape, device=device) * 3).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so NaN payloads and -0.0 compare exactly)."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _store(n, d, codec, device="cpu"):
    """A store and scales filled with garbage, so rows the encoder forgets are visible."""
    store = torch.empty((n, d), dtype=nat.CODECS[codec], device=device)
    store.fill_(0x55 if codec == "fp8" else -7.0)
    scales = torch.full((n,), -1.0, device=device) if codec == "fp8" else None
    return store, scales


# ---------------------------------------------------------------------------------------
# info / loading
# ---------------------------------------------------------------------------------------
def test_native_info_keys():
    assert {"built", "cuda_compiled", "cuda_available", "version", "reason", "path"} <= set(INFO)
    assert isinstance(INFO["reason"], str) and isinstance(INFO["path"], str)
    if INFO["built"]:
        assert INFO["reason"] == "" and INFO["path"].endswith((".so", ".pyd"))
        assert INFO["version"] == freezert.__version__
    if INFO["cuda_available"]:
        assert INFO["cuda_compiled"]


def test_splitmix64_known_vector():
    # First output of the reference splitmix64 generator seeded with 0.
    assert nat._splitmix64(0) == 0xE220A8397B1DCDAF


def _run_py(code: str, **env) -> str:
    e = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_hash_stable_across_processes_and_golden():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert nat.hash_rows(x).tolist() == ARANGE_4x6_F32
    assert nat.hash_rows_reference(x).tolist() == ARANGE_4x6_F32
    out = _run_py(
        """
        import torch, freezert._native as n
        print(n.hash_rows(torch.arange(24, dtype=torch.float32).reshape(4, 6)).tolist())
        """
    )
    assert out.strip() == str(ARANGE_4x6_F32)


def test_no_native_env_falls_back(monkeypatch):
    monkeypatch.setenv("FREEZERT_NO_NATIVE", "1")
    nat._load.cache_clear()
    try:
        info = nat.native_info()
        assert info["built"] is False and info["path"] == "" and not info["cuda_available"]
        assert "FREEZERT_NO_NATIVE" in info["reason"]
        assert nat.hash_rows(torch.arange(24, dtype=torch.float32).reshape(4, 6)).tolist() == ARANGE_4x6_F32
        out, *_ = _roundtrip(torch.randn(3, 5), "fp16")
        assert not out.isnan().any()
    finally:
        monkeypatch.delenv("FREEZERT_NO_NATIVE")
        nat._load.cache_clear()
    assert nat.native_info()["built"] == INFO["built"]


@pytest.mark.slow
def test_no_native_wheel_is_pure_python(tmp_path):
    """FREEZERT_NO_NATIVE=1 at build time: the wheel builds, is py3-none-any and has no _C."""
    pytest.importorskip("setuptools")
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    (src / "freezert").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt"):
        shutil.copy(root / name, src / name)
    for name in ("__init__.py", "_errors.py", "_native.py"):
        shutil.copy(root / "freezert" / name, src / "freezert" / name)
    (src / "README.md").write_text("freezert\n")
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp_path)!r}))"
    env = dict(os.environ, FREEZERT_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FREEZERT_NO_NATIVE is set" in out.stderr
    wheel = tmp_path / out.stdout.strip().splitlines()[-1]
    assert wheel.name.endswith("py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "freezert/_native.py" in names and not any("_C" in n for n in names)


def test_force_reference_hook(monkeypatch):
    monkeypatch.setattr(nat, "_FORCE_REFERENCE", True)
    info = nat.native_info()
    assert info["built"] is False and "_FORCE_REFERENCE" in info["reason"]
    x = _rand((5, 3, 11), torch.float16)
    assert torch.equal(nat.hash_rows(x), nat.hash_rows_reference(x))
    store, scales = _store(6, 11, "fp8")
    src = torch.randn(4, 11)
    idx = torch.tensor([5, 0, 2, 3])
    nat.encode_scatter(src, idx, store, scales, "fp8")
    out = nat.gather_decode(store, scales, idx, torch.full((4, 11), float("nan")), "fp8")
    assert (out - src).abs().max() <= src.abs().amax() * 2**-4


# ---------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", HASH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", HASH_SHAPES, ids=str)
def test_hash_native_matches_reference(shape, dtype):
    x = _rand(shape, dtype)
    got = nat.hash_rows(x)
    assert got.dtype == torch.int64 and got.shape == (shape[0],)
    assert torch.equal(got, nat.hash_rows_reference(x))


def test_hash_pure_python_matches_numpy():
    for dtype, shape in [(torch.float16, (3, 5)), (torch.bool, (4, 3)), (torch.int64, (2, 2, 3))]:
        x = _rand(shape, dtype)
        x2, rows, row_bytes, seed = nat._hash_prepare("t", x, 11)
        b = nat._row_bytes_cpu(x2, rows, row_bytes)
        py = nat._hash_python([bytes(r) for r in b.tolist()], row_bytes, seed)
        assert py == nat.hash_rows_reference(x, seed=11).tolist()


def test_hash_sensitivity():
    x = torch.randn(6, 10)
    h = nat.hash_rows(x)
    y = x.clone()
    y[3, 7] = torch.nextafter(y[3, 7], torch.tensor(float("inf")))  # one ulp in one element
    hy = nat.hash_rows(y)
    assert hy[3] != h[3] and torch.equal(hy[torch.arange(6) != 3], h[torch.arange(6) != 3])
    assert not torch.equal(nat.hash_rows(x.view(torch.int32)), h)  # same bytes, other dtype
    assert not torch.equal(nat.hash_rows(x.reshape(6, 2, 5)), h)  # same bytes, other row shape
    assert not torch.equal(nat.hash_rows(x.reshape(6, 5, 2)), nat.hash_rows(x.reshape(6, 2, 5)))
    assert not torch.equal(nat.hash_rows(x, seed=1), h)
    assert nat.hash_rows(x[[2, 2]]).unique().numel() == 1  # equal rows, equal hashes
    # Rows differing only in zero padding of the tail: the byte count is mixed in.
    a, b = torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)
    assert nat.hash_rows(a)[0] != nat.hash_rows(b)[0]


def test_hash_noncontiguous_and_views():
    x = torch.randn(9, 14)
    assert torch.equal(nat.hash_rows(x.t()), nat.hash_rows(x.t().contiguous()))
    assert torch.equal(nat.hash_rows(x[:, ::2]), nat.hash_rows_reference(x[:, ::2].contiguous()))
    assert torch.equal(nat.hash_rows(x[2:5]), nat.hash_rows(x)[2:5])  # offset data_ptr
    assert torch.equal(nat.hash_rows(-x), nat.hash_rows((-x).clone()))


def test_hash_errors():
    with pytest.raises(NativeError, match=r"^hash_rows: x is a 0-d tensor; .*x\.reshape\(1\)$"):
        nat.hash_rows(torch.tensor(1.0))
    with pytest.raises(NativeError, match=r"^hash_rows: x is on device meta.*CPU or CUDA tensor"):
        nat.hash_rows(torch.empty(3, 4, device="meta"))
    with pytest.raises(NativeError, match=r"^hash_rows: x has dtype torch.float8_e8m0fnu, .*x\.float\(\)$"):
        nat.hash_rows(torch.zeros(3, 4, dtype=torch.float8_e8m0fnu))
    with pytest.raises(NativeError, match=r"^hash_rows: seed is a float; pass an int$"):
        nat.hash_rows(torch.zeros(3), seed=1.5)
    with pytest.raises(NativeError, match=r"^hash_rows: x is a list, not a torch.Tensor"):
        nat.hash_rows([1, 2, 3])
    with pytest.raises(NativeError, match=r"^hash_rows: x has layout torch.sparse_coo; .*to_dense"):
        nat.hash_rows(torch.eye(3).to_sparse())
    assert issubclass(NativeError, ValueError)


# ---------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------
def _roundtrip(src, codec, out_dtype=torch.float32, fn=(nat.encode_scatter, nat.gather_decode)):
    n, b, d = src.shape[0] + 4, src.shape[0], src.shape[1]
    store, scales = _store(n, d, codec)
    idx = torch.randperm(n)[:b]
    fn[0](src, idx, store, scales, codec)
    out = torch.full((b, d), float("nan"), dtype=out_dtype)
    fn[1](store, scales, idx, out, codec)
    return out, store, scales, idx


@needs_native
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("src_dtype", IO_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (33, 130), (5, 64)], ids=str)
def test_codec_native_bit_identical_to_reference(shape, src_dtype, codec):
    src = (torch.randn(shape) * 5).to(src_dtype)
    src[0, 0] = 0.0
    if shape[0] > 2:
        src[2] = 0.0  # all-zero row: fp8 scale 1
    n = shape[0] + 5
    idx = torch.randperm(n)[: shape[0]]
    s1, sc1 = _store(n, shape[1], codec)
    s2, sc2 = _store(n, shape[1], codec)
    nat.encode_scatter(src, idx, s1, sc1, codec)
    nat.encode_scatter_reference(src, idx, s2, sc2, codec)
    assert torch.equal(_bits(s1), _bits(s2))
    if codec == "fp8":
        assert torch.equal(_bits(sc1), _bits(sc2))
        if shape[0] > 2:
            assert sc1[idx[2]] == 1.0
    gidx = torch.cat([idx, idx.flip(0)])  # gathers may repeat rows
    for out_dtype in IO_DTYPES:
        o1 = torch.full((gidx.numel(), shape[1]), float("nan"), dtype=out_dtype)
        o2 = o1.clone()
        assert nat.gather_decode(s1, sc1, gidx, o1, codec) is o1
        nat.gather_decode_reference(s2, sc2, gidx, o2, codec)
        assert not o1.isnan().any()
        assert torch.equal(_bits(o1), _bits(o2))


def _sweep(limit: float) -> torch.Tensor:
    """Finite float32 values across every binade a codec meets: exact round-to-even ties for
    fp8 (3-bit), bf16 (7-bit) and fp16 (10-bit) mantissas, subnormals, overflow edges."""
    exps = torch.randint(-30, 18, (3000,)).float()
    vals = [(torch.rand(3000) + 1.0) * torch.exp2(exps)]
    for bits in (3, 7, 10):
        odd = 2 * torch.randint(0, 2 ** (bits - 1), (3000,)) + 1
        vals.append((1.0 + odd / 2.0 ** (bits + 1)) * torch.exp2(exps))  # halfway between neighbours
    vals.append(torch.arange(1, 2048, dtype=torch.float32) / 8)
    vals.append(
        torch.tensor(
            [
                448.0,
                447.9,
                464.0,
                2**-6,
                2**-9,
                2**-10,
                3 * 2**-11,
                2**-11,
                65504.0,
                65519.0,
                65520.0,
                2**-14,
                2**-24,
                2**-25,
                3 * 2**-26,
                1e-30,
                3e38,
            ]
        )
    )
    v = torch.cat(vals)
    v = torch.cat([v, -v, torch.tensor([0.0, -0.0])])
    return v[v.abs() <= limit]


@needs_native
@pytest.mark.parametrize("codec", CODECS)
def test_codec_conversions_match_torch_over_sweep(codec):
    vals = _sweep(448.0 if codec == "fp8" else 3.4e38)
    d = 97
    vals = torch.cat([vals, torch.zeros(-vals.numel() % (d - 1))]).reshape(-1, d - 1)
    src = torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], dim=1)  # amax 448: fp8 scale 1
    o1, s1, sc1, idx = _roundtrip(src, codec)
    o2, s2, sc2, _ = _roundtrip(src, codec, fn=(nat.encode_scatter_reference, nat.gather_decode_reference))
    if codec == "fp8":
        assert torch.equal(sc1[idx], torch.ones(idx.numel()))
    ref = src.to(torch.float8_e4m3fn if codec == "fp8" else nat.CODECS[codec]).float()
    assert torch.equal(_bits(o1), _bits(ref))
    assert torch.equal(_bits(o2), _bits(ref))


@needs_native
def test_codec_nonfinite_inputs():
    src = torch.tensor([[1.0, float("nan"), 2.0], [1e6, -1e6, float("inf")], [3.0, -4.0, 5.0]])
    for codec in CODECS:
        out, *_ = _roundtrip(src, codec)
        ref, *_ = _roundtrip(src, codec, fn=(nat.encode_scatter_reference, nat.gather_decode_reference))
        assert torch.equal(out.isnan(), ref.isnan()), codec
        assert torch.equal(out[~out.isnan()], ref[~ref.isnan()]), codec
        assert torch.equal(out[2], ref[2])


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_codec_roundtrip_error_bounds(native, monkeypatch):
    if native and not INFO["built"]:
        pytest.skip("freezert._C not built")
    monkeypatch.setattr(nat, "_FORCE_REFERENCE", not native)
    src = torch.randn(11, 37) * torch.logspace(-3, 3, 11)[:, None]
    out, *_ = _roundtrip(src, "fp32")
    assert torch.equal(out, src)
    h = src.half().float()  # fp16-representable values round-trip exactly
    out, *_ = _roundtrip(h, "fp16")
    assert torch.equal(out, h)
    out, *_ = _roundtrip(src.half(), "fp16", out_dtype=torch.float16)
    assert torch.equal(out, src.half())
    out, *_ = _roundtrip(src, "bf16")
    assert ((out - src).abs() <= src.abs() * 2**-8).all()
    out, *_ = _roundtrip(src, "fp8")
    amax = src.abs().amax(dim=1, keepdim=True)
    assert ((out - src).abs() <= amax * 2**-4).all()
    out16, *_ = _roundtrip(src, "fp8", out_dtype=torch.bfloat16)
    assert not out16.isnan().any()


@needs_native
def test_codec_large_batch_threads():
    src = torch.randn(700, 515)  # big enough to split across threads
    for codec in ("fp16", "fp8"):
        o1, s1, sc1, idx = _roundtrip(src, codec)
        store, scales = s1.clone(), None if sc1 is None else sc1.clone()
        o2 = nat.gather_decode_reference(store, scales, idx, torch.empty_like(o1), codec)
        assert torch.equal(o1, o2)


def test_codec_empty_batch_is_noop():
    store, scales = _store(4, 6, "fp8")
    before = store.clone()
    nat.encode_scatter(torch.empty(0, 6), torch.empty(0, dtype=torch.long), store, scales, "fp8")
    assert torch.equal(store, before)
    out = nat.gather_decode(store, scales, torch.empty(0, dtype=torch.long), torch.empty(0, 6), "fp8")
    assert out.shape == (0, 6)


# ---------------------------------------------------------------------------------------
# validation at the native boundary: one sentence naming the problem and the fix
# ---------------------------------------------------------------------------------------
def _gather_args(codec="fp8", b=3, n=5, d=4):
    store, scales = _store(n, d, codec)
    return dict(store=store, scales=scales, index=torch.tensor([0, 4, 2][:b]), out=torch.empty(b, d), codec=codec)


def _scatter_args(codec="fp8", b=3, n=5, d=4):
    store, scales = _store(n, d, codec)
    return dict(src=torch.randn(b, d), index=torch.tensor([0, 4, 2][:b]), store=store, scales=scales, codec=codec)


GATHER_ERRORS = [
    (
        dict(index=torch.tensor([0, 4, 2], dtype=torch.int32)),
        r"gather_decode: index has dtype torch.int32; pass a torch.int64 tensor, e.g. index.long()",
    ),
    (dict(codec="fp4"), r"gather_decode: codec 'fp4' is not supported; use one of 'fp32', 'fp16', 'bf16', 'fp8'"),
    (
        dict(store=torch.zeros(5, 4)),
        r"gather_decode: store has dtype torch.float32 but codec 'fp8' keeps rows in torch.uint8; "
        r"pass a store made by torch.empty\(N, D, dtype=torch.uint8\)",
    ),
    (
        dict(store=torch.zeros(5, 4, dtype=torch.float8_e4m3fn)),
        r"gather_decode: store has dtype torch.float8_e4m3fn but codec 'fp8' keeps rows in torch.uint8; "
        r"pass its raw bits, store.view\(torch.uint8\)$",
    ),
    (dict(out=torch.empty(3, 4, dtype=torch.int32)), r"gather_decode: out has dtype torch.int32; pass a .*float32"),
    (
        dict(scales=None),
        r"gather_decode: scales is None but codec 'fp8' needs the float32 per-row scales of shape \(5,\)",
    ),
    (
        dict(scales=torch.ones(4)),
        r"gather_decode: scales has shape \(4,\) but the store has 5 rows; pass scales of shape \(5,\)",
    ),
    (
        dict(scales=torch.ones(5, dtype=torch.float64)),
        r"gather_decode: scales has dtype torch.float64; .*scales.float\(\)",
    ),
    (dict(out=torch.empty(3, 5)), r"gather_decode: out has 5 columns but the store has D = 4; pass rows of width 4"),
    (dict(out=torch.empty(3, 4, 1)), r"gather_decode: out has shape \(3, 4, 1\); pass a 2-D \(B, D\) tensor"),
    (
        dict(store=torch.zeros(20, dtype=torch.uint8)),
        r"gather_decode: store has shape \(20,\); pass a 2-D \(N, D\) store",
    ),
    (
        dict(index=torch.tensor([0, 1])),
        r"gather_decode: index has shape \(2,\) but out has 3 rows; pass a 1-D index of length 3",
    ),
    (dict(index=torch.tensor([0, 5, 1])), r"gather_decode: index\[1\] = 5 is outside \[0, 5\) for a store of 5 rows"),
    (dict(index=torch.tensor([0, 1, -1])), r"gather_decode: index\[2\] = -1 is outside \[0, 5\)"),
    (
        dict(out=torch.empty(4, 3).t()),
        r"gather_decode: out is not contiguous \(strides \(1, 3\)\) and is written in place; allocate it contiguous",
    ),
    (
        dict(index=torch.tensor([0, 9, 4, 9, 2])[::2]),
        r"gather_decode: index is not contiguous \(strides \(2,\)\); pass index.contiguous\(\)",
    ),
    (
        dict(out=torch.empty(3, 4, device="meta")),
        r"gather_decode: out is on device meta, which has no data to read; pass a CPU or CUDA tensor",
    ),
    (dict(index=torch.tensor([0, 4, 2], device="meta")), r"gather_decode: index is on device meta"),
    (dict(out=[[0.0] * 4] * 3), r"gather_decode: out is a list, not a torch.Tensor; pass a tensor"),
]


@pytest.mark.parametrize("bad,msg", GATHER_ERRORS, ids=[m[:60] for _, m in GATHER_ERRORS])
@pytest.mark.parametrize("fn", [nat.gather_decode, nat.gather_decode_reference], ids=["native", "reference"])
def test_gather_validation_messages(fn, bad, msg):
    args = {**_gather_args(), **bad}
    out_before = (
        args["out"].clone() if isinstance(args["out"], torch.Tensor) and args["out"].device.type == "cpu" else None
    )
    with pytest.raises(NativeError, match="^" + msg) as exc:
        fn(**args)
    text = str(exc.value)
    assert text.count(";") == 1 and "\n" not in text  # one sentence: problem; fix
    if out_before is not None:
        assert torch.equal(_bits(args["out"]), _bits(out_before))  # nothing written


SCATTER_ERRORS = [
    (dict(src=torch.randn(3, 4).double()), r"encode_scatter: src has dtype torch.float64; .*src.float\(\)"),
    (dict(index=torch.tensor([0.0, 1.0, 2.0])), r"encode_scatter: index has dtype torch.float32; .*index.long\(\)"),
    (dict(src=torch.randn(3, 6)), r"encode_scatter: src has 6 columns but the store has D = 4"),
    (
        dict(src=torch.randn(4, 3).t()),
        r"encode_scatter: src is not contiguous \(strides \(1, 3\)\); pass src.contiguous\(\)",
    ),
    (dict(index=torch.tensor([0, 7, 1])), r"encode_scatter: index\[1\] = 7 is outside \[0, 5\)"),
    (
        dict(index=torch.tensor([2, 0, 2])),
        r"encode_scatter: index holds row 2 more than once; .*pass unique row indices$",
    ),
    (
        dict(store=torch.zeros(4, 5, dtype=torch.uint8).t()),
        r"encode_scatter: store is not contiguous .* written in place",
    ),
    (dict(codec="int8"), r"encode_scatter: codec 'int8' is not supported"),
    (
        dict(codec="fp16"),
        r"encode_scatter: store has dtype torch.uint8 but codec 'fp16' keeps rows in torch.float16; "
        r".*or the codec that matches the store$",
    ),
    (dict(src=torch.randn(3, 4, device="meta")), r"encode_scatter: src is on device meta"),
    (dict(scales=torch.ones(5, device="meta")), r"encode_scatter: scales is on device meta"),
]


@pytest.mark.parametrize("bad,msg", SCATTER_ERRORS, ids=[m[:60] for _, m in SCATTER_ERRORS])
@pytest.mark.parametrize("fn", [nat.encode_scatter, nat.encode_scatter_reference], ids=["native", "reference"])
def test_scatter_validation_messages(fn, bad, msg):
    args = {**_scatter_args(), **bad}
    store_before = args["store"].clone()
    with pytest.raises(NativeError, match="^" + msg) as exc:
        fn(**args)
    assert str(exc.value).count(";") == 1
    assert torch.equal(args["store"], store_before)


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a device; run on a lent GPU)
# ---------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_native_available():
    assert INFO["cuda_compiled"] and INFO["cuda_available"], INFO


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HASH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", HASH_SHAPES + [(3, 1_000_003), (100_000, 3)], ids=str)
def test_cuda_hash_matches_cpu(shape, dtype):
    x = _rand(shape, dtype)
    got = nat.hash_rows(x.cuda())
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), nat.hash_rows(x))
    assert torch.equal(got.cpu(), nat.hash_rows_reference(x))


@pytest.mark.cuda
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("src_dtype", IO_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (33, 128), (3, 1000), (257, 64)], ids=str)
@pytest.mark.parametrize("tier", ["device", "pinned"])
def test_cuda_codecs_match_reference(tier, shape, src_dtype, codec):
    src = (torch.randn(shape) * 5).to(src_dtype)
    if shape[0] > 2:
        src[2] = 0.0
    n = shape[0] + 5
    idx = torch.randperm(n)[: shape[0]]
    ref_store, ref_scales = _store(n, shape[1], codec)
    nat.encode_scatter_reference(src, idx, ref_store, ref_scales, codec)
    store, scales = _store(n, shape[1], codec, device="cuda")
    nat.encode_scatter(src.cuda(), idx.cuda(), store, scales, codec)
    assert torch.equal(_bits(store.cpu()), _bits(ref_store))
    if codec == "fp8":
        assert torch.equal(_bits(scales.cpu()), _bits(ref_scales))
    if tier == "pinned":  # host tier: the kernel reads pinned CPU memory through UVA
        store, scales = ref_store.pin_memory(), None if ref_scales is None else ref_scales.pin_memory()
    gidx = torch.cat([idx, idx.flip(0)])
    for out_dtype in IO_DTYPES:
        out = torch.full((gidx.numel(), shape[1]), float("nan"), dtype=out_dtype, device="cuda")
        nat.gather_decode(store, scales, gidx.cuda(), out, codec)
        ref = nat.gather_decode_reference(ref_store, ref_scales, gidx, torch.empty_like(out, device="cpu"), codec)
        assert torch.equal(_bits(out.cpu()), _bits(ref))


@pytest.mark.cuda
def test_cuda_scatter_into_pinned_store():
    src = torch.randn(9, 40, device="cuda")
    idx = torch.randperm(12)[:9]
    store, scales = (t.pin_memory() for t in _store(12, 40, "fp8"))
    nat.encode_scatter(src, idx.cuda(), store, scales, "fp8")
    torch.cuda.synchronize()
    ref_store, ref_scales = _store(12, 40, "fp8")
    nat.encode_scatter_reference(src.cpu(), idx, ref_store, ref_scales, "fp8")
    assert torch.equal(store, ref_store) and torch.equal(scales, ref_scales)


@pytest.mark.cuda
def test_cuda_validation_messages():
    store, scales = _store(5, 4, "fp16")
    out = torch.empty(3, 4, device="cuda")
    with pytest.raises(
        NativeError, match=r"^gather_decode: store is in pageable CPU memory but out is on cuda:0; pin it"
    ):
        nat.gather_decode(store, scales, torch.tensor([0, 1, 2], device="cuda"), out, "fp16")
    with pytest.raises(
        NativeError, match=r"^gather_decode: index is on cpu but out is on cuda:0; .*index.to\('cuda:0'\)"
    ):
        nat.gather_decode(store.cuda(), scales, torch.tensor([0, 1, 2]), out, "fp16")
    with pytest.raises(NativeError, match=r"^gather_decode: index\[0\] = 9 is outside \[0, 5\)"):
        nat.gather_decode(store.cuda(), scales, torch.tensor([9, 1, 2], device="cuda"), out, "fp16")
    with pytest.raises(NativeError, match=r"^gather_decode: store is on cuda:0 but out is on cpu"):
        nat.gather_decode(store.cuda(), scales, torch.tensor([0, 1, 2]), out.cpu(), "fp16")
    s8, sc8 = _store(5, 4, "fp8")
    with pytest.raises(NativeError, match=r"^gather_decode: scales is in pageable CPU memory; pin it"):
        nat.gather_decode(s8.pin_memory(), sc8, torch.tensor([0, 1, 2], device="cuda"), out, "fp8")


def test_cuda_fallback_warns_once_naming_the_fix():
    lib = nat._lib()
    if lib is None:
        pytest.skip("the native extension is not built here")
    if lib.cuda_compiled and nat._cuda_device_count() > 0:
        pytest.skip("the CUDA kernels run here: nothing falls back")
    nat._warn_cuda_fallback.cache_clear()
    with pytest.warns(
        RuntimeWarning, match=r"^freezert\._C .*plain-torch fallbacks.*; reinstall .*pip install -e \."
    ) as rec:
        assert nat._native_cuda() is None
        assert nat._native_cuda() is None
    assert sum("freezert._C" in str(w.message) for w in rec) == 1


# ---------------------------------------------------------------------------------------
# issue 10: aliased outputs, odd-strided views in the fallback, broadcast inputs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_gather_into_its_own_store_is_refused(native, monkeypatch):
    monkeypatch.setattr(nat, "_FORCE_REFERENCE", not native)
    store = torch.tensor([[0.0], [3.0], [6.0], [9.0]])
    with pytest.raises(NativeError, match=r"^gather_decode: out overlaps store in memory.*store.clone\(\)"):
        nat.gather_decode(store, None, torch.tensor([3, 2, 1, 0]), store, "fp32")  # was [9, 6, 6, 9]
    with pytest.raises(NativeError, match=r"out overlaps store"):
        nat.gather_decode(store, None, torch.tensor([3, 2]), store[2:], "fp32")
    out = nat.gather_decode(store, None, torch.tensor([3, 2, 1, 0]), torch.empty(4, 1), "fp32")
    assert out.flatten().tolist() == [9.0, 6.0, 3.0, 0.0]
    idx = torch.tensor([1, 0])
    with pytest.raises(NativeError, match=r"out overlaps index"):  # out written over the index it reads
        nat.gather_decode(torch.zeros(4, 2), None, idx, idx.view(torch.float32).view(2, 2), "fp32")


@pytest.mark.parametrize("codec", CODECS)
def test_scatter_from_its_own_store_is_refused(codec):
    store, scales = _store(6, 4, codec)
    if codec == "fp32":
        with pytest.raises(NativeError, match=r"^encode_scatter: store overlaps src in memory"):
            nat.encode_scatter(store[:2], torch.tensor([3, 4]), store, scales, codec)
    if codec == "fp8":
        src = scales[:4].view(1, 4)  # the scales are written: reading them as rows would race
        with pytest.raises(NativeError, match=r"^encode_scatter: scales overlaps src in memory"):
            nat.encode_scatter(src, torch.tensor([5]), store, scales, codec)
    src = torch.randn(2, 4)
    nat.encode_scatter(src, torch.tensor([3, 4]), store, scales, codec)  # separate tensors: fine


@pytest.mark.parametrize("native", [True, False])
def test_hash_one_element_and_empty_strided_views(native, monkeypatch):
    monkeypatch.setattr(nat, "_FORCE_REFERENCE", not native)
    base = torch.arange(24.0).reshape(4, 6)
    for v in (
        base[:, ::2][:1],
        base[::3, ::2][1:2],
        base[:, ::2][:0],
        base.t()[:1],
        base[:1, ::4][:, :1],
        base[:, ::2][:, :0],
    ):
        assert torch.equal(nat.hash_rows(v), nat.hash_rows(v.clone(memory_format=torch.contiguous_format)))
        assert torch.equal(nat.hash_rows_reference(v), nat.hash_rows_reference(v.contiguous().clone()))


def test_hash_of_a_broadcast_input_does_not_materialise_it():
    row = torch.randn(1, 2**16)
    x = row.expand(2**22, 2**16)  # 1 TiB if it were copied
    h = nat.hash_rows(x)
    assert h.shape == (2**22,) and bool((h == nat.hash_rows(row)[0]).all())
    assert torch.equal(nat.hash_rows_reference(row.expand(5, 2**16)), nat.hash_rows(row).expand(5))
    inner = torch.randn(6, 1).expand(6, 3 * 2**20)  # broadcast inside each row: hashed a chunk of rows at a time
    assert torch.equal(nat.hash_rows(inner), nat.hash_rows(inner.contiguous()))


@pytest.mark.cuda
def test_cuda_gather_and_scatter_refuse_overlap_and_pinned_host_gather_matches():
    store = torch.tensor([[0.0], [3.0], [6.0], [9.0]], device="cuda")
    with pytest.raises(NativeError, match="out overlaps store"):
        nat.gather_decode(store, None, torch.tensor([3, 2, 1, 0], device="cuda"), store, "fp32")
    with pytest.raises(NativeError, match="store overlaps src"):
        nat.encode_scatter(store[:2], torch.tensor([2, 3], device="cuda"), store, None, "fp32")
    host = store.cpu().pin_memory()
    out = nat.gather_decode(
        host, None, torch.tensor([3, 2, 1, 0], device="cuda"), torch.empty(4, 1, device="cuda"), "fp32"
    )
    assert out.flatten().tolist() == [9.0, 6.0, 3.0, 0.0]
    x = torch.randn(1, 300, device="cuda").expand(1000, 300)
    assert torch.equal(nat.hash_rows(x).cpu(), nat.hash_rows(x.cpu().contiguous()))
