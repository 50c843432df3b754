"""``FrozenModel`` and ``wrap()``: a model with its first blocks frozen and run as an inference segment."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import spec as _spec
from ._errors import FreezeError
from .blocks import BlockTable, block_table
from .partition import Partition, partition
from .segment import FrozenSegment


def _bn_modules(modules) -> Iterator[_BatchNorm]:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                yield sub


class FrozenModel(nn.Module):
    """Behaves like ``model`` with some blocks frozen; the frozen prefix runs as a no-grad inference segment.

    ``state_dict()``/``load_state_dict()`` are the wrapped model's own (same keys), so checkpoints move freely
    between the wrapped and the plain model.
    """

    def __init__(
        self,
        model: nn.Module,
        freeze=10,
        *,
        blocks: str | None = None,
        bn: str = "frozen",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        graphs: bool = False,
    ):
        super().__init__()
        if isinstance(model, FrozenModel):
            raise FreezeError("the model is already a FrozenModel; wrap the plain model (fm.unwrap()) instead")
        _spec.check_options(bn, dtype, channels_last, graphs)
        table = block_table(model, blocks)
        frozen = _spec.resolve(freeze, table)
        self.model = model
        self.bn, self.dtype, self.channels_last, self.graphs = bn, dtype, channels_last, graphs
        self._table: BlockTable = table
        self._params = list(model.parameters())
        self._requires_grad = [p.requires_grad for p in self._params]
        self._save = self._yolo_save(table)
        self._segment: FrozenSegment | None = None
        self._unwrapped = False
        self._set_frozen(frozen)

    # -- the frozen set --------------------------------------------------------------------------------
    @staticmethod
    def _yolo_save(table: BlockTable) -> set[int]:
        if table.kind != "yolo":
            return set()
        save = set()
        for i, m in enumerate(table.modules):
            for x in m.f if isinstance(m.f, (list, tuple)) else [m.f]:
                if x != -1:
                    save.add(x % i)
        return save

    def _frozen_modules(self) -> list[nn.Module]:
        mods = [self._table.modules[i] for i in self._part.frozen]
        if 0 in self._part.frozen:
            mods += [m for _, m in self._table.stem]
        return mods

    def _set_frozen(self, frozen: list[int]) -> None:
        k = _spec.prefix_length(frozen)
        self._part: Partition = partition(self._table, frozen, k)
        frozen_ids = {id(p) for m in self._frozen_modules() for p in m.parameters()}
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg and id(p) not in frozen_ids)
        self._segment = None
        self._enforce_bn_modes()

    def set_freeze(self, freeze) -> None:
        """Changes the frozen set (anything ``freeze=`` accepts); parameters keep their identity."""
        self._check_live()
        self._set_frozen(_spec.resolve(freeze, self._table))

    def _enforce_bn_modes(self) -> None:
        training = self.model.training
        frozen = set(map(id, _bn_modules(self._frozen_modules()))) if self.bn == "frozen" else set()
        for m in _bn_modules([self.model]):
            m.train(training and id(m) not in frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self._unwrapped:
            self._enforce_bn_modes()  # .train() must not undo frozen BatchNorm (pytorch#66073)
        return self

    # -- introspection -----------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The block sequence, as (dotted name, module) pairs."""
        return list(zip(self._table.names, self._table.modules))

    @property
    def frozen_indices(self) -> list[int]:
        """Sorted indices of the frozen blocks."""
        return list(self._part.frozen)

    @property
    def boundary(self) -> list[int]:
        """Prefix blocks whose outputs the trainable part reads."""
        return list(self._part.boundary)

    @property
    def prefix_length(self) -> int:
        """Number of blocks (from block 0) that run as the inference segment."""
        return self._part.k

    @property
    def segment(self) -> FrozenSegment | None:
        """The inference segment, built at the first forward (None before, or when nothing is frozen)."""
        return self._segment

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: hand these to the optimizer."""
        return [p for p in self._params if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen blocks (and of the stem when block 0 is frozen)."""
        ids: set[int] = set()
        out = []
        for m in self._frozen_modules():
            for p in m.parameters():
                if id(p) not in ids:
                    ids.add(id(p))
                    out.append(p)
        return out

    def unwrap(self) -> nn.Module:
        """Gives the user's model back with its original ``requires_grad`` flags and BatchNorm modes."""
        for p, rg in zip(self._params, self._requires_grad):
            p.requires_grad_(rg)
        for m in _bn_modules([self.model]):
            m.train(self.model.training)
        self._segment = None
        self._unwrapped = True
        return self.model

    def _check_live(self) -> None:
        if self._unwrapped:
            raise FreezeError("this FrozenModel was unwrapped; call freezert.wrap(model, ...) again to freeze it")

    # -- forward -----------------------------------------------------------------------------------------
    def _ensure_segment(self) -> FrozenSegment:
        seg = self._segment
        if seg is None or seg.is_stale():
            seg = self._segment = FrozenSegment(
                self._table,
                self._part,
                bn=self.bn,
                dtype=self.dtype,
                channels_last=self.channels_last,
                graphs=self.graphs,
            )
        return seg

    def forward(self, *args, **kwargs):
        self._check_live()
        if self._part.k == 0:
            return self.model(*args, **kwargs)
        seg = self._ensure_segment()
        driven = self._table.kind in ("yolo", "sequential")
        if driven and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return self._run_tail(seg.run(args[0]))
        with seg.swapped(self.model):
            return self.model(*args, **kwargs)

    def _run_tail(self, y: dict[int, torch.Tensor]):
        """Runs blocks k.. on the boundary tensors, following ``.f`` for YOLO-style graphs."""
        t, k = self._table, self._part.k
        x = y.get(k - 1)
        for i in range(k, len(t)):
            m = t.modules[i]
            if t.kind == "yolo" and m.f != -1:
                x = y[m.f % i] if isinstance(m.f, int) else [x if j == -1 else y[j % i] for j in m.f]
            x = m(x)
            if i in self._save:
                y[i] = x
        return x

    # -- state and copies --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """The wrapped model's own state_dict (same keys as the plain model)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads into the wrapped model; the segment notices the new weights and rebuilds."""
        out = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        self._segment = None
        return out

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._segment = None  # built again, on the new device/dtype, at the next forward
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_segment"] = None  # rebuilt lazily after unpickling / deep-copying
        return state

    def extra_repr(self) -> str:
        p = self._part
        return f"frozen={list(p.frozen)}, prefix={p.k}, boundary={list(p.boundary)}, bn={self.bn!r}"


def wrap(
    model: nn.Module,
    freeze=10,
    *,
    blocks: str | None = None,
    bn: str = "frozen",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    graphs: bool = False,
) -> FrozenModel:
    """Returns ``model`` with blocks frozen per ``freeze=`` (int, list, name prefix(es), fraction or predicate)."""
    return FrozenModel(
        model, freeze, blocks=blocks, bn=bn, dtype=dtype, channels_last=channels_last, graphs=graphs
    )


def inspect(model: nn.Module, freeze=None, *, blocks: str | None = None) -> str:
    """The block table of ``model``: index, dotted name, type, parameters, and where the cut falls."""
    t = block_table(model, blocks)
    frozen = _spec.resolve(freeze, t)
    k = _spec.prefix_length(frozen)
    part = partition(t, frozen, k)
    where = f"at {t.path!r}" if t.path else "at the root"
    lines = [f"{type(model).__name__}: {len(t)} blocks {where} ({t.kind})"]
    lines.append(f"{'idx':>4}  {'name':<32} {'type':<22} {'params':>12}  state")

    def row(idx, name, m, state):
        n = sum(p.numel() for p in m.parameters())
        lines.append(f"{idx:>4}  {name:<32} {type(m).__name__:<22} {n:>12,}  {state}")

    for name, m in t.stem:
        row("stem", name, m, "frozen (with block 0)" if 0 in frozen else "train")
    fs = set(frozen)
    for i, (name, m) in enumerate(zip(t.names, t.modules)):
        if k and i == k:
            b = ", ".join(map(str, part.boundary))
            lines.append(f"{'':>4}  ---- cut: blocks 0..{k - 1} run as the inference segment; boundary: {b} ----")
        state = "frozen" if i in fs else "train"
        if i in fs and i >= k:
            state = "frozen (eager: after a trainable block)"
        row(i, name, m, state)
    total = sum(p.numel() for p in model.parameters())
    fz = sum(p.numel() for i in frozen for p in t.modules[i].parameters())
    if 0 in fs:
        fz += sum(p.numel() for _, m in t.stem for p in m.parameters())
    lines.append(f"frozen {fz:,} of {total:,} parameters ({100 * fz / max(total, 1):.1f}%)")
    return "\n".join(lines)
