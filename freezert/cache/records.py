"""Disk records: the one record layout (``RecordLayout``) and ``DiskSlab``, the fixed-size checksummed records of one
layout in one codec in one file, read with ``preadv`` and written with ``pwrite`` (no memory map: a file truncated
by someone else reads short and counts as a miss, a write past its end grows it again, neither can raise SIGBUS).
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Any

import torch

from .. import _native
from .._codecs import CODECS
from .._errors import CacheError
from .tiers import Slab

__all__ = ["NO_CONTENT", "DiskSlab", "RecordLayout", "check_regular", "fix_hint"]

NO_CONTENT = 0  # a record stored without an input-content hash (a content of 0 reads as "none")


def fix_hint(path: str) -> str:
    return f"clear it (FeatureCache(path={path!r}).clear(), or delete the directory) or use another path"


class RecordLayout:
    """``[checksum u64][key i64][content i64][fp8: float32 scale per tensor][payload per tensor]``, padded to 8 B.

    ``checksum = hash_rows(record[8:], seed=store_seed(...))``: it covers key, content, scales and payload, and
    its seed binds the record to the store's fingerprint, codec and layout.
    """

    HEAD = 24

    def __init__(self, codec: str, dims: list[int]):
        c = CODECS[codec]
        self.codec, self.dims, self.esize = codec, dims, c.itemsize
        self.n_scales = len(dims) if c.scaled else 0
        self.offsets, off = [], self.HEAD + 4 * self.n_scales
        for d in dims:
            self.offsets.append(off)
            off += d * c.itemsize
        self.size = (off + 7) // 8 * 8


def _buffer(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor's bytes (for preadv/pwrite, no copy)."""
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


def check_regular(file: str) -> None:
    """Refuses a store file that exists but is not a regular file (a directory, a device such as /dev/null)."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CacheError(
            f"the cache file {file!r} cannot be examined ({e.strerror}); {fix_hint(os.path.dirname(file))}"
        ) from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise CacheError(f"the cache file {file!r} is {kind}; remove it, or use another path for the cache")


class DiskSlab(Slab):
    """Fixed-size records of one layout in one codec in one file, read and written by offset. ``shared``: the file
    is another writer's (another rank's shard): read only, its rows never count against this cache's budget."""

    def __init__(self, layout: Any, codec: str, file: str, seed: int, *, readonly: bool = False, shared: bool = False):
        super().__init__(layout, codec)
        self.record = RecordLayout(codec, self.dims)
        self.rec = self.record.size
        self.file, self.seed, self.readonly, self.shared = file, seed, readonly or shared, shared
        check_regular(file)
        try:
            self.fd = os.open(file, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CacheError(
                f"the cache file {file!r} cannot be opened ({e.strerror}); make it readable"
                f"{'' if readonly else ' and writable'}, or use another path"
            ) from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):  # replaced between the check and the open
            os.close(self.fd)
            self.fd = -1
            check_regular(file)

    @property
    def cap(self) -> int:
        """Records the file holds now (another process may have truncated or grown it)."""
        return os.fstat(self.fd).st_size // self.rec

    def nbytes(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else 0

    def free_memory(self) -> None:
        """Drops every record (the file is truncated; a read-only slab only forgets its slots)."""
        self.reset()
        if not self.readonly and self.fd >= 0:
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        if self.fd >= 0 and not self.readonly:
            try:
                os.fsync(self.fd)
            except OSError:  # some filesystems (tmpfs on old kernels, FUSE) refuse fsync: the data is written
                pass

    # -- records ---------------------------------------------------------------------------------------------------
    def build(
        self, keys: list[int], contents: list[int], payload: list[torch.Tensor], scales: list[torch.Tensor | None]
    ) -> torch.Tensor:
        n, lay = len(keys), self.record
        rec = torch.zeros(n, self.rec, dtype=torch.uint8)
        rec[:, 8:16] = torch.tensor(keys, dtype=torch.int64).view(torch.uint8).view(n, 8)
        rec[:, 16:24] = torch.tensor(contents, dtype=torch.int64).view(torch.uint8).view(n, 8)
        for i in range(lay.n_scales):
            o = lay.HEAD + 4 * i
            rec[:, o : o + 4] = scales[i].float().contiguous().view(torch.uint8).view(n, 4)
        for i, (d, off) in enumerate(zip(self.dims, lay.offsets)):
            nb = d * lay.esize
            if nb:
                rec[:, off : off + nb] = payload[i].contiguous().view(torch.uint8).view(n, nb)
        rec[:, 0:8] = _native.hash_rows(rec[:, 8:], seed=self.seed).view(torch.uint8).view(n, 8)
        return rec

    def write_records(self, slots: list[int], rec: torch.Tensor) -> None:
        rec = rec.contiguous()
        buf = _buffer(rec)
        for j, slot in enumerate(slots):  # pwrite past the end grows the file: never a write into unmapped pages
            view = buf[j * self.rec : (j + 1) * self.rec]
            done = 0
            while done < self.rec:
                done += os.pwrite(self.fd, view[done:], slot * self.rec + done)
        del buf

    def encode(self, keys: list[int], contents: list[int], slots: list[int], src: list[torch.Tensor]) -> None:
        n = len(slots)
        ar = torch.arange(n, dtype=torch.int64)
        payload, scales = [], []
        c = CODECS[self.codec]
        for x, d in zip(src, self.dims):
            x = x.cpu().contiguous()
            store = torch.empty(n, d, dtype=c.store)
            sc = torch.empty(n, dtype=torch.float32) if c.scaled else None
            _native.encode_scatter(x, ar, store, sc, self.codec)
            payload.append(store)
            scales.append(sc)
        self.write_records(slots, self.build(keys, contents, payload, scales))

    def read(self, keys: list[int], slots: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """(records (n, rec), ok per record): ok = read whole, key matches, checksum with this store's seed matches."""
        n = len(slots)
        rec = torch.empty(n, self.rec, dtype=torch.uint8)  # a record not read whole is never ok: no need to zero
        whole = [False] * n
        if n:
            buf = _buffer(rec)
            for j, slot in enumerate(slots):
                if slot < 0:
                    continue
                view, off, got = buf[j * self.rec : (j + 1) * self.rec], slot * self.rec, 0
                while got < self.rec:
                    try:
                        r = os.preadv(self.fd, [view[got:]], off + got)
                    except OSError:  # closed under a prefetch, or an I/O error: a miss, never a crash
                        break
                    if r <= 0:  # past the end (truncated by someone else): a miss, never a crash
                        break
                    got += r
                whole[j] = got == self.rec
            del buf
            chk = _native.hash_rows(rec[:, 8:], seed=self.seed)
            stored_chk = rec[:, 0:8].contiguous().view(torch.int64).view(-1)
            stored_key = rec[:, 8:16].contiguous().view(torch.int64).view(-1)
            good = ((chk == stored_chk) & (stored_key == torch.tensor(keys, dtype=torch.int64))).tolist()
            whole = [g and w for g, w in zip(good, whole)]
        return rec, whole

    @staticmethod
    def keys_of(rec: torch.Tensor) -> list[int]:
        return rec[:, 8:16].contiguous().view(torch.int64).view(-1).tolist()

    @staticmethod
    def contents_of(rec: torch.Tensor) -> list[int]:
        return rec[:, 16:24].contiguous().view(torch.int64).view(-1).tolist()

    def unpack(self, rec: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        n, payload, scales, lay = rec.shape[0], [], [], self.record
        sdt = CODECS[self.codec].store
        for i, (d, off) in enumerate(zip(self.dims, lay.offsets)):
            nb = d * lay.esize
            payload.append(rec[:, off : off + nb].contiguous().view(sdt).view(n, d))
            o = lay.HEAD + 4 * i
            scales.append(rec[:, o : o + 4].contiguous().view(torch.float32).view(n) if lay.n_scales else None)
        return payload, scales

    def decode(self, rec: torch.Tensor, outs: list[torch.Tensor]) -> None:
        payload, scales = self.unpack(rec)
        ar = torch.arange(rec.shape[0], dtype=torch.int64)
        for i, out in enumerate(outs):
            target = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
            _native.gather_decode(payload[i], scales[i], ar, target, self.codec)
            if target is not out:
                out.copy_(target)
