"""Ops forward+backward vs eager PyTorch and torch.compile: time and peak memory.

Run: ``pytest benchmarks/bench_ops.py`` (add ``--benchmark-only``; ``-k bn`` etc. to pick ops).
On CUDA: YOLO-head shapes, fp16/bf16, peak memory from the CUDA allocator. Without CUDA: tiny shapes,
Triton kernels through the interpreter (timings show the harness works, not kernel speed), no
peak memory and no torch.compile. A ratio table is printed at the end.
"""

from __future__ import annotations

import contextlib
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first `import triton` (freezert.ops imports it lazily, on first use)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from freezert import ops  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
IMPLS = ["eager", "compile", "freezert", "lean"]  # lean: the exact plain-torch ops (impl="lean")
_RESULTS: dict[str, dict[str, tuple[float, int | None, str]]] = {}

# (name, shape, dtype) per op; GPU shapes are the YOLO head / LM head sizes the kernels target.
if CUDA:
    BN_CASES = [
        ((48, 128, 64, 64), torch.float16),
        ((48, 256, 32, 32), torch.float16),
        ((48, 512, 16, 16), torch.float16),
        ((48, 256, 32, 32), torch.bfloat16),
    ]
    LN_CASES = [((48 * 197, 768), torch.float16), ((48 * 64, 1024), torch.bfloat16)]
    LCE_CASES = [((4096, 512, v), torch.bfloat16) for v in (100, 1000, 32000, 128000)]
    ROUNDS, WARMUP = 20, 3
else:
    BN_CASES = [((3, 19, 7, 9), torch.float32)]
    LN_CASES = [((37, 45), torch.float32)]
    LCE_CASES = [((29, 23, 101), torch.float32), ((29, 23, 1000), torch.float32)]
    ROUNDS, WARMUP = 3, 1


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _case_id(shape, dtype) -> str:
    return "x".join(map(str, shape)) + "-" + str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if not _RESULTS:
        return
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        _print_table(tr.write_line if tr is not None else print)


def _print_table(write) -> None:
    write("")
    write(f"freezert ops vs eager / torch.compile on {DEVICE} (time: mean per fwd+bwd; ratio < 1 means freezert wins)")
    write(f"{'case':<42} {'impl':<9} {'ms':>9} {'peak MiB':>9} {'t/eager':>8} {'t/compile':>9} {'m/eager':>8}  path")
    for case, row in _RESULTS.items():
        eager = row.get("eager")
        comp = row.get("compile")
        for impl in IMPLS:
            if impl not in row:
                continue
            t, mem, path = row[impl]
            mib = f"{mem / 2**20:9.1f}" if mem is not None else f"{'-':>9}"
            rt = f"{t / eager[0]:8.2f}" if eager else f"{'-':>8}"
            rc = f"{t / comp[0]:9.2f}" if comp else f"{'-':>9}"
            rm = f"{mem / eager[1]:8.2f}" if eager and mem is not None and eager[1] else f"{'-':>8}"
            write(f"{case:<42} {impl:<9} {t * 1e3:9.3f} {mib} {rt} {rc} {rm}  {path}")


def _measure(benchmark, case: str, impl: str, step, reset, op: str) -> None:
    """Time ``step`` (fwd+bwd) with pytest-benchmark, then its peak CUDA memory, and record both."""
    if impl == "compile" and not CUDA:
        pytest.skip("torch.compile is benchmarked on CUDA only (CPU inductor is not what the kernels target)")

    def run():
        step()
        _sync()

    reset()
    run()  # first call: compilation / autotuning outside the timed rounds
    benchmark.pedantic(run, setup=reset, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    peak = None
    if CUDA:
        reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["peak_bytes"] = peak
    path = ops.backend()[op] if impl in ("freezert", "lean") else impl
    benchmark.extra_info["path"] = path
    _RESULTS.setdefault(case, {})[impl] = (benchmark.stats.stats.mean, peak, path)


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def _clear(tensors):
    def reset():
        for t in tensors:
            t.grad = None

    return reset


def _maybe_compile(fn, impl):
    return torch.compile(fn) if impl == "compile" else fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", BN_CASES, ids=[_case_id(*c) for c in BN_CASES])
def test_bench_batch_norm_act(benchmark, impl, shape, dtype):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    x, w, b = _leaves(x, w, b)
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    g = torch.randn_like(x)

    def eager(x, w, b):
        return F.silu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

    fused = {"freezert": ops.batch_norm_act, "lean": ops.batch_norm_act_lean}
    fn = fused.get(impl) or _maybe_compile(eager, impl)
    args = (x, rm, rv, w, b, True, 0.1, 1e-5, "silu") if impl in fused else (x, w, b)
    _measure(
        benchmark,
        f"bn+silu {_case_id(shape, dtype)}",
        impl,
        lambda: fn(*args).backward(g),
        _clear([x, w, b]),
        "batch_norm_act",
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", LN_CASES, ids=[_case_id(*c) for c in LN_CASES])
def test_bench_layer_norm(benchmark, impl, shape, dtype):
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w, b = torch.randn(n, device=DEVICE).to(dtype), torch.randn(n, device=DEVICE).to(dtype)
    x, w, b = _leaves(x, w, b)
    g = torch.randn_like(x)
    ours = {"freezert": ops.layer_norm, "lean": ops.layer_norm_lean}
    fn = ours.get(impl) or _maybe_compile(F.layer_norm, impl)
    _measure(
        benchmark,
        f"layer_norm {_case_id(shape, dtype)}",
        impl,
        lambda: fn(x, (n,), w, b, 1e-5).backward(g),
        _clear([x, w, b]),
        "layer_norm",
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", LCE_CASES, ids=[_case_id(*c) for c in LCE_CASES])
def test_bench_linear_cross_entropy(benchmark, impl, shape, dtype):
    n, d, v = shape
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    w = (torch.randn(v, d, device=DEVICE) * d**-0.5).to(dtype)
    b = torch.zeros(v, device=DEVICE).to(dtype)
    x, w, b = _leaves(x, w, b)
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[::7] = -100
    if impl == "lean":
        pytest.skip("linear_cross_entropy has no separate lean path")

    def eager(x, w, t, b):
        return F.cross_entropy(F.linear(x, w, b), t)

    fn = ops.linear_cross_entropy if impl == "freezert" else _maybe_compile(eager, impl)
    _measure(
        benchmark,
        f"linear_ce {_case_id(shape, dtype)}",
        impl,
        lambda: fn(x, w, t, b).backward(),
        _clear([x, w, b]),
        "linear_cross_entropy",
    )
