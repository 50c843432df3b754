"""Augmentation that keeps a feature cache useful: ``FiniteAugment`` (each sample gets one of a finite set of input
transforms, drawn deterministically per epoch, and says which: exact, each variant cached once) and the opt-in,
approximate feature-space transforms ``FeatureFlip`` and ``FeatureShift`` (applied to a driven model's cached
boundary through ``wrap(..., feature_aug=...)``, after arXiv 2508.15033). See docs/CACHE.md, "Augmentation"."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._errors import FreezeError

__all__ = ["FeatureFlip", "FeatureShift", "FiniteAugment"]

_M64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over ``values``: a fixed, platform-independent hash (no global RNG is read or advanced)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


class FiniteAugment(torch.utils.data.Dataset):
    """``dataset`` with one of ``variants`` applied to each sample, drawn from (``seed``, epoch, index): items are
    ``(*item, index, variant_id)``, so ``fm(x, cache_ids=index, cache_aug=variant_id)`` computes each (sample,
    variant) once and serves it from then on.

    ``variants``: callables (the identity, ``torchvision.transforms.v2.functional.horizontal_flip``, a v2 transform
    that draws nothing such as ``v2.RandomHorizontalFlip(p=1)``...). ``weights``: the probability of each (default:
    equal). ``on="input"`` applies the variant to the item's first element, ``"sample"`` to the whole item (v2
    transforms then move boxes and masks with the image). Call ``set_epoch(e)`` before each epoch, as for a
    ``DistributedSampler``; the epoch lives in shared memory, so persistent DataLoader workers see it.
    """

    def __init__(
        self,
        dataset: Any,
        variants: Sequence[Callable],
        *,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        on: str = "input",
    ):
        variants = list(variants)
        if not variants or not all(callable(v) for v in variants):
            raise FreezeError(
                f"variants={variants!r} is not a non-empty list of callables; pass e.g. [lambda x: x, hflip]"
            )
        if on not in ("input", "sample"):
            raise FreezeError(f"on={on!r} is not understood; pass 'input' (the item's first element) or 'sample'")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FreezeError(f"seed={seed!r} is not an int; pass an int")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(variants) or min(weights) < 0 or sum(weights) <= 0:
                raise FreezeError(
                    f"weights={weights!r} do not give one non-negative weight per variant ({len(variants)}) with a "
                    "positive sum; pass e.g. [0.5, 0.5] or None (equal)"
                )
            total = sum(weights)
            self._cum = [sum(weights[: i + 1]) / total for i in range(len(weights))]
        else:
            self._cum = [(i + 1) / len(variants) for i in range(len(variants))]
        self.dataset, self.variants, self.seed, self.on = dataset, variants, seed, on
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws ``__getitem__`` makes (call it before iterating, in the main process)."""
        self._epoch[0] = int(epoch)

    def variant(self, index: int, epoch: int | None = None) -> int:
        """The variant drawn for sample ``index`` in ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        u = _mix(self.seed, e, int(index)) / 2.0**64
        return next((i for i, c in enumerate(self._cum) if u < c), len(self._cum) - 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        v = self.variant(index)
        f = self.variants[v]
        if isinstance(item, (tuple, list)):
            item = tuple(f(item) if self.on == "sample" else (f(item[0]), *item[1:]))
        else:
            item = (f(item),)
        return (*item, index, v)


def _four_d(boundary: dict) -> list:
    return [k for k, t in boundary.items() if isinstance(t, torch.Tensor) and t.dim() == 4]


def _draw(p: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


class FeatureFlip:
    """Flips each sample's 4-D boundary tensors (N, C, H, W) along W with probability ``p``, every tensor of a sample
    alike: a horizontal flip in feature space. Approximate: equal to the features of the flipped image only for a
    mirror-symmetric prefix. For ``wrap(..., feature_aug=FeatureFlip(0.5))``; ``generator``: a CPU generator."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= float(p) <= 1.0:
            raise FreezeError(f"p={p!r} is not a probability; pass a float in [0, 1]")
        self.p, self.generator = float(p), generator

    def __call__(self, boundary: dict) -> dict:
        keys = _four_d(boundary)
        if not keys or self.p == 0.0:
            return boundary
        n = boundary[keys[0]].shape[0]
        mask = _draw(self.p, n, self.generator)
        if not bool(mask.any()):
            return boundary
        out = dict(boundary)
        for k in keys:
            t = boundary[k]
            m = mask.to(t.device).view(-1, 1, 1, 1)
            out[k] = torch.where(m, t.flip(-1), t)  # a new tensor: rows the cache served are never written
        return out

    def __repr__(self) -> str:
        return f"FeatureFlip(p={self.p})"


class FeatureShift:
    """Shifts each sample's 4-D boundary tensors by up to ``max_cells`` cells of the coarsest one in H and W (with
    probability ``p``; zeros fill the vacated cells), a finer tensor by the same distance in pixels (``H / H_coarse``
    cells per coarse cell): the features of the input translated by a multiple of the coarsest stride, exact for
    the interior of a translation-equivariant prefix and approximate at the borders. For ``feature_aug=``."""

    def __init__(self, max_cells: int = 1, p: float = 0.5, generator: torch.Generator | None = None):
        if not isinstance(max_cells, int) or isinstance(max_cells, bool) or max_cells < 1:
            raise FreezeError(f"max_cells={max_cells!r} is not a positive int; pass e.g. 1")
        if not 0.0 <= float(p) <= 1.0:
            raise FreezeError(f"p={p!r} is not a probability; pass a float in [0, 1]")
        self.max_cells, self.p, self.generator = max_cells, float(p), generator

    def __call__(self, boundary: dict) -> dict:
        keys = _four_d(boundary)
        if not keys or self.p == 0.0:
            return boundary
        coarse = min((boundary[k].shape[-2:] for k in keys), key=lambda s: s[0] * s[1])
        ratios = {}
        for k in keys:
            h, w = boundary[k].shape[-2:]
            if h % coarse[0] or w % coarse[1] or h // coarse[0] != w // coarse[1]:
                raise FreezeError(
                    f"FeatureShift needs every boundary map to be a whole multiple of the coarsest one, but block {k} "
                    f"is {h}x{w} and the coarsest {coarse[0]}x{coarse[1]}; use FeatureFlip or drop feature_aug="
                )
            ratios[k] = h // coarse[0]
        n = boundary[keys[0]].shape[0]
        on = _draw(self.p, n, self.generator)
        m = self.max_cells
        shift = torch.randint(-m, m + 1, (n, 2), generator=self.generator) * on.view(-1, 1)
        if not bool(shift.any()):
            return boundary
        out = dict(boundary)
        for k in keys:
            out[k] = _shifted(boundary[k], shift * ratios[k])
        return out

    def __repr__(self) -> str:
        return f"FeatureShift(max_cells={self.max_cells}, p={self.p})"


def _shifted(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) with sample i moved by ``shift[i] = (dy, dx)`` cells, zeros where nothing moved in."""
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    for i, (dy, dx) in enumerate(shift.tolist()):
        if abs(dy) >= h or abs(dx) >= w:
            continue
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = t[i, :, ys, xs]
    return out
