"""``FeatureCache``: the frozen prefix's boundary tensors, computed once and kept compactly.

Rows (one per sample, keyed by an int64: a content hash or an explicit id) live in fixed-size
slots of up to three tiers: ``device`` (memory of the bound device: CUDA, or CPU for a CPU model),
``host`` (CPU memory, pinned when the model runs on CUDA, read by the GPU directly) and ``disk``
(a memory-mapped directory, every record checksummed, persistent across processes).
See docs/CACHE.md for the format, the error bounds and the policies.
"""

from __future__ import annotations

import atexit
import collections
import json
import math
import mmap
import os
import re
import shutil
import tempfile
import time
import warnings
import weakref
from typing import Any

import torch

from . import _native
from ._errors import CacheError

__all__ = ["FeatureCache", "fingerprint_of"]

_FORMAT = "freezert-feature-cache"
_VERSION = 1
_HEADER, _INDEX = "header.json", "index.pt"
_CHK_SEED = 0x46524B4348  # seed of the record checksum (hash_rows): never change, records persist
_ESC = "fp32"  # per-row escape codec for rows outside the main codec's range
_FINITE_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}
_FP8_TINY = 1e-30  # a nonzero row amax below this would make the fp8 scale lose precision
_ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
_IO = (torch.float32, torch.float16, torch.bfloat16)
_TIERS = ("device", "host", "disk")
_WHERE = {"auto": ("device", "host", "disk"), "cuda": ("device",), "host": ("host",), "disk": ("disk",)}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class _Recompute(CacheError):
    """``get`` found disk records that failed their checksum; they were dropped: recompute ``keys``."""

    def __init__(self, keys: list[int]):
        self.keys = keys
        super().__init__(
            f"{len(keys)} cached disk record(s) failed their checksum and were dropped (keys {keys[:8]}"
            f"{' ...' if len(keys) > 8 else ''}); recompute them (call lookup() before get(): it verifies records)"
        )


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def fingerprint_of(tensors: list[torch.Tensor], **facts: Any) -> str:
    """16-hex-digit fingerprint of the frozen weights (content, shape, dtype) and ``facts``."""
    import hashlib

    h = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    chunk = 1 << 16
    for t in tensors:
        t = t.detach()
        h.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        body = n - n % chunk
        parts = []
        if body:  # many rows: the native hash runs them in parallel
            parts.append(_native.hash_rows(flat[:body].reshape(-1, chunk)))
        parts.append(_native.hash_rows(flat[body:].reshape(1, -1)))
        h.update(b"".join(int(v).to_bytes(8, "little", signed=True) for p in parts for v in p.cpu().tolist()))
    return h.hexdigest()[:16]


def _parse_bytes(name: str, value: Any, *, allow_none: bool = False) -> float:
    """Bytes from an int or a string like '20GiB'; math.inf for None (where allowed) or 'unlimited'."""
    if value is None and allow_none:
        return math.inf
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "inf", "none") and allow_none:
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= 0 and math.isfinite(value):
            return float(int(value))
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return float(int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    extra = " or None (unlimited)" if allow_none else ""
    raise CacheError(
        f"{name}={value!r} is not a size; pass a non-negative int of bytes or a string like '20GiB', "
        f"'512MiB', '1.5GB'{extra}"
    )


def _available_ram() -> int:
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


def _fmt_bytes(n: float) -> str:
    if n == math.inf:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _layout_json(layout) -> list:
    return [[list(s), str(d).replace("torch.", "")] for s, d in layout]


def _layout_from_json(obj) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(int(v) for v in s), getattr(torch, d)) for s, d in obj]


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# slabs: fixed-size slots of one codec
# ---------------------------------------------------------------------------------------------------------------
class _Slab:
    """Slot allocation shared by memory and disk slabs."""

    def __init__(self, codec: str, dims: list[int]):
        self.codec = codec
        self.dims = dims
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


class _MemSlab(_Slab):
    """Rows in tensors (cap, D_i) of the codec's store dtype (+ float32 scales (cap,) for fp8)."""

    def __init__(self, codec: str, dims: list[int], device: torch.device, pinned: bool, max_slots: int):
        super().__init__(codec, dims)
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
        sdt = _native.CODECS[self.codec]
        self.stores = [self._new(cap, d, sdt) for d in self.dims]
        self.scales = [self._new(cap, -1, torch.float32) if self.codec == "fp8" else None for _ in self.dims]
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
            _native.encode_scatter(x, idx, store, sc, self.codec)
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


class _DiskSlab(_Slab):
    """Records of fixed size in a memory-mapped file.

    Record: [checksum int64][key int64][fp8: float32 scale per tensor][payload of each tensor], padded to 8 bytes;
    checksum = hash_rows(record[8:], seed=_CHK_SEED), so it covers the key, the scales and the payload.
    """

    def __init__(self, codec: str, dims: list[int], file: str):
        super().__init__(codec, dims)
        esz = _ESIZE[codec]
        self.n_scales = len(dims) if codec == "fp8" else 0
        self.offsets, off = [], 16 + 4 * self.n_scales
        for d in dims:
            self.offsets.append(off)
            off += d * esz
        self.rec = (off + 7) // 8 * 8
        self.file = file
        self.fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        self.mm: mmap.mmap | None = None
        self.view: torch.Tensor | None = None
        self.cap = 0
        self._map(os.fstat(self.fd).st_size // self.rec)

    def _map(self, cap: int) -> None:
        self.view = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still referenced somewhere: the GC closes it later
                pass
        self.mm, self.cap = None, cap
        if cap:
            self.mm = mmap.mmap(self.fd, cap * self.rec)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.view = torch.frombuffer(self.mm, dtype=torch.uint8).view(cap, self.rec)

    def ensure(self, slots_needed: int) -> None:
        if slots_needed > self.cap:
            cap = max(slots_needed, 2 * self.cap, 16)
            os.ftruncate(self.fd, cap * self.rec)
            self._map(cap)

    def check_size(self) -> int:
        """Slots still backed by the file (another process may have truncated it); remaps when it shrank."""
        have = os.fstat(self.fd).st_size // self.rec
        if have < self.cap:
            self._map(have)
        return self.cap

    def nbytes(self) -> int:
        return self.cap * self.rec

    def truncate(self) -> None:
        self.reset()
        self._map(0)
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.flush()
        self._map(0)
        os.close(self.fd)
        self.fd = -1

    def flush(self) -> None:
        if self.mm is not None:
            self.mm.flush()

    # -- records ---------------------------------------------------------------------------------------------------
    def build(self, keys: list[int], payload: list[torch.Tensor], scales: list[torch.Tensor | None]) -> torch.Tensor:
        n = len(keys)
        rec = torch.zeros(n, self.rec, dtype=torch.uint8)
        rec[:, 8:16] = torch.tensor(keys, dtype=torch.int64).view(torch.uint8).view(n, 8)
        for i in range(self.n_scales):
            rec[:, 16 + 4 * i : 20 + 4 * i] = scales[i].float().contiguous().view(torch.uint8).view(n, 4)
        for i, (d, off) in enumerate(zip(self.dims, self.offsets)):
            nb = d * _ESIZE[self.codec]
            if nb:
                rec[:, off : off + nb] = payload[i].contiguous().view(torch.uint8).view(n, nb)
        rec[:, 0:8] = _native.hash_rows(rec[:, 8:], seed=_CHK_SEED).view(torch.uint8).view(n, 8)
        return rec

    def write_records(self, slots: list[int], rec: torch.Tensor) -> None:
        self.ensure(max(slots) + 1)
        self.view[torch.tensor(slots, dtype=torch.int64)] = rec

    def encode(self, keys: list[int], slots: list[int], src: list[torch.Tensor]) -> None:
        n = len(slots)
        ar = torch.arange(n, dtype=torch.int64)
        payload, scales = [], []
        for x, d in zip(src, self.dims):
            x = x.cpu().contiguous()
            store = torch.empty(n, d, dtype=_native.CODECS[self.codec])
            sc = torch.empty(n, dtype=torch.float32) if self.codec == "fp8" else None
            _native.encode_scatter(x, ar, store, sc, self.codec)
            payload.append(store)
            scales.append(sc)
        self.write_records(slots, self.build(keys, payload, scales))

    def read(self, keys: list[int], slots: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """(records (n, rec), ok per record): ok = inside the file, key matches, checksum matches."""
        cap = self.check_size()
        inside = [0 <= s < cap for s in slots]
        safe = [s if ok else 0 for s, ok in zip(slots, inside)]
        if cap == 0:
            return torch.zeros(len(slots), self.rec, dtype=torch.uint8), [False] * len(slots)
        rec = self.view[torch.tensor(safe, dtype=torch.int64)]  # a copy: later writes cannot change it
        chk = _native.hash_rows(rec[:, 8:], seed=_CHK_SEED)
        stored_chk = rec[:, 0:8].contiguous().view(torch.int64).view(-1)
        stored_key = rec[:, 8:16].contiguous().view(torch.int64).view(-1)
        good = (chk == stored_chk) & (stored_key == torch.tensor(keys, dtype=torch.int64))
        return rec, [bool(g) and i for g, i in zip(good.tolist(), inside)]

    def unpack(self, rec: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        n, payload, scales = rec.shape[0], [], []
        sdt = _native.CODECS[self.codec]
        for i, (d, off) in enumerate(zip(self.dims, self.offsets)):
            nb = d * _ESIZE[self.codec]
            payload.append(rec[:, off : off + nb].contiguous().view(sdt).view(n, d))
            scales.append(
                rec[:, 16 + 4 * i : 20 + 4 * i].contiguous().view(torch.float32).view(n) if self.n_scales else None
            )
        return payload, scales

    def decode(self, rec: torch.Tensor, outs: list[torch.Tensor]) -> None:
        payload, scales = self.unpack(rec)
        ar = torch.arange(rec.shape[0], dtype=torch.int64)
        for i, out in enumerate(outs):
            target = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
            _native.gather_decode(payload[i], scales[i], ar, target, self.codec)
            if target is not out:
                out.copy_(target)


class _Tier:
    def __init__(self, name: str, budget: float):
        self.name, self.budget = name, budget
        self.used = 0  # bytes of rows stored
        self.rows = 0
        self.slabs: dict[str, Any] = {}  # codec -> slab (main codec, and the fp32 escape when used)

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget


def _close_disk(slabs: list, tmpdir: str | None) -> None:
    for s in slabs:
        if s.fd >= 0:
            try:
                s.close()
            except OSError:
                pass
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """Boundary tensors of the frozen prefix, per sample, in a compact codec across device/host/disk tiers.

    ``codec``: "fp16" (default), "bf16", "fp8" (e4m3 with a per-row scale) or "fp32" (exact).
    ``where``: "auto" (device until ``budget``, then host until ``host_budget``, then disk), "cuda", "host"
    or "disk". ``budget``: bytes (int or "20GiB"); the device tier's budget for "auto", else the one tier's.
    ``path``: the disk tier's directory (persistent); None = a temporary directory removed at exit.
    ``evict``: "lru" (default: a full cache evicts least-recently-used rows, counted) or "none" (a full
    cache stores nothing more, counted as ``skipped``; stored rows are never dropped).
    """

    def __init__(
        self,
        codec: str = "fp16",
        where: str = "auto",
        budget: Any = "20GiB",
        path: Any = None,
        *,
        host_budget: Any = None,
        disk_budget: Any = None,
        evict: str = "lru",
    ):
        if codec not in _native.CODECS:
            raise CacheError(f"codec={codec!r} is not supported; use one of 'fp16', 'bf16', 'fp8', 'fp32'")
        if where not in _WHERE:
            raise CacheError(f"where={where!r} is not a tier; use 'auto', 'cuda', 'host' or 'disk'")
        if evict not in ("lru", "none"):
            raise CacheError(f"evict={evict!r} is not a policy; use 'lru' (evict least-recently-used) or 'none'")
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise CacheError(f"path={path!r} is not a directory path; pass a str or os.PathLike, or None")
            if where not in ("auto", "disk"):
                raise CacheError(
                    f"path={os.fspath(path)!r} is only used by the disk tier, but where={where!r} has none; "
                    "use where='disk' or 'auto', or drop path="
                )
            path = os.fspath(path)
        self.codec, self.where, self.path, self.evict = codec, where, path, evict
        self._budget_arg = (budget, host_budget, disk_budget)
        b = _parse_bytes("budget", budget)
        hb = None if host_budget is None else _parse_bytes("host_budget", host_budget)
        db = _parse_bytes("disk_budget", disk_budget, allow_none=True)
        if where == "auto":
            self._budgets = {"device": b, "host": hb, "disk": db}  # host None: resolved at bind
        elif where == "cuda":
            self._budgets = {"device": b}
        elif where == "host":
            self._budgets = {"host": b if hb is None else hb}
        else:
            self._budgets = {"disk": b if disk_budget is None else db}
        self.fingerprint: str | None = None
        self.layout: list[tuple[tuple[int, ...], torch.dtype]] | None = None
        self.device: torch.device | None = None
        self._bound = False  # bind() succeeded at least once (a later change invalidates instead of refusing)
        self._tiers: list[_Tier] = []
        self._index: collections.OrderedDict[int, tuple[int, str, int]] = collections.OrderedDict()  # LRU first
        self._protected: set[int] = set()
        self._staged: dict[int, tuple[str, int, torch.Tensor]] = {}  # verified disk records of the last lookup
        self._disk_dir: str | None = None
        self._disk_slabs: list[_DiskSlab] = []  # shared with the finalizer, which closes them
        self._tmpdir: str | None = None
        self._finalizer: Any = None
        self._warned_nonfinite = False
        self._seg_s = 0.0
        self._seg_rows = 0
        self._get_s = 0.0
        self._counts = dict.fromkeys(
            ("lookups", "hits", "misses", "stores", "skipped", "nonfinite", "escaped", "evictions",
             "evicted_bytes", "invalidations", "corrupt", "extended"), 0)  # fmt: skip

    # -- binding ---------------------------------------------------------------------------------------------------
    def bind(self, fingerprint: str, layout, device) -> None:
        """Binds to the frozen setup ``fingerprint`` with per-sample boundary ``layout`` on ``device``."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise CacheError(f"fingerprint={fingerprint!r} is not a fingerprint; pass the str from fingerprint_of()")
        layout = self._check_layout(layout)
        device = torch.device(device)
        if self.where == "cuda" and device.type != "cuda":
            raise CacheError(
                f"where='cuda' keeps rows in CUDA memory, but the model runs on {device}; "
                "use where='host', 'disk' or 'auto'"
            )
        same = self.fingerprint == fingerprint and self.layout == layout
        if same and self._tiers:
            if device != self.device:
                self._move(device)
            self._bound = True
            return
        if self.fingerprint is not None and not same:
            if not self._bound:  # a loaded cache or an opened store of another setup: refuse, keep its data
                raise CacheError(self._foreign_msg(self.fingerprint, fingerprint, self._disk_dir or "the loaded cache"))
            self._invalidate()
        self.fingerprint, self.layout, self.device = fingerprint, layout, device
        try:
            self._build_tiers()
            if self.path is not None or self._disk_dir is not None:
                self._open_disk(self._disk_dir or self.path)
        except BaseException:
            self.fingerprint = self.layout = self.device = None
            self._tiers = []
            raise
        self._bound = True

    def extend(self, fingerprint: str, layout, device, convert, *, chunk_bytes: int = 64 * 2**20) -> int:
        """Re-binds to ``fingerprint``/``layout`` keeping every stored row, converted rather than dropped.

        For a deeper cut of the same frozen prefix: ``convert(rows)`` maps a batch of stored boundary rows (the
        bound layout, decoded on ``device``) to the new boundary's rows, batch-first in ``layout`` order.
        The converted rows are staged in host memory (at most half the available RAM, most recently used
        first; older rows beyond that are dropped and recomputed on their next miss), then stored under the new
        binding in their old LRU order. Records that fail their checksum are dropped, never converted.
        Returns how many rows were carried over (``stats()["extended"]`` adds them up).
        """
        if not self._bound or not self._tiers or not len(self._index) or fingerprint == self.fingerprint:
            self.bind(fingerprint, layout, device)
            return 0
        layout = self._check_layout(layout)
        counts, get_s = dict(self._counts), self._get_s
        row_bytes = sum(math.prod(s) * max(dt.itemsize, 4) for s, dt in self.layout)
        step = max(1, chunk_bytes // max(row_bytes, 1))
        order = list(self._index)
        try:
            staged = self._convert_rows(layout, convert, step, torch.device(device))
        except BaseException:  # nothing was re-bound: the rows, their LRU order and the traffic stay as they were
            for key in ("lookups", "hits"):
                self._counts[key] = counts[key]
            self._get_s = get_s
            for k in order:
                if k in self._index:
                    self._index.move_to_end(k)
            raise
        self.bind(fingerprint, layout, device)  # a new fingerprint: the old rows are dropped here
        carried = 0
        for ks, host in reversed(staged):  # oldest first, so the LRU order survives
            self.put(torch.tensor(ks, dtype=torch.int64), [t.to(self.device) for t in host])
            carried += len(ks)
        # what users read as traffic (lookups, hits, misses) and the invalidation are not the forward's doing
        for key in ("lookups", "hits", "misses", "invalidations"):
            self._counts[key] = counts[key]
        self._counts["extended"] += carried
        self._get_s = get_s
        self._seg_s = self._seg_rows = 0  # the segment's per-row time changed with its depth
        return carried

    def _convert_rows(self, layout, convert, step: int, device) -> list[tuple[list[int], list[torch.Tensor]]]:
        """``extend``'s first half: (keys, converted rows on the host) per chunk, most recently used first; the
        stored rows are decoded on ``device``, where the new binding (and ``convert``) runs."""
        room = _available_ram() / 2
        keys = list(self._index)  # LRU first (lookup and get reorder the index; extend restores the order)
        staged: list[tuple[list[int], list[torch.Tensor]]] = []
        for hi in range(len(keys), 0, -step):  # most recently used first: those are kept if RAM runs short
            chunk = keys[max(0, hi - step) : hi]
            hit = self.lookup(torch.tensor(chunk, dtype=torch.int64)).tolist()  # verifies disk records
            ks = [k for k, h in zip(chunk, hit) if h]
            try:
                rows = self.get(torch.tensor(ks, dtype=torch.int64), device) if ks else []
            except _Recompute as e:  # went bad after the lookup: dropped; convert the rest
                bad = set(e.keys)
                ks = [k for k in ks if k not in bad]
                rows = self.get(torch.tensor(ks, dtype=torch.int64), device) if ks else []
            if not ks:
                continue
            new = [t.detach() for t in convert(rows)]
            if len(new) != len(layout) or any(
                tuple(t.shape) != (len(ks), *shape) for t, (shape, _) in zip(new, layout)
            ):
                got = [tuple(t.shape) for t in new]
                raise CacheError(
                    f"extend(): convert() returned shapes {got} for {len(ks)} row(s), but the new layout needs "
                    f"{[(len(ks), *s) for s, _ in layout]}; return one batch-first tensor per boundary tensor"
                )
            host = [t.to("cpu") for t in new]
            room -= sum(t.numel() * t.element_size() for t in host)
            if room < 0:
                break
            staged.append((ks, host))
        return staged

    def _check_layout(self, layout) -> list[tuple[tuple[int, ...], torch.dtype]]:
        try:
            out = [(tuple(int(d) for d in shape), dt) for shape, dt in layout]
        except (TypeError, ValueError):
            raise CacheError(
                f"layout={layout!r} is not a list of (shape, dtype) pairs; pass one per boundary tensor"
            ) from None
        if not out:
            raise CacheError("layout=[] has no boundary tensor; pass one (shape, dtype) pair per boundary tensor")
        for shape, dt in out:
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize < 2:
                raise CacheError(
                    f"a boundary tensor of dtype {dt} cannot be cached: the codecs store floating rows; "
                    "cache a floating boundary (float32/float16/bfloat16/float64) or drop cache="
                )
            if any(d < 0 for d in shape):
                raise CacheError(f"boundary shape {shape} has a negative size; pass the per-sample shape")
        return out

    def _dims(self) -> list[int]:
        return [math.prod(s) for s, _ in self.layout]

    def _row_bytes(self, codec: str, tier: str) -> int:
        """Bytes one sample takes in a tier: the encoded row (memory) or the whole record (disk)."""
        if tier == "disk":
            return self._record_size(codec)
        return sum(self._dims()) * _ESIZE[codec] + (4 * len(self.layout) if codec == "fp8" else 0)

    def _record_size(self, codec: str) -> int:
        n = 16 + (4 * len(self.layout) if codec == "fp8" else 0) + sum(self._dims()) * _ESIZE[codec]
        return (n + 7) // 8 * 8

    def _build_tiers(self) -> None:
        budgets = dict(self._budgets)
        if "host" in budgets and budgets["host"] is None:  # auto: 4x budget, at most half the free RAM
            half = _available_ram() / 2
            if self.device.type == "cpu":  # the device tier is CPU memory too: share the half
                budgets["device"] = min(budgets["device"], half)
                half = max(0.0, half - budgets["device"])
            budgets["host"] = float(int(min(4 * budgets["device"], half)))
        tiers = [_Tier(n, budgets[n]) for n in _WHERE[self.where]]
        need = self._row_bytes(self.codec, "device")
        if not any(self._row_bytes(self.codec, t.name) <= t.budget for t in tiers):
            raise CacheError(
                f"the cache cannot hold a sample: one sample's boundary {[list(s) for s, _ in self.layout]} takes "
                f"{_fmt_bytes(need)} in codec {self.codec!r}, more than every tier's whole budget ("
                + ", ".join(f"{t.name} {_fmt_bytes(t.budget)}" for t in tiers)
                + "); raise budget=/host_budget=/disk_budget=, use a smaller codec, or drop cache="
            )
        self._tiers = tiers

    def _foreign_msg(self, stored: str, wanted: str, where: str) -> str:
        return (
            f"{where} holds features of fingerprint {stored}, but this model's frozen setup has fingerprint "
            f"{wanted} (other frozen weights, freeze depth, BN mode, dtype, codec or input shape); "
            f"clear it (FeatureCache(path=...).clear(), or delete the directory) or use another path"
        )

    def _invalidate(self) -> None:
        """Drops every row of the old setup; an open disk store is emptied and re-created for the new one."""
        self._drop_rows()
        self._counts["invalidations"] += 1
        if self._disk_dir is not None:
            for slab in self._disk_slabs:
                slab.close()
            self._disk_slabs[:] = []
            _remove_store_files(self._disk_dir)
        self._tiers = []

    def _move(self, device: torch.device) -> None:
        self.device = device
        pinned = device.type == "cuda" and torch.cuda.is_available()
        for t in self._tiers:
            for slab in t.slabs.values():
                if t.name == "device":
                    slab.move(device, False)
                elif t.name == "host" and pinned and not slab.pinned:
                    slab.move(torch.device("cpu"), True)

    # -- tiers and slabs -----------------------------------------------------------------------------------------
    def _tier(self, name: str) -> _Tier | None:
        return next((t for t in self._tiers if t.name == name), None)

    def _slab(self, ti: int, codec: str):
        tier = self._tiers[ti]
        slab = tier.slabs.get(codec)
        if slab is None:
            if tier.name == "disk":
                if self._disk_dir is None:
                    self._open_disk(None)
                slab = self._disk_slab(codec)
            else:
                dev = self.device if tier.name == "device" else torch.device("cpu")
                pinned = tier.name == "host" and self.device.type == "cuda" and torch.cuda.is_available()
                per = self._row_bytes(codec, tier.name)
                slab = _MemSlab(codec, self._dims(), dev, pinned, int(min(tier.budget, 2**62) // max(per, 1)))
            tier.slabs[codec] = slab
        return slab

    def _disk_slab(self, codec: str) -> _DiskSlab:
        disk = self._tier("disk")
        slab = disk.slabs.get(codec)
        if slab is None:
            slab = _DiskSlab(codec, self._dims(), os.path.join(self._disk_dir, f"slab_{codec}.bin"))
            self._disk_slabs.append(slab)
            disk.slabs[codec] = slab
        return slab

    def _open_disk(self, path: str | None) -> None:
        """Opens (or creates) the disk store; refuses one written for another fingerprint/layout/codec."""
        if path is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="freezert-cache-")
            path = self._tmpdir
        os.makedirs(path, exist_ok=True)
        head = _read_header(path)
        if head is not None:
            stored = head.get("fingerprint")
            if stored != self.fingerprint or head.get("codec") != self.codec:
                raise CacheError(
                    self._foreign_msg(f"{stored} (codec {head.get('codec')!r})",
                                      f"{self.fingerprint} (codec {self.codec!r})", f"the cache directory {path!r}")
                )  # fmt: skip
            if _layout_from_json(head.get("layout", [])) != self.layout:
                raise CacheError(
                    f"the cache directory {path!r} (fingerprint {stored}) holds boundary layout {head.get('layout')}, "
                    f"but this model produces {_layout_json(self.layout)}; clear it or use another path"
                )
        self._disk_dir = path
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _close_disk, self._disk_slabs, self._tmpdir)
            self._finalizer.atexit = False  # at exit _close_all flushes the index first, then closes
            _LIVE.add(self)
        for codec in (self.codec, _ESC):
            if os.path.exists(os.path.join(path, f"slab_{codec}.bin")):
                self._disk_slab(codec)
        if head is None:
            self._write_header(path)
        else:
            self._load_index(path)

    def _load_index(self, path: str) -> None:
        ti = next(i for i, t in enumerate(self._tiers) if t.name == "disk")
        disk = self._tiers[ti]
        try:
            idx = torch.load(os.path.join(path, _INDEX), weights_only=True)
            keys, codes, slots = idx["keys"].tolist(), idx["codec"].tolist(), idx["slot"].tolist()
        except FileNotFoundError:
            keys, codes, slots = [], [], []
        except Exception:  # an unreadable index: rebuild it from the self-describing, checksummed records
            keys, codes, slots = self._scan_records()
        for key, code, slot in zip(keys, codes, slots):
            codec = self.codec if code == 0 else _ESC
            slab = disk.slabs.get(codec)
            if slab is None or slot >= slab.cap:  # truncated file: the record is gone
                self._counts["corrupt"] += 1
                continue
            if key in self._index:
                continue
            self._index[key] = (ti, codec, slot)
            slab.top = max(slab.top, slot + 1)
            disk.used += self._row_bytes(codec, "disk")
            disk.rows += 1
        for codec, slab in disk.slabs.items():
            used = {s for (t, c, s) in self._index.values() if t == ti and c == codec}
            slab.free = [s for s in range(slab.top) if s not in used]

    def _scan_records(self) -> tuple[list[int], list[int], list[int]]:
        keys, codes, slots = [], [], []
        disk = self._tier("disk")
        for codec, slab in disk.slabs.items():
            for lo in range(0, slab.check_size(), 4096):
                n = min(4096, slab.cap - lo)
                rec = slab.view[lo : lo + n].clone()
                ks = rec[:, 8:16].contiguous().view(torch.int64).view(-1).tolist()
                _, ok = slab.read(ks, list(range(lo, lo + n)))
                for j in range(n):
                    if ok[j]:
                        keys.append(ks[j])
                        codes.append(0 if codec == self.codec else 1)
                        slots.append(lo + j)
        warnings.warn(f"freezert: the cache index in {self._disk_dir!r} was unreadable; rebuilt from {len(keys)} "
                      "verified records", stacklevel=3)  # fmt: skip
        return keys, codes, slots

    def _write_header(self, path: str, config: dict | None = None) -> None:
        head = {"format": _FORMAT, "version": _VERSION, "fingerprint": self.fingerprint,
                "layout": _layout_json(self.layout), "codec": self.codec, "escape_codec": _ESC,
                "checksum": f"hash_rows(record[8:], seed={_CHK_SEED:#x})"}  # fmt: skip
        if config is not None:
            head["config"] = config
        _write_atomic(os.path.join(path, _HEADER), json.dumps(head, indent=1).encode())

    def flush(self) -> None:
        """Writes the disk tier's index atomically (temp file + os.replace) and flushes its records."""
        if self._disk_dir is None or self._tier("disk") is None or self.fingerprint is None:
            return
        ti = next(i for i, t in enumerate(self._tiers) if t.name == "disk")
        for slab in self._tiers[ti].slabs.values():
            slab.flush()
        self._write_index(self._disk_dir, [(k, c, s) for k, (t, c, s) in self._index.items() if t == ti])

    def _write_index(self, path: str, entries: list[tuple[int, str, int]]) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"keys": torch.tensor([e[0] for e in entries], dtype=torch.int64),
                    "codec": torch.tensor([0 if e[1] == self.codec else 1 for e in entries], dtype=torch.int8),
                    "slot": torch.tensor([e[2] for e in entries], dtype=torch.int64)}, buf)  # fmt: skip
        _write_atomic(os.path.join(path, _INDEX), buf.getvalue())

    # -- the data path ---------------------------------------------------------------------------------------------
    def _keys(self, keys: Any) -> list[int]:
        if not isinstance(keys, torch.Tensor):
            keys = torch.as_tensor(keys)
        if keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool:
            raise CacheError(f"keys have dtype {keys.dtype}; pass int64 keys (content hashes or sample ids)")
        return keys.reshape(-1).to(torch.int64).cpu().tolist()

    def _need_bound(self, what: str) -> None:
        if not self._tiers:
            raise CacheError(f"{what}() on a cache that is not bound; call bind(fingerprint, layout, device) first")

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Hit mask (bool, CPU) for ``keys``. Disk records are read and verified here: a bad one is a miss."""
        ks = self._keys(keys)
        self._staged = {}
        self._protected = set()
        self._counts["lookups"] += len(ks)
        if not self._tiers:
            return torch.zeros(len(ks), dtype=torch.bool)
        hit = [k in self._index for k in ks]
        disk_ti = next((i for i, t in enumerate(self._tiers) if t.name == "disk"), -1)
        by_slab: dict[str, list[int]] = {}
        for k, h in zip(ks, hit):
            if h and self._index[k][0] == disk_ti and k not in self._staged:
                by_slab.setdefault(self._index[k][1], []).append(k)
                self._staged[k] = None  # type: ignore[assignment]
        bad = set()
        for codec, group in by_slab.items():
            slab = self._tiers[disk_ti].slabs[codec]
            slots = [self._index[k][2] for k in group]
            rec, ok = slab.read(group, slots)
            for j, (k, good) in enumerate(zip(group, ok)):
                if good:
                    self._staged[k] = (codec, slots[j], rec[j])
                else:
                    bad.add(k)
        for k in bad:
            self._drop(k, corrupt=True)  # also unstages it
        hit = [h and k not in bad for k, h in zip(ks, hit)]
        self._protected = {k for k, h in zip(ks, hit) if h}
        for k in self._protected:
            self._index.move_to_end(k)
        return torch.tensor(hit, dtype=torch.bool)

    def get(self, keys: torch.Tensor, device, dtype=None) -> list[torch.Tensor]:
        """Boundary tensors (B, *shape) for ``keys`` (all hits), decoded to ``dtype`` on ``device``, in key order.

        Raises ``_Recompute`` (a CacheError with ``.keys``) if a disk record read here (not verified by the last
        ``lookup``) fails its checksum: nothing wrong is ever returned.
        """
        t0 = time.perf_counter()
        self._need_bound("get")
        ks = self._keys(keys)
        device = torch.device(device)
        missing = [k for k in ks if k not in self._index]
        if missing:
            raise CacheError(
                f"get() for {len(missing)} key(s) that are not stored (e.g. {missing[0]}); call lookup() and "
                "get() only the hits"
            )
        want = [dtype or dt for _, dt in self.layout]
        dec = [w if w in _IO else torch.float32 for w in want]
        outs = [torch.empty(len(ks), d, dtype=dt, device=device) for d, dt in zip(self._dims(), dec)]
        groups: dict[tuple[int, str], list[int]] = {}
        for pos, k in enumerate(ks):
            ti, codec, _ = self._index[k]
            groups.setdefault((ti, codec), []).append(pos)
        # disk records first: verify everything before touching outputs or statistics
        disk_recs: dict[tuple[int, str], torch.Tensor] = {}
        bad: list[int] = []
        for (ti, codec), pos in groups.items():
            if self._tiers[ti].name != "disk":
                continue
            gk = [ks[p] for p in pos]
            slots = [self._index[k][2] for k in gk]
            staged = [self._staged.get(k) for k in gk]
            if all(s is not None and s[0] == codec and s[1] == sl for s, sl in zip(staged, slots)):
                disk_recs[(ti, codec)] = torch.stack([s[2] for s in staged])
                continue
            rec, ok = self._tiers[ti].slabs[codec].read(gk, slots)
            bad += [k for k, good in zip(gk, ok) if not good]
            disk_recs[(ti, codec)] = rec
        if bad:
            bad = list(dict.fromkeys(bad))
            for k in bad:
                self._drop(k, corrupt=True)
            raise _Recompute(bad)
        for (ti, codec), pos in groups.items():
            slab = self._tiers[ti].slabs[codec]
            whole = len(groups) == 1
            dst = outs if whole else [torch.empty(len(pos), o.shape[1], dtype=o.dtype, device=device) for o in outs]
            if self._tiers[ti].name == "disk":
                slab.decode(disk_recs[(ti, codec)], dst)
            else:
                slab.decode([self._index[ks[p]][2] for p in pos], dst)
            if not whole:
                idx = torch.tensor(pos, dtype=torch.int64, device=device)
                for o, d in zip(outs, dst):
                    o[idx] = d
        for k in ks:
            self._index.move_to_end(k)
        self._counts["hits"] += len(ks)
        res = [o.view(len(ks), *shape) for o, (shape, _) in zip(outs, self.layout)]
        res = [r if r.dtype == w else r.to(w) for r, w in zip(res, want)]
        self._get_s += time.perf_counter() - t0
        return res

    def put(self, keys: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Stores rows ``tensors[i][j]`` under ``keys[j]`` (batch-first, matching the bound layout)."""
        self._need_bound("put")
        ks = self._keys(keys)
        tensors = list(tensors)
        if len(tensors) != len(self.layout):
            raise CacheError(
                f"put() got {len(tensors)} boundary tensor(s) but the cache is bound to {len(self.layout)}; "
                "pass one batch-first tensor per boundary tensor"
            )
        for i, (t, (shape, _)) in enumerate(zip(tensors, self.layout)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (len(ks), *shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CacheError(
                    f"put(): boundary tensor {i} has shape {got}, but {len(ks)} key(s) of the stored layout need "
                    f"{(len(ks), *shape)}; the ids or inputs do not match what this cache holds "
                    "(use new ids for new inputs, or clear() the cache)"
                )
        if not ks:
            return
        self._counts["misses"] += len(ks)
        flat = [t.detach().reshape(len(ks), -1) for t in tensors]
        flat = [f if f.dtype in _IO else f.float() for f in flat]
        amax = None  # per sample max |x| over its tensors; amax propagates NaN and inf, so it also flags them
        for f in flat:
            if f.shape[1] == 0:
                continue
            am = f.abs().amax(1).float()
            amax = am if amax is None else torch.maximum(amax, am)  # maximum propagates NaN too
        n = len(ks)
        amax = [0.0] * n if amax is None else amax.cpu().tolist()
        finite = [math.isfinite(a) for a in amax]
        last: dict[int, int] = {k: j for j, k in enumerate(ks)}  # duplicate keys: the last row wins
        batch = set(ks)
        plan: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
        for j, k in enumerate(ks):
            if last[k] != j:
                continue
            if not finite[j]:
                self._counts["nonfinite"] += 1
                self._counts["skipped"] += 1
                if not self._warned_nonfinite:
                    self._warned_nonfinite = True
                    warnings.warn("freezert: the frozen segment produced inf/NaN for some samples; they are not "
                                  "cached (stats()['nonfinite'] counts them) and are recomputed each time",
                                  stacklevel=2)  # fmt: skip
                continue
            codec = self.codec
            if (codec in _FINITE_MAX and amax[j] > _FINITE_MAX[codec]) or (codec == "fp8" and 0 < amax[j] < _FP8_TINY):
                codec = _ESC
            if k in self._index:
                self._drop(k)
            claimed = self._claim(k, codec, batch)
            if claimed is None:
                continue
            ti, _, slot = claimed
            self._counts["stores"] += 1
            self._counts["escaped"] += codec != self.codec
            rows, slots = plan.setdefault((ti, codec), ([], []))
            rows.append(j)
            slots.append(slot)
        for (ti, codec), (rows, slots) in plan.items():
            slab = self._tiers[ti].slabs[codec]
            idx = torch.tensor(rows, dtype=torch.int64, device=flat[0].device)
            src = [f.index_select(0, idx) if len(rows) != n else f.contiguous() for f in flat]
            if self._tiers[ti].name == "disk":
                slab.encode([ks[r] for r in rows], slots, src)
            else:
                slab.encode(slots, src)

    def _claim(self, key: int, codec: str, batch: set[int]):
        """A slot for ``key``'s new row of ``codec``, indexed and accounted: (tier index, slab, slot), or None
        (counted as skipped) when no tier can take it."""
        ti = self._place(codec, batch)
        if ti < 0:
            self._counts["skipped"] += 1
            return None
        slab = self._slab(ti, codec)
        slot = slab.alloc()
        tier = self._tiers[ti]
        tier.used += self._row_bytes(codec, tier.name)
        tier.rows += 1
        self._index[key] = (ti, codec, slot)
        return ti, slab, slot

    def _place(self, codec: str, batch: set[int]) -> int:
        """The tier index for a new row of ``codec`` (evicting LRU rows if allowed), or -1: not stored."""
        sizes = [self._row_bytes(codec, t.name) for t in self._tiers]
        for ti, t in enumerate(self._tiers):
            if t.fits(sizes[ti]):
                return ti
        if self.evict == "none":
            return -1
        # evict least-recently-used rows (never of the current batch or the last lookup's hits); the LRU end
        # holds evictable rows (hits and new rows move to the other end), so each search stops early
        while True:
            victim = next(
                (k for k, (ti, _, _) in self._index.items()
                 if k not in batch and k not in self._protected and sizes[ti] <= self._tiers[ti].budget),
                None,
            )  # fmt: skip
            if victim is None:
                return -1
            ti = self._index[victim][0]
            self._drop(victim, evicted=True)
            if self._tiers[ti].fits(sizes[ti]):
                return ti

    def _drop(self, key: int, *, evicted: bool = False, corrupt: bool = False) -> None:
        ti, codec, slot = self._index.pop(key)
        tier = self._tiers[ti]
        nb = self._row_bytes(codec, tier.name)
        tier.used -= nb
        tier.rows -= 1
        tier.slabs[codec].release(slot)
        self._staged.pop(key, None)
        if evicted:
            self._counts["evictions"] += 1
            self._counts["evicted_bytes"] += nb
        if corrupt:
            self._counts["corrupt"] += 1

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def note_segment_time(self, seconds: float, rows: int) -> None:
        """The wrapper's measured frozen-segment time for ``rows`` samples (for the time-saved estimate)."""
        if rows > 0 and seconds >= 0:
            self._seg_s += float(seconds)
            self._seg_rows += int(rows)

    def stats(self) -> dict:
        """Counters, bytes and rows per tier, codec, and an estimate of the segment time the hits saved."""
        per_row = self._seg_s / self._seg_rows if self._seg_rows else 0.0
        out: dict[str, Any] = dict(self._counts)
        out.update(codec=self.codec, where=self.where, fingerprint=self.fingerprint, rows=len(self._index),
                   path=self._disk_dir, segment_s_per_row=per_row, get_s=self._get_s,
                   time_saved_s=max(0.0, self._counts["hits"] * per_row - self._get_s))  # fmt: skip
        tiers = {}
        for name in _TIERS:
            t = self._tier(name)
            budget = t.budget if t is not None else self._budgets.get(name)
            tiers[name] = {
                "rows": t.rows if t else 0,
                "bytes": t.used if t else 0,
                "allocated_bytes": sum(s.nbytes() for s in t.slabs.values()) if t else 0,
                "budget": budget if budget is not None else None,
            }
            out[f"rows_{name}"] = tiers[name]["rows"]
            out[f"bytes_{name}"] = tiers[name]["bytes"]
        out["tiers"] = tiers
        out["bytes"] = sum(v["bytes"] for v in tiers.values())
        return out

    def __len__(self) -> int:
        return len(self._index)

    def __del__(self) -> None:  # the disk index is written when the cache goes away (then the finalizer closes)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - never raise from a destructor
            pass

    def __repr__(self) -> str:
        return (f"FeatureCache(codec={self.codec!r}, where={self.where!r}, rows={len(self)}, "
                f"fingerprint={self.fingerprint!r}, path={self._disk_dir!r})")  # fmt: skip

    def _drop_rows(self) -> None:
        self._index.clear()
        self._protected, self._staged = set(), {}
        for t in self._tiers:
            t.used = t.rows = 0
            for slab in t.slabs.values():
                if isinstance(slab, _DiskSlab):
                    slab.truncate()
                else:
                    slab.free_memory()

    def clear(self) -> None:
        """Drops every stored row (memory freed, disk files truncated); counters and the binding are kept.

        On an unbound cache with ``path=``, wipes that store's files (the fix for a refused foreign store).
        """
        self._drop_rows()
        if self._disk_dir is not None and self.fingerprint is not None:
            self._write_index(self._disk_dir, [])
        elif self.path is not None and not self._tiers and os.path.isdir(self.path):
            _remove_store_files(self.path)

    def close(self) -> None:
        """Flushes and closes the disk tier (a temporary one is deleted). The cache is unusable afterwards."""
        self.flush()
        if self._finalizer is not None:
            self._finalizer()
        self._tiers, self._index, self._disk_dir = [], collections.OrderedDict(), None
        _LIVE.discard(self)

    # -- save / load -----------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Writes every row (all tiers, exact encoded bytes) with the fingerprint and config to directory ``path``."""
        self._need_bound("save")
        path = os.fspath(path)
        config = {"where": self.where, "evict": self.evict, "budget": self._budget_arg[0],
                  "host_budget": self._budget_arg[1], "disk_budget": self._budget_arg[2]}  # fmt: skip
        config = {k: (v if v is None or isinstance(v, (int, float, str)) else str(v)) for k, v in config.items()}
        if self._disk_dir is not None and os.path.realpath(path) == os.path.realpath(self._disk_dir):
            if any(self._tiers[t].name != "disk" for t, _, _ in self._index.values()):
                raise CacheError(f"save({path!r}) names this cache's own disk tier; save to another directory")
            self.flush()
            self._write_header(path, {**config, "where": "disk"})
            return
        if _read_header(path) is not None or (os.path.isdir(path) and os.listdir(path)):
            raise CacheError(f"save({path!r}): the directory is not empty; save into a new or empty directory")
        os.makedirs(path, exist_ok=True)
        slabs: dict[str, _DiskSlab] = {}
        entries: list[tuple[int, str, int]] = []
        groups: dict[tuple[int, str], list[int]] = {}
        for k, (ti, codec, _) in self._index.items():
            groups.setdefault((ti, codec), []).append(k)
        try:
            for (ti, codec), gk in groups.items():
                if codec not in slabs:
                    slabs[codec] = _DiskSlab(codec, self._dims(), os.path.join(path, f"slab_{codec}.bin"))
                dst, src = slabs[codec], self._tiers[ti].slabs[codec]
                slots = [self._index[k][2] for k in gk]
                if isinstance(src, _DiskSlab):  # copy verified records as they are
                    rec, ok = src.read(gk, slots)
                    for k in [k for k, good in zip(gk, ok) if not good]:
                        self._drop(k, corrupt=True)
                    keep = [j for j, good in enumerate(ok) if good]
                    gk, rec = [gk[j] for j in keep], rec[keep]
                else:  # the exact encoded bytes: no decode/encode round trip
                    rec = dst.build(gk, *src.read_raw(slots))
                if gk:
                    new = [dst.alloc() for _ in gk]
                    dst.write_records(new, rec)
                    entries += [(k, codec, slot) for k, slot in zip(gk, new)]
            for s in slabs.values():
                s.flush()
                os.ftruncate(s.fd, s.top * s.rec)
        finally:
            for s in slabs.values():
                s.close()
        order = {k: i for i, k in enumerate(self._index)}
        entries.sort(key=lambda e: order.get(e[0], 0))
        self._write_index(path, entries)
        self._write_header(path, config)

    @classmethod
    def load(cls, path) -> FeatureCache:
        """A cache holding what ``save(path)`` wrote (fingerprint and config included); rows on CPU until bound.

        A saved where='disk' cache opens ``path`` in place; other caches read every row (verified) into memory.
        """
        path = os.fspath(path)
        head = _read_header(path)
        if head is None:
            raise CacheError(f"{path!r} holds no saved FeatureCache (no readable {_HEADER}); pass a directory "
                             "written by FeatureCache.save() or by a disk tier")  # fmt: skip
        if head.get("format") != _FORMAT or head.get("version") != _VERSION:
            raise CacheError(f"{path!r} is format {head.get('format')!r} version {head.get('version')!r}; this "
                             f"freezert reads {_FORMAT!r} version {_VERSION}")  # fmt: skip
        cfg = dict(head.get("config") or {"where": "disk"})
        where = cfg.pop("where", "disk")
        budgets = {"budget": cfg.get("budget", "20GiB"), "host_budget": cfg.get("host_budget"),
                   "disk_budget": cfg.get("disk_budget")}  # fmt: skip
        layout = _layout_from_json(head["layout"])
        if where == "disk":
            cache = cls(head["codec"], "disk", budgets["budget"], path, disk_budget=budgets["disk_budget"],
                        evict=cfg.get("evict", "lru"))  # fmt: skip
            cache.bind(head["fingerprint"], layout, "cpu")
            cache._bound = False  # the first caller's bind must match this fingerprint (else it is refused)
            return cache
        cache = cls(head["codec"], where, budgets["budget"], None, host_budget=budgets["host_budget"],
                    disk_budget=budgets["disk_budget"], evict=cfg.get("evict", "lru"))  # fmt: skip
        src = cls(head["codec"], "disk", "1TiB", path, disk_budget=None)
        try:
            src.bind(head["fingerprint"], layout, "cpu")
            dev = "cpu" if where != "cuda" else ("cuda" if torch.cuda.is_available() else "cpu")
            if where == "cuda" and dev == "cpu":
                raise CacheError(f"{path!r} holds a where='cuda' cache, but CUDA is not available here")
            cache.fingerprint, cache.layout, cache.device = head["fingerprint"], layout, torch.device(dev)
            cache._build_tiers()
            cache._import_from(src)
        finally:
            src.close()
        return cache

    def _import_from(self, src: FeatureCache) -> None:
        ti_src = next(i for i, t in enumerate(src._tiers) if t.name == "disk")
        keys = list(src._index)
        for lo in range(0, len(keys), 1024):
            chunk = keys[lo : lo + 1024]
            for codec in (src.codec, _ESC):
                gk = [k for k in chunk if src._index[k][1] == codec]
                if not gk:
                    continue
                slab = src._tiers[ti_src].slabs[codec]
                rec, ok = slab.read(gk, [src._index[k][2] for k in gk])
                self._counts["corrupt"] += ok.count(False)
                keep = [j for j, good in enumerate(ok) if good]
                payload, scales = slab.unpack(rec[keep])
                for j, k in enumerate([gk[j] for j in keep]):
                    claimed = self._claim(k, codec, set())
                    if claimed is None:
                        continue
                    _, dst, slot = claimed
                    p = [x[j : j + 1] for x in payload]
                    s = [x[j : j + 1] if x is not None else None for x in scales]
                    if isinstance(dst, _DiskSlab):
                        dst.write_records([slot], dst.build([k], p, s))
                    else:
                        dst.write_raw([slot], p, s)


def _read_header(path: str) -> dict | None:
    try:
        with open(os.path.join(path, _HEADER)) as f:
            head = json.load(f)
        return head if isinstance(head, dict) else None
    except (OSError, ValueError):
        return None


def _remove_store_files(path: str) -> None:
    for name in os.listdir(path):
        if name in (_HEADER, _INDEX) or (name.startswith("slab_") and name.endswith(".bin")):
            os.remove(os.path.join(path, name))


_LIVE: weakref.WeakSet = weakref.WeakSet()  # caches with a disk tier, flushed at interpreter exit

@atexit.register
def _close_all() -> None:  # the disk tier's index is written at interpreter exit
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - never fail interpreter exit
            pass
