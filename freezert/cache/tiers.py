"""Tiers and slabs: a tier's budget and accounting, slot allocation, and the memory tiers' slabs of encoded rows
(device or host memory). The disk tier (``disk.DiskTier``) is a ``Tier`` too."""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import _native
from .._codecs import CODECS

__all__ = ["MemSlab", "MemTier", "Slab", "Tier", "available_ram"]

TIERS = ("device", "host", "disk")
WHERE = {"auto": ("device", "host", "disk"), "cuda": ("device",), "host": ("host",), "disk": ("disk",)}


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Tier:
    """One tier's budget and accounting, and its slabs: one per (layout, codec) (a layout's codec, and the fp32
    escape when used). ``used``/``rows`` count every row it indexes; ``shared`` the bytes of rows another writer
    owns (another rank's shard), which it serves but which do not count against its budget."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget = name, budget
        self.used = 0  # bytes of rows stored
        self.rows = 0
        self.shared = self.shared_rows = 0
        self.slabs: dict[tuple[Any, str], Slab] = {}
        self._sizes: dict[tuple[Any, str], int] = {}  # row_bytes per (layout, codec), on the put path per row
        self.readonly = False  # a disk tier whose directory cannot be written: serves rows, stores none

    def fits(self, nbytes: int) -> bool:
        return not self.readonly and self.used - self.shared + nbytes <= self.budget

    def row_bytes(self, layout: Any, codec: str) -> int:
        """Bytes one row of ``layout`` in ``codec`` takes here (what the budget counts)."""
        n = self._sizes.get((layout, codec))
        if n is None:
            n = self._sizes[(layout, codec)] = self._row_bytes(layout, codec)
        return n

    def _row_bytes(self, layout: Any, codec: str) -> int:
        return CODECS[codec].row_bytes(layout.dims)

    def slab(self, layout: Any, codec: str) -> Slab:
        """The slab holding rows of ``layout`` in ``codec``, made on first use."""
        raise NotImplementedError

    def account(self, slab: Slab, nbytes: int, n: int) -> None:
        """Adds (n = 1) or removes (n = -1) one row of ``nbytes`` held by ``slab``."""
        self.used += n * nbytes
        self.rows += n
        if slab.shared:
            self.shared += n * nbytes
            self.shared_rows += n

    def allocated(self) -> int:
        return sum(s.nbytes() for s in self.slabs.values())

    def clear(self) -> None:
        """Drops every row (memory freed)."""
        self.used = self.rows = self.shared = self.shared_rows = 0
        for slab in self.slabs.values():
            slab.free_memory()


class MemTier(Tier):
    """The device tier (memory of the bound device) or the host tier (CPU memory, pinned when the model is on
    CUDA, so the GPU reads it directly)."""

    def __init__(self, name: str, budget: float, device: torch.device):
        super().__init__(name, budget)
        self.device = device if name == "device" else torch.device("cpu")
        self.pinned = name == "host" and device.type == "cuda" and torch.cuda.is_available()

    def slab(self, layout: Any, codec: str) -> Slab:
        slab = self.slabs.get((layout, codec))
        if slab is None:
            per = self.row_bytes(layout, codec)
            cap = int(min(self.budget, 2**62) // max(per, 1))
            slab = self.slabs[(layout, codec)] = MemSlab(layout, codec, self.device, self.pinned, cap)
        return slab

    def move(self, device: torch.device) -> None:
        """The bound device changed: device rows move there; host rows get pinned for a CUDA device."""
        pinned = device.type == "cuda" and torch.cuda.is_available()
        if self.name == "device":
            self.device = device
            for slab in self.slabs.values():
                slab.move(device, False)
        elif pinned and not self.pinned:
            self.pinned = True
            for slab in self.slabs.values():
                slab.move(torch.device("cpu"), True)


class Slab:
    """Slot allocation shared by memory and disk slabs: the rows of one layout in one codec."""

    shared = False  # rows another writer owns (another rank's shard): served, never written or evicted
    readonly = False

    def __init__(self, layout: Any, codec: str):
        self.layout, self.codec = layout, codec
        self.dims = layout.dims
        self.free: list[int] = []
        self.top = 0  # slots ever handed out (high-water mark)

    def alloc(self) -> int:
        if self.free:
            return self.free.pop()
        self.top += 1
        return self.top - 1

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def reset(self) -> None:
        self.free, self.top = [], 0


class MemSlab(Slab):
    """Rows in tensors (cap, D_i) of the codec's store dtype (+ float32 scales (cap,) for fp8)."""

    def __init__(self, layout: Any, codec: str, device: torch.device, pinned: bool, max_slots: int):
        super().__init__(layout, codec)
        self.device, self.pinned, self.max_slots = device, pinned, max(1, max_slots)
        self.cap = 0
        self.stores: list[torch.Tensor] = []
        self.scales: list[torch.Tensor | None] = []
        # A GPU gather of a pinned store runs after decode() returns; torch's pinned allocator does not know
        # the kernel reads the block. The CPU waits on this event before it frees or rewrites the store.
        self._reading: Any = None
        self._alloc_tensors(0)

    def _wait_reads(self) -> None:
        if self._reading is not None:
            self._reading.synchronize()
            self._reading = None

    def _new(self, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty((n, d) if d >= 0 else (n,), dtype=dtype, device=self.device)
        return t.pin_memory() if self.pinned and n else t

    def _alloc_tensors(self, cap: int) -> None:
        self._wait_reads()
        old_s, old_c, n = self.stores, self.scales, min(self.cap, cap, self.top)
        c = CODECS[self.codec]
        self.stores = [self._new(cap, d, c.store) for d in self.dims]
        self.scales = [self._new(cap, -1, torch.float32) if c.scaled else None for _ in self.dims]
        for i in range(len(old_s) if n else 0):
            self.stores[i][:n].copy_(old_s[i][:n])
            if old_c[i] is not None:
                self.scales[i][:n].copy_(old_c[i][:n])
        self.cap = cap

    def ensure(self, slots_needed: int) -> None:
        if slots_needed > self.cap:
            self._alloc_tensors(max(slots_needed, min(self.max_slots, max(2 * self.cap, 16))))

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.stores) + sum(
            c.numel() * 4 for c in self.scales if c is not None
        )

    def move(self, device: torch.device, pinned: bool) -> None:
        self._wait_reads()
        self.device, self.pinned = device, pinned
        self.stores = [s.to(device) for s in self.stores]
        self.scales = [c.to(device) if c is not None else None for c in self.scales]
        if pinned:
            self.stores = [s.pin_memory() if s.numel() else s for s in self.stores]
            self.scales = [c.pin_memory() if c is not None and c.numel() else c for c in self.scales]

    def free_memory(self) -> None:
        self.reset()
        self._alloc_tensors(0)

    def encode(self, slots: list[int], src: list[torch.Tensor]) -> None:
        """Encodes float rows src[i] (n, D_i) into the given slots."""
        self.ensure(max(slots) + 1)
        for i, x in enumerate(src):
            store, sc = self.stores[i], self.scales[i]
            if x.device == store.device:
                pass
            elif not (x.device.type == "cuda" and store.device.type == "cpu" and store.is_pinned()):
                x = x.to(store.device)
            if x.device.type == "cpu":  # written by the CPU, not in stream order after a pending GPU gather
                self._wait_reads()
            idx = torch.tensor(slots, dtype=torch.int64).to(x.device)
            _native.encode_scatter(x.contiguous(), idx, store, sc, self.codec)
            if x.device.type == "cuda" and store.device.type == "cpu":
                torch.cuda.current_stream(x.device).synchronize()  # the CPU may read the pinned store next

    def decode(self, slots: list[int], outs: list[torch.Tensor]) -> None:
        """outs[i] (n, D_i) float32/16/bf16 <- decoded rows."""
        for i, out in enumerate(outs):
            store, sc = self.stores[i], self.scales[i]
            direct = store.device == out.device or (
                out.device.type == "cuda" and store.device.type == "cpu" and store.is_pinned()
            )
            target = out if direct else torch.empty(out.shape, dtype=out.dtype, device=store.device)
            idx = torch.tensor(slots, dtype=torch.int64).to(target.device)
            _native.gather_decode(store, sc, idx, target, self.codec)
            if target.device.type == "cuda" and store.device.type == "cpu":
                self._reading = torch.cuda.current_stream(target.device).record_event()
            if not direct:
                out.copy_(target)

    def read_raw(self, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device)
        return [s[idx].cpu() for s in self.stores], [c[idx].cpu() if c is not None else None for c in self.scales]

    def write_raw(self, slots: list[int], payload: list[torch.Tensor], scales: list[torch.Tensor | None]) -> None:
        self.ensure(max(slots) + 1)
        self._wait_reads()
        idx = torch.tensor(slots, dtype=torch.int64).to(self.device)
        for i in range(len(self.dims)):
            self.stores[i][idx] = payload[i].to(self.device)
            if self.scales[i] is not None:
                self.scales[i][idx] = scales[i].to(self.device)
