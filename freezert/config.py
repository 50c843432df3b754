"""``FreezeConfig``: every option of ``wrap()`` in one frozen dataclass, validated once when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import CacheError, FreezeError
from ._units import parse_bytes

__all__ = ["FreezeConfig"]

BN_MODES = ("frozen", "train")
CASTS = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_FORMATS = ("int8", "fp8")  # weight-only storage of the frozen Linear/Conv layers (freezert.quant)


@dataclass(frozen=True)
class FreezeConfig:
    """What to freeze and how to run it; ``wrap(model, freeze, **options)`` builds one, or pass one as ``freeze``.

    ``freeze``: blocks to freeze (int N: 0..N-1; list of indices; name prefix(es); fraction; predicate; ``"all"``;
    a schedule). ``blocks``: dotted path of the block container. ``also_freeze``: parameter names outside the
    blocks to freeze too. ``bn``: ``"frozen"`` (fixed statistics, folded, cacheable) or ``"train"`` (YOLOv5's
    batch statistics). ``dtype``: pre-cast the frozen segment (float16/bfloat16/float32). ``weights``: ``"int8"`` /
    ``"fp8"``: the segment's Linear/Conv weights stored in one byte. ``channels_last``: the segment's layout
    (``"auto"``: channels_last where it was measured faster, float32/bfloat16 convolutions on CPU through oneDNN;
    its outputs go back to the model's layout). ``graphs``: CUDA-graph capture of the segment. ``cache``: True,
    a codec name or a ``FeatureCache``. ``offload_frozen``: frozen weights to host while the cache serves whole
    batches. ``kernels``: ``"auto"`` (the exact lean ops on tensors of ``ops.lean.MIN_ELEMENTS`` elements or more,
    eager's below), ``"lean"`` (the lean ops at every size), True (Triton), False (eager).
    ``memory_budget``: bytes (int or ``"4GiB"``) the trainable part may save for backward. ``feature_aug``: a
    callable ``{block: boundary tensor} -> {block: tensor}`` applied to a driven model's boundary on training
    calls (augmentation in feature space, e.g. ``freezert.cache.FeatureFlip``: approximate, opt-in).
    """

    freeze: Any = 10
    blocks: str | None = None
    also_freeze: Any = None
    bn: str = "frozen"
    dtype: torch.dtype | None = None
    weights: str | None = None
    channels_last: bool | str = "auto"
    graphs: bool = False
    cache: Any = None
    offload_frozen: bool = False
    kernels: Any = "auto"
    memory_budget: int | None = None
    feature_aug: Any = None

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise FreezeError(f"bn={self.bn!r} is not a BatchNorm mode; pass bn='frozen' (default) or bn='train'")
        if isinstance(self.dtype, str) and self.dtype in WEIGHT_FORMATS:
            raise FreezeError(
                f"dtype={self.dtype!r} is a weight format, not a cast; pass weights={self.dtype!r} (one-byte frozen "
                "Linear/Conv weights) and leave dtype= for float16/bfloat16 pre-casting"
            )
        if self.dtype is not None and self.dtype not in CASTS:
            raise FreezeError(
                f"dtype={self.dtype!r} is not supported; pass None, torch.float32, torch.float16 or torch.bfloat16"
            )
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise FreezeError(f"weights={self.weights!r} is not a weight format; pass 'int8', 'fp8' or None")
        if (self.dtype is not None or self.weights is not None) and self.bn == "train":
            which = "dtype pre-casting" if self.dtype is not None else f"weights={self.weights!r}"
            raise FreezeError(
                f"{which} needs folded, fixed BatchNorm, but bn='train' keeps batch statistics; use bn='frozen' or "
                f"drop {'dtype' if self.dtype is not None else 'weights'}"
            )
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise FreezeError(f"channels_last={self.channels_last!r} must be True, False or 'auto'")
        for name in ("graphs", "offload_frozen"):
            if not isinstance(getattr(self, name), bool):
                raise FreezeError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (isinstance(self.kernels, bool) or self.kernels in ("auto", "lean")):
            raise FreezeError(
                f"kernels={self.kernels!r} is not understood; pass 'auto' or 'lean' (the exact lean ops on every "
                "device), True (the Triton kernels, the interpreter off CUDA) or False (eager)"
            )
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise FreezeError(
                f"blocks={self.blocks!r} is a {type(self.blocks).__name__}; pass the dotted path of the block "
                "container as a string, e.g. blocks='encoder.layer' (or '' for the root's children)"
            )
        if self.feature_aug is not None and not callable(self.feature_aug):
            raise FreezeError(
                f"feature_aug={self.feature_aug!r} is not callable; pass a function of the boundary tensors, e.g. "
                "freezert.cache.FeatureFlip(p=0.5)"
            )
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes("memory_budget", self.memory_budget))
        object.__setattr__(self, "cache", _cache_of(self.cache, self.bn))

    @classmethod
    def of(cls, freeze: Any = 10, **options: Any) -> FreezeConfig:
        """``freeze`` and keyword options as ``wrap()`` takes them (``freeze`` may itself be a FreezeConfig)."""
        if isinstance(freeze, FreezeConfig):
            return dataclasses.replace(freeze, **options) if options else freeze
        names = {f.name for f in dataclasses.fields(cls)} - {"freeze"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise FreezeError(
                f"wrap() got an unknown option {unknown[0]!r}; the options are {', '.join(sorted(names))} "
                "(see freezert.FreezeConfig)"
            )
        return cls(freeze=freeze, **options)


def _cache_of(cache: Any, bn: str):
    """``cache=`` as a FeatureCache (or None)."""
    if cache is None or cache is False:
        return None
    from .cache import FeatureCache

    if cache is True:
        cache = FeatureCache()
    elif isinstance(cache, str):
        cache = FeatureCache(codec=cache)
    elif not isinstance(cache, FeatureCache):
        raise CacheError(
            f"cache={cache!r} is not understood; pass True, a codec name ('fp16', 'bf16', 'fp8', 'fp32') "
            "or a freezert.FeatureCache"
        )
    if bn == "train":
        raise CacheError(
            "cache= cannot be combined with bn='train': batch statistics make each sample's frozen output depend "
            "on the rest of its batch; use bn='frozen' or drop cache="
        )
    return cache
