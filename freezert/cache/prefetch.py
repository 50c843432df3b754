"""``Prefetch``: the disk-tier rows of the next batch read, verified and decoded on a background thread while the
current step runs; ``FeatureCache.fetch`` takes the rows whose index entries did not change in between.

Only disk rows are prefetched: device rows are where they are needed, and host rows are read by the GPU kernel
straight from pinned memory (or, on a CPU model, are the same memory as the device tier). The thread reads with
``preadv`` and decodes with the native kernels, both of which release the GIL. For a CUDA model the rows land in
pinned host memory; ``fetch`` copies them to the device (asynchronously, on the current stream).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .._codecs import IO_DTYPES
from .records import NO_CONTENT

__all__ = ["Prefetch"]


class Prefetch:
    """Reads and decodes ``entries`` ({key: Entry} of one layout's disk rows) on a thread started at once."""

    def __init__(self, layout: Any, entries: dict[int, Any], device: torch.device):
        self.layout, self.entries, self.device = layout, entries, device
        self.pos: dict[int, int] = {}  # key -> row of ``outs`` holding its decoded, verified row
        self.contents: dict[int, int | None] = {}
        self.outs: list[torch.Tensor] = []
        self.taken = 0  # rows a fetch took from here
        self._thread = threading.Thread(target=self._run, name="freezert-cache-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            keys = list(self.entries)
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            dec = [dt if dt in IO_DTYPES else torch.float32 for _, dt in self.layout.tensors]
            outs = [torch.empty(len(keys), d, dtype=dt, pin_memory=pin) for d, dt in zip(self.layout.dims, dec)]
            groups: dict[Any, list[int]] = {}
            for k in keys:
                groups.setdefault(self.entries[k].slab, []).append(k)
            at = 0
            for slab, group in groups.items():
                rec, ok = slab.read(group, [self.entries[k].slot for k in group])
                good = [j for j, g in enumerate(ok) if g]
                if not good:
                    continue
                rec = rec[good] if len(good) != len(group) else rec
                slab.decode(rec, [o[at : at + len(good)] for o in outs])
                contents = slab.contents_of(rec)
                for i, j in enumerate(good):
                    self.pos[group[j]] = at + i
                    self.contents[group[j]] = None if contents[i] == NO_CONTENT else contents[i]
                at += len(good)
            self.outs = outs
        except Exception:  # a file closed or changed under it: nothing is prefetched, fetch reads as usual
            self.pos, self.outs = {}, []

    def wait(self) -> None:
        self._thread.join()

    def take(self, key: int, entry: Any) -> tuple[int, int | None] | None:
        """(row, stored content) of ``key`` when it was prefetched, verified, and its row is still ``entry`` (not
        replaced, dropped or evicted since: a new row is a new Entry); else None (``fetch`` reads it itself)."""
        if self.entries.get(key) is not entry or key not in self.pos:
            return None
        self.taken += 1
        return self.pos[key], self.contents[key]

    def copy_rows(self, rows: list[int], dst: list[torch.Tensor]) -> None:
        """``dst[i][n] = outs[i][rows[n]]`` (dst on the fetch's device)."""
        idx = torch.tensor(rows, dtype=torch.int64)
        for o, d in zip(self.outs, dst):
            src = o if rows == list(range(o.shape[0])) else o.index_select(0, idx)
            d.copy_(src, non_blocking=src.is_pinned())
