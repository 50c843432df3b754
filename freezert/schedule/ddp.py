"""``rebuild_ddp``: a new DistributedDataParallel wrapper after the frozen set changed."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .._errors import FreezeError

__all__ = ["rebuild_ddp"]


def rebuild_ddp(ddp: nn.Module, **overrides: Any) -> nn.Module:
    """A new DistributedDataParallel over ``ddp.module`` with the same settings, for a changed frozen set.

    DDP registers the parameters that require grad when it is built: a parameter frozen later leaves its
    reducer waiting, and one unfrozen later is never all-reduced (ranks drift apart silently). Rebuilding
    after every change of the frozen set fixes both; the optimizer is untouched (it holds the parameters).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp, DDP):
        raise FreezeError(f"rebuild_ddp got a {type(ddp).__name__}; pass the DistributedDataParallel wrapper")
    accepted = inspect.signature(DDP.__init__).parameters
    kwargs: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "process_group": ddp.process_group,
        "bucket_cap_mb": ddp.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": getattr(ddp, "static_graph", False),
    }
    if "forward_sync_buffers" in accepted and hasattr(ddp, "forward_sync_buffers"):
        kwargs["forward_sync_buffers"] = ddp.forward_sync_buffers  # broadcast_buffers is deprecated there
    else:
        kwargs["broadcast_buffers"] = ddp.broadcast_buffers
    kwargs.update(overrides)
    return DDP(ddp.module, **kwargs)
