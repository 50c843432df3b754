"""The one codec table: how each feature-cache codec stores a row, its precision and the range it keeps.

A leaf below both of its readers: the native wrappers (``freezert._native``: store dtype and element code) and the
cache (``freezert.cache``: tiers, disk records, the escape rule below, the fingerprint, the codec ladders). Never
renumber ``elem``: it crosses into csrc/common.h (enum Elem).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CODECS", "ESCAPE", "IO_DTYPES", "IO_ELEM", "Codec", "escape_kind", "store_dtypes"]


@dataclass(frozen=True)
class Codec:
    """One codec: store dtype and element code, bytes per element, per-row scale, kept range and precision."""

    name: str
    store: torch.dtype  # dtype of the store tensor (uint8 holding e4m3fn bits for fp8)
    elem: int  # element code shared with csrc/common.h
    itemsize: int  # bytes per stored element
    scaled: bool  # a float32 scale per row and boundary tensor (fp8)
    max_amax: float  # a row-tensor whose max |x| exceeds this is escaped (overflow)
    min_amax: float  # a nonzero row-tensor whose max |x| is below this is escaped (underflow)
    rel: float  # round-trip error bound, relative to the row-tensor's max |x|

    def row_bytes(self, dims: list[int]) -> int:
        """Encoded bytes of one sample whose boundary tensors have ``dims`` elements (scales included)."""
        return sum(dims) * self.itemsize + (4 * len(dims) if self.scaled else 0)


_INF = float("inf")
# min_amax: the smallest row-tensor amax for which every element keeps |error| <= rel * amax. fp16/bf16 round
# to a fixed absolute step below their smallest normal (2^-14, 2^-126), so a row-tensor whose largest value is
# below it would lose all relative precision (zeros or a few subnormal bits): it is escaped to fp32 instead.
# fp8 scales each row-tensor by amax/448; below 1e-30 that float32 scale itself loses bits.
CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", torch.float32, 0, 4, False, _INF, 0.0, 0.0),
    "fp16": Codec("fp16", torch.float16, 1, 2, False, 65504.0, 2.0**-14, 2.0**-11),
    "bf16": Codec("bf16", torch.bfloat16, 2, 2, False, 3.3895313892515355e38, 2.0**-126, 2.0**-8),
    "fp8": Codec("fp8", torch.uint8, 3, 1, True, _INF, 1e-30, 2.0**-4),
}
ESCAPE = "fp32"  # rows outside a codec's range are stored exactly in this codec instead
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # dtypes the kernels read and write
IO_ELEM = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def store_dtypes() -> dict[str, torch.dtype]:
    """Codec name -> store dtype (``freezert._native.CODECS``)."""
    return {name: c.store for name, c in CODECS.items()}


def escape_kind(codec: str, amax: torch.Tensor) -> torch.Tensor:
    """Per row: 0 = the codec keeps it, 1 = too large for it, 2 = too small for it (int8, CPU).

    ``amax`` is (rows, tensors): each boundary tensor's max |x| in that row (finite). A row escapes when any of its
    tensors does, so every boundary tensor keeps the codec's relative bound, whatever its own magnitude.
    """
    c = CODECS[codec]
    large = (amax > c.max_amax).any(1)
    small = ((amax > 0) & (amax < c.min_amax)).any(1)
    return torch.where(large, 1, torch.where(small, 2, 0)).to(torch.int8).cpu()
