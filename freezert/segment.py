"""``FrozenSegment``: the frozen prefix run as inference (no_grad, BN folded, weights pre-cast, graphs)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._swap import swapped
from .blocks import BlockTable
from .partition import Partition

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _map_leaves(obj, leaf: type, fn):
    """``obj`` (nested tuples, namedtuples, lists, dicts) with every ``leaf`` instance replaced by ``fn(leaf)``."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_leaves(o, leaf, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(o, leaf, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_leaves(v, leaf, fn)) for k, v in obj.items())
    return obj


def _map_tensors(obj, fn):
    return _map_leaves(obj, torch.Tensor, fn)


def _shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the original tensor objects."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _fold_pairs(mod: nn.Module, args, kwargs) -> tuple[object, list[tuple[nn.Module, _BatchNorm]]]:
    """Runs ``mod`` once, recording each conv whose output object is exactly a BatchNorm's input."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[int, int] = {}
    pairs: list[tuple[nn.Module, _BatchNorm]] = []

    def count(m, *_):
        calls[id(m)] = calls.get(id(m), 0) + 1

    def after_conv(m, _inp, out):
        produced[id(out)] = (m, out)  # keeping ``out`` alive keeps its id unique

    def before_bn(m, inp):
        hit = produced.get(id(inp[0])) if inp else None
        if hit is not None and hit[1] is inp[0]:
            pairs.append((hit[0], m))

    handles = []
    for m in mod.modules():
        handles.append(m.register_forward_pre_hook(count))
        if isinstance(m, _CONVS):
            handles.append(m.register_forward_hook(after_conv))
        elif isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn))
    try:
        out = mod(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    once = [(c, b) for c, b in pairs if calls.get(id(c)) == 1 and calls.get(id(b)) == 1]
    return out, once


def _fold(conv: nn.Module, bn: _BatchNorm) -> None:
    """Folds eval-mode ``bn`` into ``conv``'s weight and bias (on the private copy only), in float64."""
    w = conv.weight.detach().double()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(var)
    dt = conv.weight.dtype
    conv._parameters["weight"] = (w * scale.view(-1, *([1] * (w.dim() - 1)))).to(dt)
    conv._parameters["bias"] = ((b - mean) * scale + beta).to(dt)


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is target:
                parent._modules[name] = new
                return


def _recast(mod: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
    for m in mod.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                new = t.detach()
                if dtype is not None:
                    new = new.to(dtype)
                if channels_last and new.dim() == 4:
                    new = new.contiguous(memory_format=torch.channels_last)
                if new is not t:
                    store[key] = new


def flatten_tensors(obj) -> list[torch.Tensor]:
    """The tensors in a (nested) output, in a fixed order."""
    found: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _map_slots(obj, fn):
    return _map_leaves(obj, _Slot, fn)


def rebuild(template, tensors: list[torch.Tensor]):
    """The output structure recorded in ``template`` with ``tensors`` (``flatten_tensors`` order) put back."""
    it = iter(tensors)
    return _map_slots(template, lambda _: next(it))


def _out_dtype(module: nn.Module) -> torch.dtype | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


class _Runner(nn.Module):
    """Runs a private copy of one frozen module under no_grad; folds its BN on the first call."""

    def __init__(self, original: nn.Module, *, fold: bool, dtype, channels_last: bool, copy_module: bool):
        super().__init__()
        # Not registered as a submodule: the copy must not appear in state_dict, parameters or .to().
        self.__dict__["target"] = _shared_copy(original) if copy_module else original
        self.__dict__["original"] = original
        self.fold, self.dtype, self.channels_last = fold, dtype, channels_last
        self.out_dtype = _out_dtype(original)
        self.template = None  # per-sample shapes/dtypes of the last output: placeholders on a cache hit
        self.replay = None  # set by FrozenSegment.replaying(): what to return instead of running
        # Only a private copy may be folded or recast; the user's own modules (bn="train") never are.
        self.prepared = not copy_module or not (fold or dtype is not None or channels_last)
        self.folded = 0

    @property
    def device(self) -> torch.device | None:
        """Where this runner's last output lives (from its recorded template)."""
        slots: list = []
        _map_slots(self.template, lambda s: slots.append(s) or s)
        return slots[0].device if slots else None

    def __getattr__(self, name):  # model code sometimes reads attributes of its blocks
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["target"], name)

    def _cast_in(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            if self.dtype is not None:
                t = t.to(self.dtype)
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _cast_out(self, t: torch.Tensor) -> torch.Tensor:
        if self.out_dtype is not None and t.is_floating_point() and t.dtype != self.out_dtype:
            return t.to(self.out_dtype)
        return t

    def forward(self, *args, **kwargs):
        if self.replay is not None:
            return self.replay()
        with torch.no_grad():
            target = self.__dict__["target"]
            if not self.prepared:
                out = self._prepare(target, args, kwargs)
            else:
                if self.dtype is not None or self.channels_last:
                    args, kwargs = _map_tensors((args, kwargs), self._cast_in)
                out = target(*args, **kwargs)
            if self.dtype is not None:
                out = _map_tensors(out, self._cast_out)
            self.template = _map_tensors(out, lambda t: _Slot(t.shape, t.dtype, t.device))
            return out

    def _prepare(self, target, args, kwargs):
        # The first call runs unfolded in the model's own dtype and finds the conv->BN pairs on the way.
        if self.fold:
            out, pairs = _fold_pairs(target, args, kwargs)
            for conv, bn in pairs:
                if bn.running_mean is None or bn.training:
                    continue
                _fold(conv, bn)
                _replace(target, bn, nn.Identity())
                self.folded += 1
        else:
            out = target(*args, **kwargs)
        _recast(target, self.dtype, self.channels_last)
        self.prepared = True
        return out


class _Slot:
    """Shape, dtype and device of one tensor in a runner's output (batch dimension first)."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    def placeholder(self, batch: int) -> torch.Tensor:
        # A zero-stride expand: the right shape for the model's glue code, no memory.
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(batch, *self.shape[1:])


def frozen_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, in the segment's record order (what fingerprints hash)."""
    return [t for _, _, _, t in _tensor_records(modules)]


def _tensor_records(modules: list[nn.Module]):
    for m in modules:
        for sub in m.modules():
            for kind, store in (("p", sub._parameters), ("b", sub._buffers)):
                for key, t in store.items():
                    if t is not None:
                        yield sub, kind, key, t


class FrozenSegment:
    """The frozen prefix of a model, run as one inference segment.

    ``bn="frozen"`` runs private copies (sharing the user's tensors) in eval mode with BatchNorm folded into
    the preceding convolution; ``bn="train"`` runs the user's own modules under no_grad, so batch statistics
    are used and running statistics update exactly as in YOLOv5-style freezing.
    """

    def __init__(self, table: BlockTable, part: Partition, *, bn: str, dtype, channels_last: bool, graphs: bool):
        self.table, self.part = table, part
        frozen_mode = bn == "frozen"
        self.names: list[str] = []
        self.runners: list[_Runner] = []
        originals: list[nn.Module] = []
        stem = table.stem if part.k else []
        for name, m in list(stem) + list(zip(table.names[: part.k], table.modules[: part.k])):
            r = _Runner(m, fold=frozen_mode, dtype=dtype, channels_last=channels_last, copy_module=frozen_mode)
            if frozen_mode:
                r.__dict__["target"].eval()
            self.names.append(name)
            self.runners.append(r)
            originals.append(m)
        self.block_runners = self.runners[len(stem):]
        self.graphs = graphs
        self._graphs: dict[tuple, tuple] = {}
        self._records = [(o, kind, key, t, t._version, t.data_ptr()) for o, kind, key, t in _tensor_records(originals)]
        # DDP rewrites buffers in place every step with identical values: compare those by value.
        self._buffer_values = {id(t): t.detach().clone() for _, kind, _, t, _, _ in self._records if kind == "b"}

    @property
    def folded(self) -> int:
        """How many BatchNorm layers were folded into convolutions so far."""
        return sum(r.folded for r in self.runners)

    @property
    def device(self) -> torch.device | None:
        """Where the frozen weights are (None for a segment without tensors)."""
        return self._records[0][3].device if self._records else None

    def move(self, device: torch.device) -> None:
        """Moves the frozen weights (the user's tensors, keeping their identity) and the private copies."""
        # Host-to-device copies may overlap; device-to-host copies stay blocking, so a host tensor is never
        # read before its copy lands.
        non_blocking = device.type == "cuda"
        for r in self.runners:
            for m in r.__dict__["target"].modules():
                for store in (m._parameters, m._buffers):
                    for t in store.values():
                        if t is not None and t.device != device:
                            t.data = t.data.to(device, non_blocking=non_blocking)
        for _, _, _, t, _, _ in self._records:
            if t.device != device:
                t.data = t.data.to(device, non_blocking=non_blocking)
        self._records = [(o, kind, key, t, t._version, t.data_ptr()) for o, kind, key, t, _, _ in self._records]
        self._buffer_values = {k: v.to(device) for k, v in self._buffer_values.items()}
        self._graphs.clear()  # captured graphs point at the old memory

    def is_stale(self) -> bool:
        """True when the user's frozen tensors changed (load_state_dict, .to(), in-place edits) since the build."""
        for i, (owner, kind, key, t, version, ptr) in enumerate(self._records):
            store = owner._parameters if kind == "p" else owner._buffers
            if store.get(key) is not t or t.data_ptr() != ptr:
                return True
            if t._version != version:
                if kind == "p" or not torch.equal(t, self._buffer_values[id(t)]):
                    return True
                self._records[i] = (owner, kind, key, t, t._version, ptr)
        return False

    # -- swap mode: the model's own forward calls the runners in place of its frozen modules --------------
    def swapped(self, root: nn.Module):
        """Context manager: the runners stand in place of the frozen modules inside ``root``."""
        return swapped(root, list(zip(self.names, self.runners)))

    @property
    def can_replay(self) -> bool:
        """True once every runner has run (so placeholders of the right shapes can stand in for it)."""
        return all(r.template is not None for r in self.runners)

    @contextlib.contextmanager
    def replaying(self, batch: int, boundary: list[torch.Tensor]) -> Iterator[None]:
        """While active, the runners skip their work: the last returns ``boundary`` in its recorded structure,
        the others zero-cost placeholders of the right shapes for the model's glue code."""
        try:
            for r in self.runners[:-1]:
                r.replay = lambda r=r: _map_slots(r.template, lambda s: s.placeholder(batch))
            last = self.runners[-1]
            last.replay = lambda: rebuild(last.template, boundary)
            yield
        finally:
            for r in self.runners:
                r.replay = None

    # -- driven mode: freezert runs the block graph itself and returns the boundary tensors --------------
    def run(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Runs the prefix on ``x``; returns ``{block index: output}`` for the boundary blocks."""
        if self.graphs and x.is_cuda:
            return self._run_graphed(x)
        return self._run_eager(x)

    def run_from(self, y: dict[int, torch.Tensor], start: int) -> dict[int, torch.Tensor]:
        """Runs blocks ``start..k-1`` only, on ``y``: the outputs of blocks below ``start`` that they read (the
        boundary of a shallower cut at ``start``); returns this segment's boundary, as ``run`` does."""
        return self._run_eager(None, start, y)

    def _run_eager(self, x, start: int = 0, y: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        y = {} if y is None else dict(y)
        sources = self.table.sources
        for i in range(start, len(self.block_runners)):
            r = self.block_runners[i]
            if i == 0:
                inp = x
            elif sources is None:
                inp = y[i - 1]
            else:
                f = self.table.modules[i].f
                if isinstance(f, int):
                    inp = y[i - 1 if f == -1 else f]
                else:
                    inp = [y[i - 1 if j == -1 else j] for j in f]
            y[i] = r(inp)
            for j in self.part.free_after.get(i, ()):
                y.pop(j, None)
        return {j: y[j] for j in self.part.boundary}

    def _run_graphed(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        entry = self._graphs.get(key)
        if entry is None:
            static_in = x.detach().clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # the first warm-up call also folds BN, outside the capture
                    self._run_eager(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._run_eager(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        # The trainable part saves its input for backward, and the next replay overwrites the static
        # outputs: hand out copies.
        return {j: t.clone() for j, t in static_out.items()}
