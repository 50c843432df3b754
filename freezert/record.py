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
from .call import batch_size

# Reads of a tensor's metadata only (methods, and properties by their own name): model code may ask a placeholder
# for its shape. Properties that hand out the values (.data, .T, .mT, .real) are reads like any op.
METADATA = frozenset(
    {
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
        "is_sparse",
        "is_quantized",
        "is_meta",
        "names",
        "grad_fn",
        "is_leaf",
        "_base",
        "__hash__",
        "is_nested",
        "is_inference",
        "get_device",
    }
)

OUTSIDE = -1  # consumer context: not inside any tracked block (glue code, the head, the model's output)


def op_name(func) -> str:
    """The name an op is known by: a method's, or for a property read the property's own (``shape``, ``data``)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


@dataclass
class Record:
    """What one forward did. Units are the table's blocks (its indices, registration order) and, numbered after
    them, its candidates (``len(blocks) + c``): those that ran before any block are the stem."""

    first_call: dict[str, int]  # module name -> position of its first call among all module calls
    block_calls: dict[int, int]  # unit (block index, or len(blocks) + candidate index) -> how many times it ran
    before_first_block: set[str]  # candidate (non-block) modules whose first call came before any block ran
    # frozen block -> the trainable parameters (names) its inputs depend on: it needs autograd through it
    grad_in: dict[int, list[str]] = field(default_factory=dict)
    # frozen block -> trainable parameters it reads from outside itself (its output needs grad, its inputs not)
    grad_inside: dict[int, list[str]] = field(default_factory=dict)
    # frozen blocks whose inputs require grad with no trainable parameter behind them: marked by the model's own
    # code (wav2vec2's feature encoder, enable_input_require_grads); inference gives the same gradients
    marked: set[int] = field(default_factory=set)
    # (unit, member index, flat output index) -> contexts (units or OUTSIDE) that read it
    consumers: dict[tuple[int, int, int], set[int]] = field(default_factory=dict)
    out_is_batch: dict[tuple[int, int, int], bool] = field(default_factory=dict)
    # parameters of candidate modules read by code outside their module (DeBERTa's rel_embeddings.weight)
    glue_params: set[int] = field(default_factory=set)
    batch: int | None = None  # the batch size of the recorded call
    # parameter-free modules run before block 0 whose output changes from one run to the next on the same input
    # (a random resize, a dropout in train mode): the frozen part's input is then not a function of the call's
    stochastic: list[str] = field(default_factory=list)

    def boundary(self, segment: set[int]) -> list[tuple[int, int, int]]:
        """Outputs of the segment's blocks that anything outside the segment reads, in a fixed order."""
        return sorted(k for k, ctx in self.consumers.items() if k[0] in segment and not ctx <= segment)

    def merge_readers(self, other: Record) -> None:
        """Adds the readers ``other`` saw: a plan serves every call, so what any recorded call read is kept."""
        for key, ctx in other.consumers.items():
            if key in self.consumers:
                self.consumers[key] |= ctx


def _trainable_leaves(tensors, live: dict[int, str]) -> list[str]:
    """Names of the live (trainable) parameters the autograd graphs of ``tensors`` reach."""
    found: dict[int, str] = {}
    seen: set[int] = set()
    stack = []
    for t in tensors:
        if t.requires_grad:
            if t.grad_fn is None and id(t) in live:
                found[id(t)] = live[id(t)]
            stack.append(t.grad_fn)
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None and id(var) in live:
            found[id(var)] = live[id(var)]
        stack.extend(f for f, _ in fn.next_functions)
    return sorted(found.values())


def _varies(m: nn.Module, a, kw, out, devices: list[int]) -> bool:
    """Whether running ``m`` again on the same input, from another random state, gives another output."""
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(torch.initial_seed() ^ 0x5EED)
        again = m(*a, **kw)
    x, y = _tree.flatten(out), _tree.flatten(again)
    if x[1] != y[1]:
        return True
    return any(
        (not isinstance(b, torch.Tensor)) or a_.shape != b.shape or not torch.equal(a_, b)
        for a_, b in zip(x[0], y[0])
        if isinstance(a_, torch.Tensor)
    )


class _Consumers(TorchFunctionMode):
    """Notes, for every tracked tensor, the block contexts of the ops that read it; and which candidate
    parameters are read by code outside their own module."""

    def __init__(self, tracked: dict[int, tuple], consumers: dict, stack: list[int], owners: dict[int, int]):
        super().__init__()
        self.tracked, self.consumers, self.stack, self.owners = tracked, consumers, stack, owners
        self.glue: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op_name(func) not in METADATA:
            ctx = self.stack[-1] if self.stack else OUTSIDE
            for t in _tree.tensors((args, kwargs)):
                key = self.tracked.get(id(t))
                if key is not None and key[1] is t:
                    self.consumers[key[0]].add(ctx)
                owner = self.owners.get(id(t))
                if owner is not None and owner.isdisjoint(self.stack):
                    self.glue.add(id(t))
        return func(*args, **kwargs)


def record(
    model: nn.Module, table, frozen: set[int], args, kwargs, keep_trainable: set[int], run=None
) -> tuple[Record, object]:
    """Runs ``model(*args, **kwargs)`` (or ``run(*args, **kwargs)``: the model's forward without the hooks on the
    model itself, which the wrapper runs) once with hooks; returns the record and the output.

    During the run only the parameters in ``keep_trainable`` (ids) require grad, so an input of a frozen block
    that requires grad shows a real dependence on something trainable (a root parameter such as ViT's
    ``cls_token``, a trainable block, an input), not on the stem, which freezing will freeze too; the graph
    behind it names the parameters. The model's buffers (BatchNorm running statistics) and the RNG state are
    restored afterwards: the record is invisible.
    """
    rec = Record({}, {}, set())
    tracked: dict[int, tuple] = {}
    keep: list[torch.Tensor] = []  # holds tracked outputs alive, so their ids stay unique during the run
    stack: list[int] = []
    started = [False]
    rec.batch = batch_size(args, kwargs)
    member_of = {id(m): (i, j) for i, ms in enumerate(table.members) for j, (_, m) in enumerate(ms)}
    n_blocks = len(table.members)
    # Candidates (stem or head) are units too, numbered after the blocks: a stem's outputs may reach the head.
    for c, (_, m) in enumerate(table.candidates):
        member_of.setdefault(id(m), (n_blocks + c, 0))
    candidates = {id(m) for _, m in table.candidates}
    owners: dict[int, set[int]] = {}  # a tied parameter (GPT-2's wte and lm_head) has several
    for c, (_, m) in enumerate(table.candidates):
        for p in m.parameters():
            owners.setdefault(id(p), set()).add(n_blocks + c)
    names = {id(m): n for n, m in model.named_modules()}
    live = {id(p): n for n, p in model.named_parameters() if id(p) in keep_trainable}
    inputs_of: dict[int, list[str]] = {}
    pre_block: list[tuple] = []  # parameter-free modules run before block 0, with their inputs and output

    def pre(m, a, kw):
        name = names.get(id(m))
        if name is not None and name not in rec.first_call:
            rec.first_call[name] = len(rec.first_call)
        if id(m) in candidates and not started[0] and name is not None:
            rec.before_first_block.add(name)
        hit = member_of.get(id(m))
        if hit is None:
            return
        i = hit[0]
        if i < n_blocks:
            started[0] = True
        if hit[1] == 0:
            rec.block_calls[i] = rec.block_calls.get(i, 0) + 1
        stem = i >= n_blocks and not started[0]  # a candidate run before block 0: frozen with it
        if (i in frozen or stem) and torch.is_grad_enabled():
            ins = [t for t in _tree.tensors((a, kw)) if t.requires_grad]
            if ins:
                feeders = inputs_of[id(m)] = _trainable_leaves(ins, live)
                if feeders:
                    rec.grad_in[i] = sorted(set(rec.grad_in.get(i, [])) | set(feeders))
                else:
                    rec.marked.add(i)
        stack.append(i)

    def post(m, a, kw, out):
        hit = member_of.get(id(m))
        if hit is None:
            return
        i, j = hit
        stack.pop()
        if i >= n_blocks and names.get(id(m)) not in rec.before_first_block:
            return  # a head module: its outputs are the trainable part's own
        if i >= n_blocks and not any(True for _ in m.parameters()):
            pre_block.append((names[id(m)], m, a, kw, out))
        if i < n_blocks and i not in frozen:
            return
        flat = _tree.tensors(out)
        outs = [t for t in flat if t.requires_grad]
        if outs and torch.is_grad_enabled():
            inside = set(_trainable_leaves(outs, live)) - set(inputs_of.pop(id(m), []))
            if inside:
                rec.grad_inside[i] = sorted(set(rec.grad_inside.get(i, [])) | inside)
        if rec.block_calls.get(i, 0) > 1:
            return  # a reused block runs eagerly: its outputs are never replayed
        for n, t in enumerate(flat):
            key = (i, j, n)
            rec.consumers.setdefault(key, set())
            rec.out_is_batch[key] = rec.batch is not None and t.dim() > 0 and t.shape[0] == rec.batch
            tracked[id(t)] = (key, t)
            keep.append(t)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        if id(m) in member_of:
            # first among the module's forward hooks: a user's hook that reads the output then reads it from
            # outside the block, as the model's glue does
            handles.append(m.register_forward_hook(post, with_kwargs=True, prepend=True))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index for t in _tree.tensors((args, kwargs)) if t.is_cuda} - {None})
    mode = _Consumers(tracked, rec.consumers, stack, owners)
    try:
        for p in params:
            p.requires_grad_(id(p) in keep_trainable)
        with torch.random.fork_rng(devices=devices), mode:
            out = (model if run is None else run)(*args, **kwargs)
        for t in _tree.tensors(out):
            key = tracked.get(id(t))
            if key is not None and key[1] is t:
                rec.consumers[key[0]].add(OUTSIDE)
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(params, flags):
            p.requires_grad_(rg)
        with torch.no_grad():
            for b, v in buffers:
                # only what changed: a copy bumps the version counter, and a buffer the forward saved for
                # backward (LeViT's eval-mode attention-bias cache) must not look modified in place
                if not torch.equal(b, v):
                    b.copy_(v)
    rec.glue_params = mode.glue
    rec.stochastic = [name for name, m, a, kw, y in pre_block if _varies(m, a, kw, y, devices)]
    return rec, out
