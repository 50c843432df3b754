"""The record: one observed forward of the user's model, from which the frozen segment is planned.

Module hooks give the call order (the stem is what runs before block 0, the head what runs after the last
block), how often each block runs, and whether a frozen block's inputs or outputs need autograd. A
``TorchFunctionMode`` sees every torch op, so it knows which outputs of frozen blocks are read by anything
else (glue code in the model's forward, trainable modules, the model's own output): those are the boundary
a cache must store and replay. Nothing here depends on the model being traceable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import _tree

# Ops that only read a tensor's metadata: model code may ask a placeholder for its shape.
_METADATA = {
    "size",
    "dim",
    "ndim",
    "ndimension",
    "shape",
    "dtype",
    "device",
    "numel",
    "nelement",
    "is_contiguous",
    "stride",
    "__len__",
    "requires_grad",
    "is_cuda",
    "layout",
    "is_floating_point",
    "is_complex",
    "element_size",
    "storage_offset",
    "__get__",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "names",
}

OUTSIDE = -1  # consumer context: not inside any tracked block (glue code, the head, the model's output)


@dataclass
class Record:
    """What one forward did. Units are the table's blocks (its indices, registration order) and, numbered after
    them, its candidates (``len(blocks) + c``): those that ran before any block are the stem."""

    first_call: dict[str, int]  # module name -> position of its first call among all module calls
    block_calls: dict[int, int]  # unit (block index, or len(blocks) + candidate index) -> how many times it ran
    before_first_block: set[str]  # candidate (non-block) modules whose first call came before any block ran
    grad_in: dict[int, bool]  # frozen block -> one of its inputs required grad when it ran
    grad_inside: dict[int, bool]  # frozen block -> its output required grad though no input did
    # (unit, member index, flat output index) -> contexts (units or OUTSIDE) that read it
    consumers: dict[tuple[int, int, int], set[int]] = field(default_factory=dict)
    out_is_batch: dict[tuple[int, int, int], bool] = field(default_factory=dict)

    def boundary(self, segment: set[int]) -> list[tuple[int, int, int]]:
        """Outputs of the segment's blocks that anything outside the segment reads, in a fixed order."""
        return sorted(k for k, ctx in self.consumers.items() if k[0] in segment and not ctx <= segment)


class _Consumers(TorchFunctionMode):
    """Notes, for every tracked tensor, the block contexts of the ops that read it."""

    def __init__(self, tracked: dict[int, tuple], consumers: dict, stack: list[int]):
        super().__init__()
        self.tracked, self.consumers, self.stack = tracked, consumers, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA and self.tracked:
            ctx = self.stack[-1] if self.stack else OUTSIDE
            for t in _tree.tensors((args, kwargs)):
                key = self.tracked.get(id(t))
                if key is not None and key[1] is t:
                    self.consumers[key[0]].add(ctx)
        return func(*args, **kwargs)


def record(model: nn.Module, table, frozen: set[int], args, kwargs, keep_trainable: set[int]) -> tuple[Record, object]:
    """Runs ``model(*args, **kwargs)`` once with hooks; returns the record and the output.

    During the run only the parameters in ``keep_trainable`` (ids) require grad, so an input of a frozen block
    that requires grad shows a real dependence on something trainable (a root parameter such as ViT's
    ``cls_token``, a trainable block, an input), not on the stem, which freezing will freeze too. The model's
    buffers (BatchNorm running statistics) and the RNG state are restored afterwards: the record is invisible.
    """
    first_call: dict[str, int] = {}
    block_calls: dict[int, int] = {}
    before: set[str] = set()
    grad_in: dict[int, bool] = {}
    grad_inside: dict[int, bool] = {}
    consumers: dict[tuple[int, int, int], set[int]] = {}
    out_is_batch: dict[tuple[int, int, int], bool] = {}
    tracked: dict[int, tuple] = {}
    keep: list[torch.Tensor] = []  # holds tracked outputs alive, so their ids stay unique during the run
    stack: list[int] = []
    started = [False]
    batch = next((t.shape[0] for t in _tree.tensors((args, kwargs)) if t.dim() > 0), None)
    member_of = {id(m): (i, j) for i, ms in enumerate(table.members) for j, (_, m) in enumerate(ms)}
    n_blocks = len(table.members)
    # Candidates (stem or head) are units too, numbered after the blocks: a stem's outputs may reach the head.
    for c, (_, m) in enumerate(table.candidates):
        member_of.setdefault(id(m), (n_blocks + c, 0))
    candidates = {id(m) for _, m in table.candidates}
    names = {id(m): n for n, m in model.named_modules()}

    def pre(m, a, kw):
        name = names.get(id(m))
        if name is not None and name not in first_call:
            first_call[name] = len(first_call)
        if id(m) in candidates and not started[0] and name is not None:
            before.add(name)
        hit = member_of.get(id(m))
        if hit is None:
            return
        i = hit[0]
        if i < n_blocks:
            started[0] = True
        if hit[1] == 0:
            block_calls[i] = block_calls.get(i, 0) + 1
        if i in frozen and torch.is_grad_enabled() and any(t.requires_grad for t in _tree.tensors((a, kw))):
            grad_in[i] = True
        stack.append(i)

    def post(m, a, kw, out):
        hit = member_of.get(id(m))
        if hit is None:
            return
        i, j = hit
        stack.pop()
        if i >= n_blocks and names.get(id(m)) not in before:
            return  # a head module: its outputs are the trainable part's own
        if i < n_blocks and i not in frozen:
            return
        needs_in = torch.is_grad_enabled() and any(t.requires_grad for t in _tree.tensors((a, kw)))
        flat = _tree.tensors(out)
        if not needs_in and any(t.requires_grad for t in flat):
            grad_inside[i] = True
        if block_calls.get(i, 0) > 1:
            return  # a reused block runs eagerly: its outputs are never replayed
        for n, t in enumerate(flat):
            key = (i, j, n)
            consumers.setdefault(key, set())
            out_is_batch[key] = batch is not None and t.dim() > 0 and t.shape[0] == batch
            tracked[id(t)] = (key, t)
            keep.append(t)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        if id(m) in member_of:
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index for t in _tree.tensors((args, kwargs)) if t.is_cuda} - {None})
    try:
        for p in params:
            p.requires_grad_(id(p) in keep_trainable)
        with torch.random.fork_rng(devices=devices), _Consumers(tracked, consumers, stack):
            out = model(*args, **kwargs)
        for t in _tree.tensors(out):
            key = tracked.get(id(t))
            if key is not None and key[1] is t:
                consumers[key[0]].add(OUTSIDE)
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(params, flags):
            p.requires_grad_(rg)
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
    rec = Record(first_call, block_calls, before, grad_in, grad_inside, consumers, out_is_batch)
    return rec, out
