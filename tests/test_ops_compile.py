"""Ahead-of-time compile of every Triton kernel for a GPU that is not here (sm_90 by default).

The interpreter tests (TRITON_INTERPRET=1) never run Triton's compiler, so type errors of
loop-carried values, non-constexpr shapes, unsupported ops or bf16 problems only show on a GPU.
``triton.compile`` needs no driver: given a target it lowers a kernel to PTX and runs ptxas.

The launches are not guessed. The worker (this file run as a script, with TRITON_INTERPRET=0)
drives each op's autograd.Function forward and backward on ``meta`` tensors with every kernel
replaced by a recorder, so the launchers themselves compute grids, constexprs and arguments.
Each recorded launch is then specialised exactly as ``kernel[grid](...)`` would do it on a GPU
(same binder, same ``_pack_args``) and compiled for the target.

The test process has TRITON_INTERPRET=1 (tests/conftest.py) and ``_kernels()`` is cached, so the
kernels there are interpreter objects: one subprocess does the whole file's work instead.

    python tests/test_ops_compile.py              # the small set the test compiles, sm_90
    python tests/test_ops_compile.py --full --arch 90 80   # the full sweep (slow)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMS = 132  # H100 SXM / H200: the launchers size their grids from the SM count
DTYPES = ("float32", "float16", "bfloat16")
OPS = ("batch_norm_act", "layer_norm", "linear_cross_entropy")


# ----------------------------------------------------------------------------- configurations


def _configs(full: bool) -> list[tuple]:
    """(op, label, params) for each launcher run; each run records every kernel launch it makes."""
    out = []
    if full:
        bn_shapes = [(48, c, hw, hw) for c in (128, 256, 512) for hw in (16, 32, 64)]
        bn_shapes += [(48, 129, 20, 20), (2, 5, 1, 1), (29, 5), (3, 5, 11), (2, 3, 4, 5, 6)]  # odd sizes, ranks
        layouts, acts, trainings = (False, True), ("silu", "relu", "identity"), (True, False)
        ln_rows, ln_m = (768, 4096, 1000, 16384, 1), (4096, 37, 1)
        lce = [(v, d, n) for v in (32000, 128000) for d in (512, 768) for n in (4096,)] + [(10, 7, 1), (5000, 64, 3)]
    else:  # one configuration per kernel per dtype and the constexpr branches: keeps the test short
        bn_shapes, layouts, acts, trainings = [(48, 128, 32, 32)], (False, True), ("silu",), (True,)
        ln_rows, ln_m = (768,), (4096,)
        lce = [(32000, 512, 1024)]
    for dt in DTYPES:
        bn = [
            (shape, cl, act, training, params)
            for shape in bn_shapes
            for cl in layouts
            for act in acts
            for training in trainings
            for params in ("fp32", "same")  # AMP-style fp32 params, or a .half() model's
            if full or (params == "same") == (dt == "float16")
        ]
        if not full:  # the eval-mode backward (TRAINING=False) and the other activations
            bn += [
                ((48, 256, 16, 16), True, "relu", False, "fp32"),
                ((48, 256, 16, 16), False, "identity", False, "fp32"),
            ]
        for shape, cl, act, training, params in bn:
            label = f"{dt} {shape} {'cl' if cl else 'nchw'} {act} {'train' if training else 'eval'} params={params}"
            out.append(
                (
                    "batch_norm_act",
                    label,
                    {"dtype": dt, "shape": shape, "cl": cl, "act": act, "training": training, "params": params},
                )
            )
        for n in ln_rows:
            for m in ln_m:
                for w, b in ((True, True), (True, False), (False, False)) if full else ((True, True),):
                    out.append(
                        (
                            "layer_norm",
                            f"{dt} rows={n} M={m} weight={w} bias={b}",
                            {"dtype": dt, "n": n, "m": m, "w": w, "b": b},
                        )
                    )
        for v, d, n in lce:
            for red, grad in (("mean", True), ("none", True), ("mean", False)):
                out.append(
                    (
                        "linear_cross_entropy",
                        f"{dt} V={v} D={d} N={n} {red}{'' if grad else ' no-grad'}",
                        {"dtype": dt, "v": v, "d": d, "n": n, "reduction": red, "grad": grad},
                    )
                )
    return out


# ----------------------------------------------------------------------------- worker (subprocess)


class _Ptr:
    """What a CUDA tensor looks like to Triton's specialiser: a dtype and an address.

    The base is 256-byte aligned like the CUDA caching allocator's blocks; views keep their offset,
    so a slice that is not 16-byte aligned is specialised as such, as on the GPU."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 32) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


class _Recorder:
    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import torch

            conv = tuple(_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args)
            self.log.append((self.name, self.kernel, grid, conv, dict(kwargs)))

        return launch


def _record(op: str, p: dict) -> list:
    """Run op's autograd.Function forward + backward on meta tensors; return the kernel launches."""
    from types import SimpleNamespace

    import torch

    mod = importlib.import_module(f"freezert.ops.{op}")  # the module: freezert.ops re-exports its function
    log: list = []
    real = mod._kernels()
    rec = SimpleNamespace(**{k: _Recorder(f"{op}.{k}", v, log) for k, v in vars(real).items()})
    saved = mod._kernels
    mod._kernels = lambda: rec
    dt = getattr(torch, p["dtype"])
    meta = {"device": "meta"}
    try:
        if op == "batch_norm_act":
            shape = p["shape"]
            n, c = shape[:2]
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape)) if p["cl"] else None
            x = torch.empty(shape, dtype=dt, memory_format=fmt or torch.contiguous_format, **meta)
            x.requires_grad_()
            pdt = torch.float32 if p["params"] == "fp32" else dt
            weight = torch.empty(c, dtype=pdt, **meta).requires_grad_()
            bias = torch.empty(c, dtype=pdt, **meta).requires_grad_()
            rm, rv = torch.empty(c, dtype=pdt, **meta), torch.empty(c, dtype=pdt, **meta)
            y, _, _ = mod._BatchNormAct.apply(
                x, rm, rv, weight, bias, p["training"], 0.1, 1e-5, mod._act_code(p["act"])
            )
            y.backward(torch.empty_like(y))
        elif op == "layer_norm":
            x = torch.empty(p["m"], p["n"], dtype=dt, **meta).requires_grad_()
            weight = torch.empty(p["n"], dtype=dt, **meta).requires_grad_() if p["w"] else None
            bias = torch.empty(p["n"], dtype=dt, **meta).requires_grad_() if p["b"] else None
            y = mod._LayerNorm.apply(x, weight, bias, p["n"], 1e-5)
            y.backward(torch.empty_like(y))
        else:
            v, d, n = p["v"], p["d"], p["n"]
            x = torch.empty(n, d, dtype=dt, **meta).requires_grad_(p["grad"])
            weight = torch.empty(v, d, dtype=dt, **meta).requires_grad_(p["grad"])
            target = torch.empty(n, dtype=torch.int64, **meta)
            chunk = max(1, min(n, mod._CHUNK_ELEMENTS // v))  # as linear_cross_entropy() picks it
            loss = mod._LinearCrossEntropy.apply(x, weight, target, None, -100, 0.1, p["reduction"], chunk, dt)
            if p["grad"]:
                loss.backward(torch.empty_like(loss))
    finally:
        mod._kernels = saved
    return log


def _specialise(kernel, args, kwargs, target):
    """Signature, constexprs, attrs and options of one launch, exactly as JITFunction.run finds them."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # newer Tritons only (not 3.6)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _worker(full: bool, archs: list[int]) -> int:
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not knobs.runtime.interpret, "the worker needs TRITON_INTERPRET=0"
    from freezert.ops import _registry as reg

    reg.grid_programs = lambda device: 4 * SMS  # what the launchers compute on an H100 / H200
    every = sorted(f"{op}.{k}" for op in OPS for k in vars(importlib.import_module(f"freezert.ops.{op}")._kernels()))
    print(json.dumps({"kernels": every}), flush=True)
    failures = 0
    seen = set()
    for op, label, params in _configs(full):
        for name, kernel, grid, args, kwargs in _record(op, params):
            for arch in archs:
                target = GPUTarget("cuda", arch, 32)
                options, sig, constexprs, attrs = _specialise(kernel, args, kwargs, target)
                key = (name, arch, repr(sig), repr(sorted(constexprs.items())), repr(attrs), repr(options))
                if key in seen:  # the same specialisation from another configuration: compiled already
                    continue
                seen.add(key)
                res = {
                    "kernel": name,
                    "config": label,
                    "arch": arch,
                    "grid": list(grid),
                    "signature": sig,
                    "constexprs": {".".join(map(str, k)): v for k, v in constexprs.items()},
                    "num_warps": options.num_warps,
                }
                t0 = time.perf_counter()
                try:
                    compiled = triton.compile(
                        ASTSource(kernel, sig, constexprs, attrs), target=target, options=options.__dict__
                    )
                except Exception as e:
                    res.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
                else:
                    cubin = compiled.asm.get("cubin") or b""
                    res.update(ok=len(cubin) > 0, cubin=len(cubin), shared=compiled.metadata.shared)
                res["seconds"] = round(time.perf_counter() - t0, 2)
                failures += not res["ok"]
                print(json.dumps(res, default=str), flush=True)
    return 1 if failures else 0


# ----------------------------------------------------------------------------- the test


def _skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:
        return f"triton does not import: {e}"
    if "nvidia" not in backends:
        return "the installed triton has no CUDA (nvidia) backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as e:
        return f"triton's CUDA backend has no usable ptxas: {e}"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"ptxas not found or not executable ({ptxas!r})"
    return None


def test_kernels_compile_for_sm90(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, __file__, "--arch", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "kernel" in r]
    failed = [r for r in results if not r["ok"]]
    detail = "\n".join(f"{r['kernel']} [{r['config']}]: {r.get('error', 'no cubin')}" for r in failed)
    assert not failed, f"{len(failed)} kernel(s) failed to compile for sm_90:\n{detail}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    every = next(r["kernels"] for r in lines if "kernels" in r)
    compiled = {r["kernel"] for r in results}
    assert every and compiled == set(every), f"never launched by the configurations: {set(every) - compiled}"
    for name in every:  # each kernel compiled for each input dtype
        ptrs = {v for r in results if r["kernel"] == name for v in r["signature"].values()}
        if name != "batch_norm_act.finalize":  # finalize reads the fp32 partials (and the running stats)
            assert {"*fp32", "*fp16", "*bf16"} <= ptrs, (name, ptrs)
    assert all(r["cubin"] > 0 for r in results)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every shape / layout / activation of the sweep")
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="SM versions to compile for")
    a = ap.parse_args()
    sys.exit(_worker(a.full, a.arch))
