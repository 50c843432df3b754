"""The cache in a training loop: ``prefetching(loader, fm)`` yields a DataLoader's batches and has the wrapped model
read the next batch's stored rows in the background while the current batch trains (``FrozenModel.prefetch``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .._errors import FreezeError

__all__ = ["prefetching"]


def _first(batch: Any) -> tuple[tuple, dict]:
    """The default call of a batch: a tensor as is, or a tuple or list's first element."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise FreezeError(
        f"prefetching() cannot tell the model's input in a batch of type {type(batch).__name__}; pass inputs=, a "
        "function of a batch returning (args, kwargs) of the wrapped model's call, e.g. "
        "lambda b: ((b[0],), {'cache_ids': b[2]})"
    )


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def prefetching(
    loader: Iterable,
    fm: torch.nn.Module,
    inputs: Callable[[Any], tuple[tuple, dict]] | None = None,
    *,
    device: Any = None,
) -> Iterator[Any]:
    """Yields ``loader``'s batches (moved to ``device`` when given); once the wrapped model ``fm`` has been called on
    one, it starts ``fm.prefetch`` of the next, so that batch's disk rows are read, verified and decoded on a thread
    while this one's backward and optimizer step run.

    ``inputs(batch) -> (args, kwargs)``: the call the loop makes with a batch (default: its first element, no
    keywords), e.g. ``lambda b: ((b[0],), {"cache_ids": b[2], "cache_aug": b[3]})`` for ``FiniteAugment``'s
    batches: the prefetch must name the rows the next call will ask for (same ids, augmentation and input shape).
    The next batch is taken from ``loader`` one step early.
    """
    if not hasattr(fm, "prefetch"):  # DistributedDataParallel and the like: the FrozenModel inside
        fm = getattr(fm, "module", fm)
    if not hasattr(fm, "prefetch") or not hasattr(fm, "register_forward_hook"):
        raise FreezeError(
            f"prefetching() got a {type(fm).__name__}; pass the FrozenModel made by freezert.wrap(..., cache=...)"
        )
    call = inputs or _first
    dev = None if device is None else torch.device(device)
    pending: list[Any] = []  # the next batch, until the model's first call after it is queued

    def start(module, args, out):
        if pending:
            a, k = call(pending.pop())
            fm.prefetch(*a, **k)

    it = iter(loader)
    try:
        cur = next(it)
    except StopIteration:
        return
    cur = cur if dev is None else _to(cur, dev)
    handle = fm.register_forward_hook(start)
    try:
        for nxt in it:
            nxt = nxt if dev is None else _to(nxt, dev)
            pending[:] = [nxt]
            yield cur
            pending.clear()  # the step did not call the model: nothing was started
            cur = nxt
        yield cur
    finally:
        handle.remove()
