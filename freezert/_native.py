"""Loads the native extension ``freezert._C`` and guards every pointer that crosses into it.

Each public function validates its tensors (dtype, device, shape, contiguity, index bounds)
and raises :class:`freezert.NativeError` with one sentence naming the problem and the fix
before any ``data_ptr()`` reaches C++. It then runs the native CPU or CUDA kernel when one
exists for the device combination, else the plain-torch/numpy reference (same results).

Set ``FREEZERT_NO_NATIVE=1`` to skip the native build at install time; set at run time it
also disables loading an installed ``freezert._C`` (everything runs the references).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import warnings
from typing import Any

import torch

from ._codecs import CODECS as _CODEC_TABLE
from ._codecs import IO_ELEM as _IO_ELEM
from ._native_checks import STORE_DTYPES, check_tensor, fail, validate_rows_call

__all__ = [
    "CODECS",
    "encode_scatter",
    "encode_scatter_reference",
    "gather_decode",
    "gather_decode_reference",
    "hash_rows",
    "hash_rows_reference",
    "native_info",
]

_ABI = 1  # must equal freezert::kAbiVersion in csrc/common.h
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
FP8_MAX = 448.0

# Test hook: when True, every function runs its reference as if freezert._C were missing.
_FORCE_REFERENCE = False

# Stable per-dtype tags mixed into the hash seed (never renumber: hashes are persisted).
_DTYPE_TAGS: dict[torch.dtype, int] = {}
for _tag, _name in enumerate(
    [
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "uint16",
        "uint32",
        "uint64",
    ],
    start=1,
):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPE_TAGS[getattr(torch, _name)] = _tag

# Codec name -> store dtype, and the element codes shared with csrc/common.h (enum Elem): read from the one codec
# table (freezert/_codecs.py, a leaf below this module and the cache).
CODECS: dict[str, torch.dtype] = STORE_DTYPES
_CODEC_ELEM = {name: c.elem for name, c in _CODEC_TABLE.items()}


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def _env_no_native() -> bool:
    return os.environ.get("FREEZERT_NO_NATIVE", "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.cache
def _load() -> tuple[Any, str]:
    """(module or None, reason it is not used)."""
    if _env_no_native():
        return None, "FREEZERT_NO_NATIVE is set, so freezert._C is not loaded; unset it to use the native kernels"
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (
            f"freezert._C is not importable ({exc}); freezert was installed without its native "
            "extension (FREEZERT_NO_NATIVE=1 at build time, or the build failed: run "
            "`pip install -v -e .` to see the build log)"
        )
    abi = getattr(_C, "ABI", None)
    if abi != _ABI:
        return None, (
            f"freezert._C at {getattr(_C, '__file__', '?')} is stale (ABI {abi}, expected {_ABI}); "
            "rebuild it with `pip install -e .`"
        )
    return _C, ""


def _lib() -> Any:
    return None if _FORCE_REFERENCE else _load()[0]


@functools.cache
def _cuda_device_count() -> int:
    lib = _load()[0]
    if lib is None or not lib.cuda_compiled:
        return 0
    return int(lib.cuda_device_count())


def _native_cuda() -> Any:
    """The module when its CUDA kernels can run here, else None (warning once why, when it was built)."""
    lib = _lib()
    if lib is None:
        return None  # not built, FREEZERT_NO_NATIVE or the test hook: native_info() says why
    if not lib.cuda_compiled or _cuda_device_count() == 0:
        _warn_cuda_fallback(lib)
        return None
    return lib


@functools.cache
def _warn_cuda_fallback(lib: Any) -> None:
    if not lib.cuda_compiled:
        why, fix = "was built without its CUDA kernels (no nvcc at install time)", "with nvcc on PATH"
    else:
        why = f"cannot run its CUDA kernels here ({lib.cuda_status()})"
        tv = torch.version.cuda
        fix = f"with an nvcc of torch's CUDA {tv} and a driver that supports it" if tv else "with a matching nvcc"
    warnings.warn(
        f"freezert._C {why}: CUDA tensors are hashed and encoded by the plain-torch fallbacks, which are "
        f"correct but slower; reinstall {fix} (pip install -e .) to use the kernels",
        RuntimeWarning,
        stacklevel=3,
    )


def on_device(t: torch.Tensor):
    """Makes ``t``'s CUDA device current around a launch (a no-op for CPU tensors). Native calls then never
    switch devices (which, on a thread with no CUDA context yet, would create one on device 0), and Triton,
    which launches on the current device, never reads a ``cuda:1`` tensor from device 0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def native_info() -> dict[str, Any]:
    """What the native extension provides here: built, CUDA compiled/usable, version, path, reason."""
    lib, reason = _load()
    if _FORCE_REFERENCE and lib is not None:
        lib, reason = None, "freezert._native._FORCE_REFERENCE is set (test hook): references only"
    info: dict[str, Any] = {
        "built": lib is not None,
        "cuda_compiled": bool(lib is not None and lib.cuda_compiled),
        "cuda_available": False,
        "version": str(getattr(lib, "__version__", "")) if lib is not None else "",
        "reason": reason,
        "path": str(getattr(lib, "__file__", "")) if lib is not None else "",
    }
    if info["cuda_compiled"]:
        info["cuda_available"] = _cuda_device_count() > 0
        info["cuda_archs"] = str(lib.cuda_archs)
        info["cuda_runtime_version"] = int(lib.cuda_runtime_version())
        info["cuda_reason"] = "" if info["cuda_available"] else str(lib.cuda_status())
    return info


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------------------------------
# row hashing
# ---------------------------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _hash_prepare(fn: str, x: Any, seed: Any) -> tuple[torch.Tensor, int, int, int]:
    """Validates; returns (x, not yet made contiguous, rows, bytes per row, mixed seed)."""
    check_tensor(fn, "x", x)
    if x.dim() == 0:
        raise fail(f"{fn}: x is a 0-d tensor; pass at least one dimension of rows, e.g. x.reshape(1)")
    if x.dtype not in _DTYPE_TAGS:
        raise fail(
            f"{fn}: x has dtype {x.dtype}, which has no stable hash tag; pass a bool, integer, "
            "floating or complex tensor, e.g. x.float()"
        )
    try:
        s = operator.index(seed) & _M64
    except TypeError:
        raise fail(f"{fn}: seed is a {type(seed).__name__}; pass an int") from None
    # Row identity = bytes + dtype + row shape: mix dtype and shape into the seed.
    row_shape = tuple(int(d) for d in x.shape[1:])
    s = _splitmix64(s ^ _DTYPE_TAGS[x.dtype])
    s = _splitmix64(s ^ len(row_shape))
    for d in row_shape:
        s = _splitmix64(s ^ d)
    x = x.detach().resolve_conj().resolve_neg()
    return x, int(x.shape[0]), math.prod(row_shape) * x.element_size(), s


_HASH_CHUNK = 64 << 20  # bytes of a non-contiguous input copied at a time


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the standard strides (``contiguous()`` keeps any stride on a size-1 or empty dimension)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _hash_rows_by_chunks(fn: str, x: torch.Tensor, seed: int, kernel) -> torch.Tensor:
    """Runs ``kernel(dense x, rows, row_bytes, mixed seed)`` without materialising a broadcast ``x``: rows that
    share their bytes (stride 0 on the batch dimension) are hashed once, other views a chunk of rows at a time."""
    x, rows, row_bytes, s = _hash_prepare(fn, x, seed)
    if rows > 1 and x.stride(0) == 0:  # every row is the same bytes (an expanded tensor)
        return _hash_rows_by_chunks(fn, x[:1], seed, kernel).expand(rows).contiguous()
    if x.is_contiguous():
        return kernel(x, rows, row_bytes, s)
    if row_bytes > _HASH_CHUNK and row_bytes > _available_bytes() // 2:
        raise fail(
            f"{fn}: x is a non-contiguous view whose rows take {row_bytes} bytes each, more than half the free "
            "memory, and hashing needs one row in memory at a time; hash a smaller view, or pass x.contiguous() "
            "if it fits"
        )
    step = max(1, _HASH_CHUNK // max(row_bytes, 1))
    parts = [kernel(_dense(x[lo : lo + step]), min(step, rows - lo), row_bytes, s) for lo in range(0, rows, step)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _row_bytes_cpu(x: torch.Tensor, rows: int, row_bytes: int) -> torch.Tensor:
    if rows * row_bytes == 0:
        return torch.zeros((rows, row_bytes), dtype=torch.uint8)
    flat = x.detach().cpu().reshape(-1)
    if flat.stride(0) != 1:  # a 1-element view keeps its odd stride through contiguous(); view(uint8) needs 1
        flat = _dense(flat)
    return flat.view(torch.uint8).reshape(rows, row_bytes)


def _hash_numpy(b: Any, row_bytes: int, seed: int) -> Any:
    import numpy as np

    rows = b.shape[0]
    words = (row_bytes + 7) // 8
    padded = np.zeros((rows, words * 8), dtype=np.uint8)
    padded[:, :row_bytes] = b
    w = padded.view("<u8")
    u = np.uint64
    with np.errstate(over="ignore"):

        def mix(z: Any) -> Any:
            z = z + u(_GOLDEN)
            z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
            return z ^ (z >> u(31))

        i = np.arange(words, dtype=np.uint64) * u(_GOLDEN)
        h = mix(w ^ i[None, :]).sum(axis=1, dtype=np.uint64)
        final = mix(h ^ mix(np.full(rows, row_bytes, dtype=np.uint64) ^ u(seed)))
    return final.view(np.int64)


def _hash_python(rows_of_bytes: list[bytes], row_bytes: int, seed: int) -> list[int]:
    out = []
    for row in rows_of_bytes:
        row = row + b"\0" * (-len(row) % 8)
        h = 0
        for i in range(len(row) // 8):
            h += _splitmix64(int.from_bytes(row[8 * i : 8 * i + 8], "little") ^ ((i * _GOLDEN) & _M64))
        f = _splitmix64((h & _M64) ^ _splitmix64(row_bytes ^ seed))
        out.append(f - (1 << 64) if f >> 63 else f)
    return out


def hash_rows_reference(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Pure numpy (or, without numpy, pure Python) version of :func:`hash_rows`; same values."""
    return _hash_rows_by_chunks("hash_rows_reference", x, seed, _hash_reference_kernel)


def _hash_reference_kernel(x: torch.Tensor, rows: int, row_bytes: int, s: int) -> torch.Tensor:
    b = _row_bytes_cpu(x, rows, row_bytes)
    try:
        import numpy  # noqa: F401
    except ImportError:
        vals = _hash_python([bytes(r) for r in b.tolist()], row_bytes, s)
        return torch.tensor(vals, dtype=torch.int64).to(x.device)
    return torch.from_numpy(_hash_numpy(b.numpy(), row_bytes, s)).to(x.device)


def hash_rows(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """64-bit content hash of each row ``x[i]`` (bytes, dtype and row shape), as int64 on x's device.

    Per row: view the bytes as little-endian uint64 words w_i (zero-padded tail),
    ``h = sum_i splitmix64(w_i ^ i * 0x9E3779B97F4A7C15) mod 2**64``, then
    ``splitmix64(h ^ splitmix64(row_bytes ^ seed'))`` where seed' mixes ``seed``, the dtype
    and the row shape. Identical on CPU and CUDA, across runs and processes. A broadcast
    (expanded) input is hashed without materialising it.
    """
    return _hash_rows_by_chunks("hash_rows", x, seed, _hash_kernel)


def _hash_kernel(x: torch.Tensor, rows: int, row_bytes: int, s: int) -> torch.Tensor:
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    if x.device.type == "cpu" and (lib := _lib()) is not None:
        lib.hash_rows_cpu(x.data_ptr(), rows, row_bytes, s, out.data_ptr())
        return out
    if x.device.type == "cuda" and (lib := _native_cuda()) is not None:
        with on_device(x):
            lib.hash_rows_cuda(x.data_ptr(), rows, row_bytes, s, out.data_ptr(), x.device.index, _stream(x.device))
        return out
    return _hash_reference_kernel(x, rows, row_bytes, s)


# ---------------------------------------------------------------------------------------
# feature-cache codecs
# ---------------------------------------------------------------------------------------
def _fp8_encode_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 e4m3fn bits, float32 per-row scale) for float32 rows x."""
    amax = x.abs().amax(dim=1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
    q = (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return q, scale


def _validate_scatter(src: Any, index: Any, store: Any, scales: Any, codec: Any) -> bool:
    return validate_rows_call("encode_scatter", "src", src, index, store, scales, codec, written=False)


def _validate_gather(store: Any, scales: Any, index: Any, out: Any, codec: Any) -> bool:
    return validate_rows_call("gather_decode", "out", out, index, store, scales, codec, written=True)


def encode_scatter_reference(
    src: torch.Tensor, index: torch.Tensor, store: torch.Tensor, scales: torch.Tensor | None, codec: str
) -> None:
    """Plain-torch ``store[index[i]] = encode(src[i])`` (and ``scales[index[i]]`` for fp8)."""
    _validate_scatter(src, index, store, scales, codec)
    _encode_scatter_reference(src, index, store, scales, codec)


def _encode_scatter_reference(src, index, store, scales, codec) -> None:
    if src.shape[0] == 0 or src.shape[1] == 0:
        return
    x = src.float()
    idx = index.to(store.device)
    if codec == "fp8":
        q, scale = _fp8_encode_reference(x)
        store[idx] = q.to(store.device)
        scales[idx] = scale.to(store.device)
    else:
        store[idx] = x.to(store.dtype).to(store.device)


def gather_decode_reference(
    store: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, out: torch.Tensor, codec: str
) -> torch.Tensor:
    """Plain-torch ``out[i] = decode(store[index[i]])`` (times the row scale for fp8); returns out."""
    _validate_gather(store, scales, index, out, codec)
    return _gather_decode_reference(store, scales, index, out, codec)


def _gather_decode_reference(store, scales, index, out, codec) -> torch.Tensor:
    if out.shape[0] == 0 or out.shape[1] == 0:
        return out
    idx = index.to(store.device)
    rows = store[idx]
    if codec == "fp8":
        vals = rows.view(torch.float8_e4m3fn).float() * scales[idx][:, None]
    else:
        vals = rows.float()
    out.copy_(vals.to(out.dtype))
    return out


def encode_scatter(
    src: torch.Tensor, index: torch.Tensor, store: torch.Tensor, scales: torch.Tensor | None, codec: str
) -> None:
    """``store[index[i]] = encode(src[i])`` for codec fp32/fp16/bf16/fp8 (fp8 also sets ``scales``).

    ``src`` (B, D) float32/float16/bfloat16; ``index`` int64 (B,); ``store`` (N, D) of the
    codec's dtype (uint8 e4m3fn bits for fp8, with float32 ``scales`` (N,); ignored otherwise).
    fp8 rows are stored as ``clamp(x / scale, ±448)`` with ``scale = amax(|row|) / 448`` (1 for
    an all-zero row). A CUDA ``src`` may write a pinned CPU store directly (synchronise the
    stream before the CPU reads it). Duplicate indices are refused (NativeError): rows are written in parallel.
    """
    host = _validate_scatter(src, index, store, scales, codec)
    batch, dim = int(src.shape[0]), int(src.shape[1])
    if batch == 0 or dim == 0:
        return
    sc = scales.data_ptr() if codec == "fp8" else 0
    args = (
        src.data_ptr(),
        _IO_ELEM[src.dtype],
        index.data_ptr(),
        batch,
        dim,
        store.data_ptr(),
        _CODEC_ELEM[codec],
        sc,
        int(store.shape[0]),
    )
    if src.device.type == "cpu" and (lib := _lib()) is not None:
        lib.encode_scatter_cpu(*args)
    elif src.device.type == "cuda" and (lib := _native_cuda()) is not None:
        with on_device(src):
            lib.encode_scatter_cuda(*args, host, src.device.index, _stream(src.device))
    else:
        _encode_scatter_reference(src, index, store, scales, codec)


def gather_decode(
    store: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, out: torch.Tensor, codec: str
) -> torch.Tensor:
    """``out[i] = decode(store[index[i]])`` (times ``scales[index[i]]`` for fp8); returns ``out``.

    ``out`` (B, D) float32/float16/bfloat16 on CPU or CUDA. A CUDA ``out`` may read a pinned
    CPU store (the cache's host tier) through its device-visible address, with no staging copy.
    Error bounds of an encode/decode round trip to float32: fp32 exact; fp16 exact for
    fp16-representable values (else round-to-nearest-even, 2**-11 relative); bf16 at most
    2**-8 relative (round-to-nearest-even, 8 significant bits); fp8 at most 2**-4 times the
    row's amax (e4m3: 4 significant bits, relative 2**-4 of the value for normals, and
    subnormals below 2**-6 * scale are within 2**-10 * scale).
    """
    host = _validate_gather(store, scales, index, out, codec)
    batch, dim = int(out.shape[0]), int(out.shape[1])
    if batch == 0 or dim == 0:
        return out
    sc = scales.data_ptr() if codec == "fp8" else 0
    args = (
        store.data_ptr(),
        _CODEC_ELEM[codec],
        sc,
        index.data_ptr(),
        batch,
        dim,
        int(store.shape[0]),
        out.data_ptr(),
        _IO_ELEM[out.dtype],
    )
    if out.device.type == "cpu" and (lib := _lib()) is not None:
        lib.gather_decode_cpu(*args)
    elif out.device.type == "cuda" and (lib := _native_cuda()) is not None:
        with on_device(out):
            lib.gather_decode_cuda(*args, host, out.device.index, _stream(out.device))
    else:
        _gather_decode_reference(store, scales, index, out, codec)
    return out
