"""``FrozenSegment``: the frozen prefix run as inference (no_grad, BN folded, weights pre-cast, graphs), and
``run_blocks``, the one executor of a block sequence for the prefix and the trainable tail alike."""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Iterator

import torch
import torch.nn as nn

from . import _tree
from .blocks import BlockTable
from .config import FreezeConfig
from .fold import FoldScan, after_fold, fold_
from .partition import Partition
from .runner import _Runner, _Slot, model_layout

# How the segment stores one-byte weights: a scale per 32 weights of a row, and layers under 16K weights left in
# float (a CNN's first and narrow layers: few bytes, the ones its output is most sensitive to). Measured output
# error (docs/MEMORY.md): int8 1.3% on ViT and GPT-2, 2.4% on YOLOv8n, 0.6% on MobileNetV3, per channel 2-8%.
ONE_BYTE = {"group_size": 32, "min_weights": 16384}


def _quantized(target: nn.Module, fmt: str) -> nn.Module:
    """``target`` (a private copy) with its Linear/Conv weights stored in ``fmt``; a bare layer is replaced too."""
    from .quant import quantize_frozen_

    holder = nn.Sequential(target)  # quantize_frozen_ swaps layers in their parent: give a bare layer one
    quantize_frozen_(holder, fmt, **ONE_BYTE)
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


def _channels_last_pays(targets: list[nn.Module], dtype: torch.dtype | None) -> bool:
    """``channels_last="auto"``: a channels_last segment where it was measured faster than the model's own layout:
    2-D convolutions on CPU in float32 or bfloat16, which oneDNN runs without reordering each input (the frozen
    prefixes of YOLOv8n, YOLO11n, ResNet-50 and MobileNetV3 in 0.58-0.97x the time of the folded prefix in the
    model's layout, benchmarks/bench_prefix_layout.py). Not on CUDA (not measured there yet), not for float64 (no
    oneDNN kernel)."""
    if not torch.backends.mkldnn.is_available():
        return False
    for target in targets:
        for m in target.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                return w.device.type == "cpu" and (dtype or w.dtype) in (torch.float32, torch.bfloat16)
    return False


_PLAIN = (bool, int, float, str, type(None))


def _settings(m: nn.Module) -> list[tuple[str, object]]:
    """A module's plain settings (BatchNorm's ``eps``, an activation's ``inplace``, a conv's ``stride``): what
    changes its function besides its tensors and children. The mode is not one (frozen modules run in eval)."""
    out = []
    for k, v in m.__dict__.items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
            out.append((k, v))
    return out


def structure_of(modules: list[nn.Module]) -> list:
    """The frozen modules' structure as plain data: every submodule's type, children and settings (what the
    cache's fingerprint holds besides the tensors: another activation or eps is another function)."""
    return [
        (name, f"{type(m).__module__}.{type(m).__qualname__}", _settings(m))
        for top in modules
        for name, m in top.named_modules()
    ]


def frozen_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, in the segment's record order (what fingerprints hash)."""
    return [t for _, _, _, t in _tensor_records(modules)]


def _storage(t: torch.Tensor) -> tuple:
    return str(t.device), t.untyped_storage().data_ptr()


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
        # "auto" is settled when the segment is prepared (it needs the weights' device and dtype)
        self.layout, self.graphs = config.channels_last, config.graphs
        self.channels_last = config.channels_last is True
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
        # a channels_last segment hands back the model's layout where its outputs leave it: a runner whose output
        # only other runners read keeps channels_last (no copy back and forth); ``run`` converts the boundary
        units = {key[0] for key in self.by_key}
        for r in self.runners:
            ctx = self._readers.get(r.key)
            r.leaves = ctx is None or not ctx <= units
        self.driving = False  # inside run(): the runners feed each other, the boundary is converted at the end
        # Only private copies may be folded or recast; the user's own modules (bn="train") never are.
        self.prepared = not frozen_mode
        self._scan: FoldScan | None = None
        self.folded = 0
        self._graphs: dict[tuple, tuple] = {}
        originals = [m for _, _, m in entries]
        self._records = [(o, kind, key, t, t._version, t.data_ptr()) for o, kind, key, t in _tensor_records(originals)]
        self._released: list[tuple[torch.Tensor, torch.device]] = []  # release_originals(): tensor, its device
        # DDP rewrites buffers in place every step with identical values: compare those by value.
        self._buffer_values = {id(t): t.detach().clone() for _, kind, _, t, _, _ in self._records if kind == "b"}
        # Module edits after the build (another activation put in, a BatchNorm's eps changed) make it stale too:
        # per module, its children dict and its plain settings, read back each call by one C-level getter.
        self._shape = []
        for o in originals:
            for m in o.modules():
                keys = [k for k, _ in _settings(m)]
                getter = operator.itemgetter(*keys) if keys else (lambda d: ())
                now = getter(m.__dict__)
                self._shape.append((m, tuple(m._modules.values()), getter, now if len(keys) != 1 else (now,)))

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
        if self.layout == "auto":
            targets = [r.__dict__["target"] for r in self.runners]
            self.channels_last = self.quant is None and _channels_last_pays(targets, self.dtype)
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
        released = {id(t) for t, _ in self._released}  # released originals stay where release_originals put them
        for _, _, _, t, _, _ in self._records:
            if t.device != device and id(t) not in released:
                t.data = t.data.to(device, non_blocking=non_blocking)
        self._refresh_records()
        self._buffer_values = {k: v.to(device) for k, v in self._buffer_values.items()}
        self._graphs.clear()  # captured graphs point at the old memory

    def release_originals(self, device: torch.device) -> int:
        """Moves the user's frozen tensors that no private copy reads (a one-byte segment's float weights, folded
        BatchNorms) to ``device``, keeping their identity; returns the bytes moved. ``restore_originals`` brings
        them back before anything runs the user's modules."""
        if self._released:
            return 0
        moved = 0
        for t in self.unused_originals():
            if t.device != device:
                self._released.append((t, t.device))
                moved += t.untyped_storage().nbytes()
                t.data = t.data.to(device)
        self._refresh_records()
        return moved

    def unused_originals(self) -> list[torch.Tensor]:
        """The user's frozen tensors that no private copy reads (once prepared: the float weights a one-byte
        segment quantized, folded BatchNorms' parameters and statistics)."""
        targets = [r.__dict__["target"] for r in self.runners]
        used = {_storage(t) for m in targets for t in [*m.parameters(), *m.buffers()]}
        return [t for _, _, _, t, _, _ in self._records if _storage(t) not in used]

    def restore_originals(self) -> None:
        """The released tensors back where they were."""
        if self._released:
            for t, device in self._released:
                t.data = t.data.to(device, non_blocking=device.type == "cuda")
            self._released = []
            self._refresh_records()

    def _refresh_records(self) -> None:
        self._records = [(o, kind, key, t, t._version, t.data_ptr()) for o, kind, key, t, _, _ in self._records]

    def own_bytes(self) -> int:
        """Bytes of the tensors this segment holds of its own: folded, pre-cast and one-byte weights of its private
        copies (tensors shared with the user's model not counted), and the buffer values it compares against."""
        user = {_storage(t) for _, _, _, t, _, _ in self._records}
        seen: dict[tuple, int] = {}
        for r in self.runners:
            target = r.__dict__["target"]
            for t in [*target.parameters(), *target.buffers()]:
                key = _storage(t)
                if key not in user:
                    seen.setdefault(key, t.untyped_storage().nbytes())
        for v in self._buffer_values.values():
            seen.setdefault(_storage(v), v.untyped_storage().nbytes())
        return sum(seen.values())

    def is_stale(self) -> bool:
        """True when the user's frozen modules changed since the build: their tensors (load_state_dict, .to(),
        in-place edits), their submodules (one replaced) or their settings (an eps, an activation's inplace)."""
        for m, kids, getter, settings in self._shape:
            if tuple(m._modules.values()) != kids:  # modules compare by identity
                return True
            try:
                now = getter(m.__dict__)
            except KeyError:  # a setting deleted
                return True
            if (now if isinstance(now, tuple) and len(settings) != 1 else (now,)) != settings:
                return True
        for i, (owner, kind, key, t, version, ptr) in enumerate(self._records):
            store = owner._parameters if kind == "p" else owner._buffers
            if store.get(key) is not t or t.data_ptr() != ptr:
                return True
            if t._version != version:
                if kind == "p" or not torch.equal(t, self._buffer_values[id(t)].to(t.device)):
                    return True
                self._records[i] = (owner, kind, key, t, t._version, ptr)
        return False

    # -- installed: the user's frozen modules run through the runners -----------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """While active, each frozen module's ``forward`` is its runner's. The modules stay where they are in
        the model, so the model's own code, ``isinstance`` checks and every hook (registered before or after the
        wrap, by the user or by a library such as transformers) see the user's modules."""
        done: list[tuple[nn.Module, object]] = []
        try:
            for r in self.runners:
                o = r.__dict__["original"]
                prev = o.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) runs as before
                r.__dict__["plain"] = prev if prev is not None else types.MethodType(type(o).forward, o)
                o.__dict__["forward"] = r.forward
                done.append((o, prev))
            yield
        finally:
            for o, prev in reversed(done):
                if prev is None:
                    o.__dict__.pop("forward", None)
                else:
                    o.__dict__["forward"] = prev

    @property
    def can_replay(self) -> bool:
        """True once every runner a cache hit skips has run (so its output structure is known)."""
        return bool(self.cached_runners) and all(r.template is not None for r in self.cached_runners)

    @contextlib.contextmanager
    def replaying(self, batch: int, rows: dict[tuple[int, int, int], torch.Tensor]) -> Iterator[None]:
        """While active, the runners a cache hit skips return instead of running: ``rows`` (real tensors) for
        every output something outside the skipped part reads, a placeholder of the recorded shape for outputs
        only the skipped part itself reads (reading its values raises ``PlaceholderRead``)."""

        def replay(r: _Runner):
            spec, leaves = r.template
            out, n = [], 0
            for v in leaves:
                if isinstance(v, _Slot):
                    got = rows.get((*r.key, n))
                    if got is not None and v.requires_grad and got.is_floating_point():
                        got = got.detach().requires_grad_(True)
                    v, n = (got if got is not None else v.placeholder(batch, (*r.key, n))), n + 1
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
        blocks = [r.__dict__["original"] for r in self.block_runners]
        self.driving = True
        try:
            with self.installed():  # through the user's blocks: their hooks fire
                run_blocks(self.table, blocks.__getitem__, start, len(blocks), y, x, free_after=self.part.free_after)
        finally:
            self.driving = False
        back = self.channels_last and self.layout == "auto"  # (channels_last=True: the user asked for that layout)
        return {j: _tree.map_tensors(y[j], model_layout) if back else y[j] for j in self.part.boundary}

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
