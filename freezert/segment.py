"""``FrozenSegment``: the frozen prefix run as inference (no_grad, BN folded, weights pre-cast, graphs), and
``run_blocks``, the one executor of a block sequence for the prefix and the trainable tail alike."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn

from . import _tree
from ._swap import swapped
from .blocks import BlockTable
from .config import FreezeConfig
from .fold import FoldScan, after_fold, fold_
from .partition import Partition


def _shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the original tensor objects."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _quantized(target: nn.Module, fmt: str) -> nn.Module:
    """``target`` (a private copy) with its Linear/Conv weights stored in ``fmt``; a bare layer is replaced too."""
    from .quant import quantize_frozen_

    holder = nn.Sequential(target)  # quantize_frozen_ swaps layers in their parent: give a bare layer one
    quantize_frozen_(holder, fmt)
    return holder[0]


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> bool:
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is target:
                parent._modules[name] = new
                return True
    return False


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


def _out_dtype(module: nn.Module) -> torch.dtype | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


class _Runner(nn.Module):
    """Runs a private copy of one frozen module under no_grad (folded and pre-cast once its segment is ready)."""

    def __init__(self, original: nn.Module, segment: FrozenSegment, key: tuple[int, int], *, copy_module: bool):
        super().__init__()
        # Not registered as a submodule: the copy must not appear in state_dict, parameters or .to().
        self.__dict__["target"] = _shared_copy(original) if copy_module else original
        self.__dict__["original"] = original
        self.__dict__["segment"] = segment
        self.key = key  # (unit, member): where the record saw this module
        self.out_dtype = _out_dtype(original)
        self.template = None  # (structure, slots) of the last output: what a cache hit hands back in its place
        self.replay = None  # set by FrozenSegment.replaying(): what to return instead of running
        self.captured = None  # set by FrozenSegment.capturing(): where the outputs of this call go

    @property
    def device(self) -> torch.device | None:
        """Where this runner's last output lives (from its recorded template)."""
        slots = [s for s in self.template[1] if isinstance(s, _Slot)] if self.template else []
        return slots[0].device if slots else None

    def __getattr__(self, name):  # model code sometimes reads attributes of its blocks
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["target"], name)

    def _cast_in(self, t: torch.Tensor) -> torch.Tensor:
        seg = self.__dict__["segment"]
        if t.is_floating_point():
            if seg.dtype is not None:
                t = t.to(seg.dtype)
            if seg.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _cast_out(self, t: torch.Tensor) -> torch.Tensor:
        if self.out_dtype is not None and t.is_floating_point() and t.dtype != self.out_dtype:
            return t.to(self.out_dtype)
        return t

    def forward(self, *args, **kwargs):
        if self.replay is not None:
            return self.replay()
        if torch.is_grad_enabled() and any(t.requires_grad for t in _tree.tensors((args, kwargs))):
            # A call the record did not plan for (an input that needs a gradient): autograd through the user's
            # own module, exactly as naive freezing runs it.
            return self.__dict__["original"](*args, **kwargs)
        seg = self.__dict__["segment"]
        with torch.no_grad():
            cast = seg.prepared and (seg.dtype is not None or seg.channels_last)
            if cast:
                args, kwargs = _tree.map_tensors((args, kwargs), self._cast_in)
            out = self.__dict__["target"](*args, **kwargs)
            if cast:
                out = _tree.map_tensors(out, self._cast_out)
        leaves, spec = _tree.flatten(out)
        self.template = (spec, [_Slot.of(v) if isinstance(v, torch.Tensor) else v for v in leaves])
        if self.captured is not None:
            self.captured[self.key] = [v for v in leaves if isinstance(v, torch.Tensor)]
        return out


class _Slot:
    """Shape, dtype and device of one tensor in a runner's output (batch dimension first)."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    @classmethod
    def of(cls, t: torch.Tensor) -> _Slot:
        return cls(t.shape, t.dtype, t.device)

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


def run_blocks(
    table: BlockTable,
    module_at,
    start: int,
    stop: int,
    y: dict[int, torch.Tensor],
    x=None,
    *,
    keep: set[int] | None = None,
    free_after: dict[int, tuple[int, ...]] | None = None,
):
    """Runs blocks ``start..stop-1`` as the model's own forward would (YOLO-style ``.f`` routing, else a chain):
    the one executor for the frozen prefix and the trainable tail. ``x`` is the input of block ``start`` (else
    ``y[start - 1]``); outputs go into ``y`` (all, or those in ``keep``) and leave it per ``free_after``."""
    x = y.get(start - 1) if x is None else x
    for i in range(start, stop):
        if table.sources is not None and i > 0:
            f = table.modules[i].f
            if f != -1:
                x = y[f % i] if isinstance(f, int) else [x if j == -1 else y[j % i] for j in f]
        x = module_at(i)(x)
        if keep is None or i in keep:
            y[i] = x
        for j in (free_after or {}).get(i, ()):
            y.pop(j, None)
    return x


class FrozenSegment:
    """The frozen prefix of a model, run as one inference segment.

    ``bn="frozen"`` runs private copies (sharing the user's tensors) in eval mode with BatchNorm folded into
    the preceding convolution; ``bn="train"`` runs the user's own modules under no_grad, so batch statistics
    are used and running statistics update exactly as in YOLOv5-style freezing. ``entries`` are the modules
    to run, each with its record key (unit, member) and dotted name; ``cached`` the units a cache hit skips.
    """

    def __init__(
        self,
        table: BlockTable,
        part: Partition,
        entries: list[tuple[tuple[int, int], str, nn.Module]],
        config: FreezeConfig,
        *,
        cached: set[int] = frozenset(),
        readers: dict[tuple[int, int], set[int]] | None = None,
    ):
        self.table, self.part = table, part
        # dtype pre-casts the copies; weights="int8"/"fp8" stores their Linear/Conv weights in one byte instead
        # (freezert.quant), activations staying in the model's dtype.
        self.quant, self.dtype = config.weights, config.dtype
        self.channels_last, self.graphs = config.channels_last, config.graphs
        frozen_mode = config.bn == "frozen"
        self.fold = frozen_mode
        self.names = [name for _, name, _ in entries]
        self.runners = [_Runner(m, self, key, copy_module=frozen_mode) for key, _, m in entries]
        self.by_key = {r.key: r for r in self.runners}
        if frozen_mode:
            for r in self.runners:
                r.__dict__["target"].eval()
        self.block_runners = [self.by_key[(i, 0)] for i in range(part.k) if (i, 0) in self.by_key]
        self.cached_runners = [r for r in self.runners if r.key[0] in cached]
        self._readers = dict(readers or {})  # (unit, member) -> the units the record saw read its first output
        # Only private copies may be folded or recast; the user's own modules (bn="train") never are.
        self.prepared = not frozen_mode
        self._scan: FoldScan | None = None
        self.folded = 0
        self._graphs: dict[tuple, tuple] = {}
        originals = [m for _, _, m in entries]
        self._records = [(o, kind, key, t, t._version, t.data_ptr()) for o, kind, key, t in _tensor_records(originals)]
        # DDP rewrites buffers in place every step with identical values: compare those by value.
        self._buffer_values = {id(t): t.detach().clone() for _, kind, _, t, _, _ in self._records if kind == "b"}

    @property
    def device(self) -> torch.device | None:
        """Where the frozen weights are (None for a segment without tensors)."""
        return self._records[0][3].device if self._records else None

    # -- preparing: the first call runs unfolded, in the model's dtype, and finds the conv->BN pairs ---------
    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the first call through the runners: afterwards BatchNorm is folded and weights pre-cast."""
        if self.prepared:
            yield
            return
        self._scan = FoldScan([r.__dict__["target"] for r in self.runners]) if self.fold else None
        try:
            yield
        except BaseException:
            if self._scan is not None:
                self._scan.close()
                self._scan = None
            raise
        self._finish()

    def _finish(self) -> None:
        pairs = self._scan.close() if self._scan is not None else []
        self._scan = None
        owner = {id(m): r for r in self.runners for m in r.__dict__["target"].modules()}
        for conv, bn in pairs:
            conv_runner, bn_runner = owner.get(id(conv)), owner.get(id(bn))
            if bn.running_mean is None or bn.training or conv_runner is None or bn_runner is None:
                continue
            if conv_runner is not bn_runner and (
                conv_runner.__dict__["target"] is not conv
                or not self._readers.get(conv_runner.key, {None}) <= {bn_runner.key[0]}
            ):
                continue  # the conv's output is also read outside the BatchNorm's unit: folding would change it
            rest = after_fold(bn)
            if rest is None:
                continue
            fold_(conv, bn)
            if bn_runner.__dict__["target"] is bn:
                bn_runner.__dict__["target"] = rest
            else:
                _replace(bn_runner.__dict__["target"], bn, rest)
            self.folded += 1
        for r in self.runners:
            if self.quant is not None:
                r.__dict__["target"] = _quantized(r.__dict__["target"], self.quant)
            _recast(r.__dict__["target"], self.dtype, self.channels_last)
        self.prepared = True

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
        """True once every runner a cache hit skips has run (so its output structure is known)."""
        return bool(self.cached_runners) and all(r.template is not None for r in self.cached_runners)

    @contextlib.contextmanager
    def replaying(self, batch: int, rows: dict[tuple[int, int, int], torch.Tensor]) -> Iterator[None]:
        """While active, the runners a cache hit skips return instead of running: ``rows`` (real tensors) for
        every output something outside the skipped part reads, a zero-cost placeholder of the recorded shape
        for outputs only the skipped part itself reads (it never looks at them)."""

        def replay(r: _Runner):
            spec, leaves = r.template
            out, n = [], 0
            for v in leaves:
                if isinstance(v, _Slot):
                    got = rows.get((*r.key, n))
                    v, n = (got if got is not None else v.placeholder(batch)), n + 1
                out.append(v)
            return _tree.unflatten(out, spec)

        try:
            for r in self.cached_runners:
                r.replay = lambda r=r: replay(r)
            yield
        finally:
            for r in self.cached_runners:
                r.replay = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[tuple[int, int], list[torch.Tensor]]]:
        """While active, the outputs of the runners a cache hit skips are collected, by record key."""
        got: dict[tuple[int, int], list[torch.Tensor]] = {}
        try:
            for r in self.cached_runners:
                r.captured = got
            yield got
        finally:
            for r in self.cached_runners:
                r.captured = None

    # -- driven mode: freezert runs the block graph itself and returns the boundary tensors --------------
    def run(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Runs the prefix on ``x``; returns ``{block index: output}`` for the boundary blocks."""
        if not self.prepared:
            with self.preparing():
                return self._run_eager(x)
        if self.graphs and x.is_cuda:
            return self._run_graphed(x)
        return self._run_eager(x)

    def run_from(self, y: dict[int, torch.Tensor], start: int) -> dict[int, torch.Tensor]:
        """Runs blocks ``start..k-1`` only, on ``y``: the outputs of blocks below ``start`` that they read (the
        boundary of a shallower cut at ``start``); returns this segment's boundary, as ``run`` does."""
        return self._run_eager(None, start, y)

    def _run_eager(self, x, start: int = 0, y: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        y = {} if y is None else dict(y)
        runners = self.block_runners
        run_blocks(self.table, runners.__getitem__, start, len(runners), y, x, free_after=self.part.free_after)
        return {j: y[j] for j in self.part.boundary}

    def _run_graphed(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        entry = self._graphs.get(key)
        if entry is None:
            static_in = x.detach().clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
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
