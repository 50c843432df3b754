"""Picks the fast (Triton) path or the plain-torch reference for each op, and records which ran."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from .._native import on_device  # noqa: F401 (the ops' launches use it as reg.on_device)

TRITON = "triton"
INTERPRETER = "triton-interpreter"
REFERENCE = "reference"
LEAN = "lean"  # the plain-torch autograd Functions that save only what backward needs (any device)

# What a caller may ask an op for: "triton" (Triton where it runs, else the eager reference: the default),
# "lean" (the plain-torch lean Function everywhere), "auto" (Triton on CUDA, the lean Function elsewhere).
IMPLS = ("triton", "lean", "auto")

OPS = ("batch_norm_act", "layer_norm", "linear_cross_entropy")
# ops with only a plain-torch path: reported by backend() once they have run
_LEAN_ONLY = ("activation", "rms_norm", "batch_norm", "dropout")
_LAST: dict[str, str] = {}
# Test hook: when set, every output buffer the Triton path allocates is filled with NaN first,
# so an element the kernel forgets to write fails the comparison with the reference.
_POISON = False
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (imported lazily: ``import freezert.ops`` never needs it)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install without a driver
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not triton_available():
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older triton: the environment variable is all there is
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose(op: str, *tensors: torch.Tensor | None, supported: bool = True) -> str:
    """Path for ``op`` on these tensors: Triton on CUDA, the interpreter on CPU, else the reference.

    ``supported=False`` lets an op refuse a shape its kernels do not cover.
    """
    path = _choose(tensors, supported)
    _LAST[op] = path
    return path


def check_impl(impl: str) -> str:
    """``impl`` itself when it is one of ``IMPLS``; else a FreezeError naming the choices."""
    if impl not in IMPLS:
        from .._errors import FreezeError

        raise FreezeError(f"impl={impl!r} is not a kernel path; use one of {list(IMPLS)}")
    return impl


def lean_here(impl: str, *tensors: torch.Tensor | None) -> bool:
    """True when ``impl`` sends these tensors to the lean plain-torch path ("auto": anything not all-CUDA)."""
    if impl == "lean":
        return True
    if impl == "auto":
        return not all(t.device.type == "cuda" for t in tensors if isinstance(t, torch.Tensor))
    return False


def record(op: str, path: str) -> None:
    """Note that ``op`` just ran ``path`` (for ``backend()``)."""
    _LAST[op] = path


def _choose(tensors: tuple[Any, ...], supported: bool) -> str:
    if not supported or not triton_available():
        return REFERENCE
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts:
        return REFERENCE
    interp = interpreting()
    for t in ts:
        if t.is_floating_point() and t.dtype not in _FLOAT_DTYPES:
            return REFERENCE  # float64 and the like: the kernels compute in fp32 at most
        if interp:
            if t.device.type != "cpu" or t.dtype == torch.bfloat16:  # the interpreter has no bf16
                return REFERENCE
        elif t.device.type != "cuda":
            return REFERENCE
    return INTERPRETER if interp else TRITON


def backend() -> dict[str, str]:
    """For each op: the path that ran last, or the one a CUDA (CPU when interpreting) call would take."""
    if not triton_available():
        default = REFERENCE
    elif interpreting():
        default = INTERPRETER
    else:
        default = TRITON if torch.cuda.is_available() else REFERENCE
    report = {op: _LAST.get(op, default) for op in OPS}
    report.update({op: _LAST[op] for op in _LEAN_ONLY if op in _LAST})
    return report


def reset_backend() -> None:
    """Forget which paths ran (``backend()`` then reports the default path again)."""
    _LAST.clear()


def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled while the poison test hook is on."""
    out = torch.empty(*args, **kwargs)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``torch.empty_like`` (memory format preserved) for kernel outputs; NaN-filled under poison."""
    out = torch.empty_like(t, **kwargs)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def set_poison(on: bool) -> None:
    """Test hook: fill every kernel output with NaN before the kernel writes it."""
    global _POISON
    _POISON = bool(on)


def grid_programs(device: torch.device) -> int:
    """How many programs saturate the device: a few per SM on CUDA, a handful in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: fewer, bigger ones are faster
