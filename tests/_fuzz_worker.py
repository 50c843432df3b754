"""Property-based fuzzing of the native entry points and of the disk store against plain-torch references.

Run by tests/test_fuzz_cache.py in a subprocess (a segfault or SIGBUS there fails the test instead of killing
pytest): ``python tests/_fuzz_worker.py native|hash|disk EXAMPLES TMPDIR``. Prints "ok <examples>" on success.
"""

from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from freezert import CacheError, NativeError
from freezert import _native as nat
from freezert.cache import FeatureCache

CODECS = list(nat.CODECS)
IO = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [0.0, -0.0, 1e-8, -3e-39, 6e-5, 65504.0, 65520.0, 1e30, -1e38, 448.0, 1e-45, float("inf"), float("nan")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads may differ, as documented)."""
    if a.is_floating_point():
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        if not torch.equal(na, nb):
            return False
        return torch.equal(
            _bits(torch.where(na, torch.zeros_like(a), a)), _bits(torch.where(nb, torch.zeros_like(b), b))
        )
    return torch.equal(a, b)


@st.composite
def rows(draw, max_b=9, max_d=40):
    b, d = draw(st.integers(0, max_b)), draw(st.integers(0, max_d))
    dtype = draw(st.sampled_from(IO))
    scale = draw(st.sampled_from([1.0, 1e-8, 1e-30, 1e4, 1e37]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(b, d, generator=g) * scale
    if b * d and draw(st.booleans()):
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 4))):
            flat[draw(st.integers(0, b * d - 1))] = draw(st.sampled_from(SPECIAL))
    return x.to(dtype)


def fuzz_native(n: int) -> None:
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        src=rows(),
        codec=st.sampled_from(CODECS),
        extra=st.integers(0, 5),
        out_dtype=st.sampled_from(IO),
        seed=st.integers(0, 2**31),
        bad=st.sampled_from([None, "neg", "big", "dup", "int32", "alias", "short"]),
    )
    def run(src, codec, extra, out_dtype, seed, bad):
        b, d = src.shape
        n_rows = b + extra
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n_rows, generator=g)[:b] if n_rows else torch.zeros(0, dtype=torch.int64)
        store = torch.full((n_rows, d), 0x55 if codec == "fp8" else -7, dtype=nat.CODECS[codec])
        scales = torch.full((n_rows,), -1.0) if codec == "fp8" else None
        ref_s, ref_c = store.clone(), None if scales is None else scales.clone()
        if bad and b:
            bidx = idx.clone()
            if bad == "neg":
                bidx[0] = -1
            elif bad == "big":
                bidx[-1] = n_rows
            elif bad == "dup" and b > 1:
                bidx[1] = bidx[0]
            elif bad == "int32":
                bidx = bidx.int()
            elif bad == "short":
                bidx = bidx[:-1]
            try:
                if bad == "alias" and codec == "fp32" and d and n_rows:
                    nat.gather_decode(store, None, torch.zeros(1, dtype=torch.int64), store[:1], "fp32")
                else:
                    nat.encode_scatter(src, bidx, store, scales, codec)
                    nat.gather_decode(store, scales, bidx, torch.empty(bidx.shape[0], d), codec)
            except NativeError:
                pass
            else:
                assert bad in ("dup", "alias") and (b <= 1 or bad == "alias" or codec != "fp32"), bad
            return
        nat.encode_scatter(src, idx, store, scales, codec)
        nat.encode_scatter_reference(src, idx, ref_s, ref_c, codec)
        assert _same(store, ref_s), "encode_scatter differs from the reference"
        if codec == "fp8":
            assert _same(scales, ref_c), "fp8 scales differ from the reference"
        gi = torch.cat([idx, idx.flip(0)])
        out = torch.full((gi.shape[0], d), float("nan"), dtype=out_dtype)
        ref = torch.full_like(out, float("nan"))
        nat.gather_decode(store, scales, gi, out, codec)
        nat.gather_decode_reference(ref_s, ref_c, gi, ref, codec)
        assert _same(out, ref), "gather_decode differs from the reference"

    run()


def fuzz_hash(n: int) -> None:
    dtypes = [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.int8,
        torch.bool,
        torch.complex64,
    ]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        shape=st.lists(st.integers(0, 7), min_size=1, max_size=4),
        dtype=st.sampled_from(dtypes),
        view=st.sampled_from(["plain", "step", "transpose", "expand0", "expand_inner", "one", "neg"]),
        seed=st.integers(-(2**63), 2**64 - 1),
    )
    def run(shape, dtype, view, seed):
        x = (torch.randn(shape) * 100).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0
        if view == "step" and x.shape[-1] > 1:
            x = x[..., ::2]
        elif view == "transpose" and x.dim() > 1:
            x = x.transpose(0, -1)
        elif view == "expand0":
            x = x[:1].expand(5, *x.shape[1:]) if x.shape[0] else x
        elif view == "expand_inner":
            x = x[..., :1].expand(*x.shape[:-1], 6) if x.shape[-1] else x
        elif view == "one":
            x = x[:1, ..., ::3] if x.dim() > 1 else x[:1]
        elif view == "neg" and dtype.is_floating_point:
            x = torch.neg(x.conj()) if dtype.is_complex else x
        dense = torch.empty(x.shape, dtype=x.dtype).copy_(x)
        h = nat.hash_rows(x, seed=seed)
        assert torch.equal(h, nat.hash_rows(dense, seed=seed)), "view hashes differ from its dense copy"
        assert torch.equal(h, nat.hash_rows_reference(x, seed=seed)), "native hash differs from the reference"

    run()


def fuzz_disk(n: int, tmp: str) -> None:
    """A sequence of puts, fetches, damage and reopenings against a dict model: a served row is always exactly
    what was last stored under its key (codec fp32), whatever happened to the files."""
    layout = [((3,), torch.float32), ((2, 2), torch.float32)]
    fp = "00000000000000aa"
    ops = st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True)),
            st.tuples(st.just("fetch"), st.lists(st.integers(0, 30), min_size=1, max_size=8, unique=True)),
            st.tuples(st.just("flip"), st.integers(0, 10**6)),
            st.tuples(st.just("truncate"), st.integers(0, 10**6)),
            st.tuples(st.just("reopen"), st.booleans()),
            st.tuples(st.just("garbage_index"), st.just(0)),
        ),
        max_size=25,
    )
    counter, served_total = [0], [0]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(ops=ops, budget=st.sampled_from([10 * 64, 10**6]))
    @example(
        ops=[
            ("put", [1, 2, 3]),
            ("fetch", [1, 2, 3]),
            ("flip", 40),
            ("fetch", [3, 2, 1]),
            ("reopen", True),
            ("fetch", [1, 2, 3]),
            ("truncate", 100),
            ("put", [4]),
            ("fetch", [1, 4]),
        ],
        budget=10**6,
    )
    def run(ops, budget):
        counter[0] += 1
        path = os.path.join(tmp, f"s{counter[0]}")
        model: dict[int, list[torch.Tensor]] = {}
        gen = [0]

        def make(keys):
            gen[0] += 1
            return [
                torch.full((len(keys), *s), float(gen[0]))
                + torch.tensor(keys, dtype=torch.float32).view(-1, *[1] * len(s))
                for s, _ in layout
            ]

        def open_():
            c = FeatureCache("fp32", "disk", budget, path)
            c.bind(fp, layout, "cpu")
            return c

        c = open_()
        try:
            for op, arg in ops:
                slabs = [n for n in os.listdir(path) if n.startswith("slab_")] if os.path.isdir(path) else []
                slab_file = os.path.join(path, slabs[0] if slabs else "slab_none.bin")  # one layout: one slab
                if op == "put":
                    rows = make(arg)
                    c.put(torch.tensor(arg), rows)
                    for j, k in enumerate(arg):
                        model[k] = [r[j] for r in rows]
                elif op == "fetch":
                    hit, got = c.fetch(torch.tensor(arg), "cpu")
                    served = [k for k, h in zip(arg, hit.tolist()) if h]
                    served_total[0] += len(served)
                    for j, k in enumerate(served):
                        assert k in model and all(torch.equal(g[j], m) for g, m in zip(got, model[k])), (
                            f"key {k} served a row it was never given"
                        )
                elif op == "flip" and os.path.exists(slab_file) and os.path.getsize(slab_file):
                    size = os.path.getsize(slab_file)
                    with open(slab_file, "r+b") as f:
                        f.seek(arg % size)
                        b = f.read(1)
                        f.seek(arg % size)
                        f.write(bytes([b[0] ^ 0x41]))
                elif op == "truncate" and os.path.exists(slab_file):
                    os.truncate(slab_file, arg % (os.path.getsize(slab_file) + 1))
                elif op == "reopen":
                    if arg:
                        c.flush()
                    c.close()
                    c = open_()
                elif op == "garbage_index":
                    c.close()
                    with open(os.path.join(path, "index.pt"), "wb") as f:
                        f.write(b"\x00garbage")
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        c = open_()
        except CacheError as e:  # no CacheError is expected from these operations
            raise AssertionError(f"unexpected CacheError: {e}") from None
        finally:
            c.close()

    run()
    assert served_total[0] > 0, "the disk fuzzer never served a row: it tests nothing"


if __name__ == "__main__":
    what, n = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    if what == "native":
        fuzz_native(n)
    elif what == "hash":
        fuzz_hash(n)
    else:
        fuzz_disk(n, sys.argv[3])
    print("ok", n)
