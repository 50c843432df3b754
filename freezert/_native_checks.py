"""The checks every tensor passes before a pointer crosses into ``freezert._C``: dtype, device, shape, contiguity,
index bounds, aliasing; each failure is a :class:`freezert.NativeError` naming the problem and the fix."""

from __future__ import annotations

from typing import Any

import torch

from ._codecs import CODECS as _CODEC_TABLE
from ._codecs import IO_ELEM
from ._errors import NativeError

__all__ = ["check_tensor", "fail", "validate_rows_call"]

STORE_DTYPES: dict[str, torch.dtype] = {name: c.store for name, c in _CODEC_TABLE.items()}


def fail(msg: str) -> NativeError:
    return NativeError(msg)


def check_tensor(fn: str, name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise fail(f"{fn}: {name} is a {type(t).__name__}, not a torch.Tensor; pass a tensor")
    if t.layout != torch.strided:
        raise fail(f"{fn}: {name} has layout {t.layout}; pass a dense tensor, e.g. {name}.to_dense()")
    if t.device.type not in ("cpu", "cuda"):
        raise fail(
            f"{fn}: {name} is on device {t.device}, which has no data to read; "
            f"pass a CPU or CUDA tensor, e.g. {name}.to('cpu')"
        )


def _check_dtype(fn: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], fix: str) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise fail(f"{fn}: {name} has dtype {t.dtype}; pass a {names} tensor, e.g. {fix}")


def _check_contiguous(fn: str, name: str, t: torch.Tensor, written: bool) -> None:
    if t.is_contiguous():
        return
    if written:
        raise fail(
            f"{fn}: {name} is not contiguous (strides {tuple(t.stride())}) and is written in place; "
            f"allocate it contiguous, e.g. torch.empty({tuple(t.shape)}, dtype={t.dtype}, device='{t.device}')"
        )
    raise fail(f"{fn}: {name} is not contiguous (strides {tuple(t.stride())}); pass {name}.contiguous()")


def _check_codec(fn: str, codec: Any) -> str:
    if codec not in STORE_DTYPES:
        raise fail(f"{fn}: codec {codec!r} is not supported; use one of {', '.join(map(repr, STORE_DTYPES))}")
    return codec


def _check_index_bounds(fn: str, index: torch.Tensor, n_rows: int, *, unique: bool = False) -> None:
    """Every index within the store (and, with ``unique``, none twice), read back in one device sync."""
    if index.numel() == 0:
        return
    if unique:
        s = index.sort().values
        repeated = (s[1:] == s[:-1]).any() if s.numel() > 1 else s.new_zeros((), dtype=torch.bool)
        lo, hi, dup = (int(v) for v in torch.stack([s[0], s[-1], repeated.long()]).tolist())
    else:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(index)).tolist())
        dup = 0
    if lo >= 0 and hi < n_rows:
        if dup:
            twice = int(s[1:][s[1:] == s[:-1]][0])
            raise fail(
                f"{fn}: index holds row {twice} more than once; the rows of a scatter are written in parallel, "
                "so a row given twice could end up mixing both sources: pass unique row indices"
            )
        return
    bad = ((index < 0) | (index >= n_rows)).nonzero()[0, 0]
    pos, val = int(bad), int(index[bad])
    raise fail(
        f"{fn}: index[{pos}] = {val} is outside [0, {n_rows}) for a store of {n_rows} rows; "
        "pass row indices within the store (or allocate a larger store)"
    )


def _check_store(fn: str, store: torch.Tensor, scales: Any, codec: str) -> None:
    check_tensor(fn, "store", store)
    want = STORE_DTYPES[codec]
    if store.dtype != want:
        if codec == "fp8" and store.dtype == torch.float8_e4m3fn:
            fix = "pass its raw bits, store.view(torch.uint8)"
        else:
            fix = f"pass a store made by torch.empty(N, D, dtype={want}), or the codec that matches the store"
        raise fail(f"{fn}: store has dtype {store.dtype} but codec {codec!r} keeps rows in {want}; {fix}")
    if store.dim() != 2:
        raise fail(f"{fn}: store has shape {tuple(store.shape)}; pass a 2-D (N, D) store")
    _check_contiguous(fn, "store", store, written=True)
    if codec == "fp8":
        if scales is None:
            raise fail(
                f"{fn}: scales is None but codec 'fp8' needs the float32 per-row scales of shape "
                f"({store.shape[0]},); pass the scales tensor kept alongside the store"
            )
        check_tensor(fn, "scales", scales)
        _check_dtype(fn, "scales", scales, (torch.float32,), "scales.float()")
        if tuple(scales.shape) != (store.shape[0],):
            raise fail(
                f"{fn}: scales has shape {tuple(scales.shape)} but the store has {store.shape[0]} rows; "
                f"pass scales of shape ({store.shape[0]},)"
            )
        _check_contiguous(fn, "scales", scales, written=True)
        if scales.device != store.device:
            raise fail(
                f"{fn}: scales is on {scales.device} but store is on {store.device}; "
                f"keep scales on the store's device, e.g. scales.to('{store.device}')"
            )


def _check_rows(fn: str, name: str, t: torch.Tensor, store: torch.Tensor, index: torch.Tensor) -> None:
    if t.dim() != 2:
        raise fail(f"{fn}: {name} has shape {tuple(t.shape)}; pass a 2-D (B, D) tensor")
    if t.shape[1] != store.shape[1]:
        raise fail(
            f"{fn}: {name} has {t.shape[1]} columns but the store has D = {store.shape[1]}; "
            f"pass rows of width {store.shape[1]}"
        )
    if index.dim() != 1 or index.shape[0] != t.shape[0]:
        raise fail(
            f"{fn}: index has shape {tuple(index.shape)} but {name} has {t.shape[0]} rows; "
            f"pass a 1-D index of length {t.shape[0]}"
        )


def _check_placement(fn: str, name: str, t: torch.Tensor, index: torch.Tensor, store: torch.Tensor) -> bool:
    """Checks devices; returns True for the host tier (CUDA rows, pinned CPU store)."""
    if index.device != t.device:
        raise fail(
            f"{fn}: index is on {index.device} but {name} is on {t.device}; "
            f"put index on {name}'s device, e.g. index.to('{t.device}')"
        )
    if store.device == t.device:
        return False
    if t.device.type == "cuda" and store.device.type == "cpu":
        if not store.is_pinned():
            raise fail(
                f"{fn}: store is in pageable CPU memory but {name} is on {t.device}; "
                f"pin it (store = store.pin_memory()) so the GPU reads it directly, or move it to {t.device}"
            )
        # scales share the store's device (checked); pinned too, or the kernel cannot read them.
        return True
    raise fail(
        f"{fn}: store is on {store.device} but {name} is on {t.device}; put both on one device "
        f"(a CPU store serves a CUDA {name} only when pinned), e.g. store.to('{t.device}')"
    )


def _check_host_scales(fn: str, scales: Any, codec: str) -> None:
    if codec == "fp8" and not scales.is_pinned():
        raise fail(f"{fn}: scales is in pageable CPU memory; pin it like the store (scales = scales.pin_memory())")


def validate_rows_call(
    fn: str, name: str, rows: Any, index: Any, store: Any, scales: Any, codec: Any, *, written: bool
) -> bool:
    """Every check before a codec kernel touches ``rows`` (src when encoding, out when decoding), ``index`` and
    the store; returns True when the store is in (pinned) host memory and ``rows`` on a GPU."""
    codec = _check_codec(fn, codec)
    check_tensor(fn, name, rows)
    check_tensor(fn, "index", index)
    _check_store(fn, store, scales, codec)
    fix = f"torch.empty({tuple(rows.shape)}, dtype=torch.float32)" if written else f"{name}.float()"
    _check_dtype(fn, name, rows, tuple(IO_ELEM), fix)
    _check_dtype(fn, "index", index, (torch.int64,), "index.long()")
    _check_rows(fn, name, rows, store, index)
    _check_contiguous(fn, name, rows, written=written)
    _check_contiguous(fn, "index", index, written=False)
    host = _check_placement(fn, name, rows, index, store)
    if host:
        _check_host_scales(fn, scales, codec)
    sc = [("scales", scales)] if codec == "fp8" else []
    if written:  # gather: out is written, store/scales/index are read
        _check_no_overlap(fn, [(name, rows)], [("store", store), ("index", index), *sc])
    else:  # scatter: store and scales are written, src/index are read
        _check_no_overlap(fn, [("store", store), *sc], [(name, rows), ("index", index)])
        if sc:
            _check_no_overlap(fn, [("store", store)], sc)
    _check_index_bounds(fn, index, store.shape[0], unique=not written)
    return host


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_no_overlap(fn: str, written: list, read: list) -> None:
    """Refuses a written tensor sharing memory with another argument: the kernels read and write in parallel, so
    an aliased call gives results that depend on thread timing (all are contiguous here: spans are exact)."""
    for wn, w in written:
        for rn, r in read:
            if w.numel() == 0 or r.numel() == 0 or w.device.type != r.device.type:
                continue
            (a0, a1), (b0, b1) = _span(w), _span(r)
            if a0 < b1 and b0 < a1:
                raise fail(
                    f"{fn}: {wn} overlaps {rn} in memory (they share storage); the kernel would read what it "
                    f"writes: pass separate tensors, e.g. {rn}.clone()"
                )
