"""``FeatureCache``: the frozen prefix's boundary tensors, computed once and kept compactly.

Rows (one per sample, keyed by an int64: a content hash or an explicit id) live in fixed-size slots of up to three
tiers: ``device`` (memory of the bound device), ``host`` (CPU memory, pinned when the model runs on CUDA, read by
the GPU directly) and ``disk`` (a directory of checksummed records, persistent across processes). The wrapper
asks with one call, ``fetch`` (hit mask and decoded rows; a record that fails verification is a miss), and stores
its misses with ``put``. See docs/CACHE.md for the guarantees, the format and the policies.
"""

from __future__ import annotations

import atexit
import collections
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from typing import Any

import torch

from .._errors import CacheError
from .._units import fmt_bytes, parse_bytes
from . import disk as _disk
from . import extend as _extend
from . import persist as _persist
from .binding import check_layout, ids_to_keys, store_seed
from .codecs import CODECS, ESCAPE, IO_DTYPES, escape_kind
from .disk import NO_CONTENT, DiskSlab
from .stats import Counters, build_stats
from .tiers import WHERE, MemSlab, Tier, available_ram

__all__ = ["FeatureCache"]

_AUTO_EPOCH_ROWS = 1 << 16  # "an epoch's worth" of misses when epoch_rows= is not given (docs/CACHE.md)


class FeatureCache:
    """Boundary tensors of the frozen prefix, per sample, in a compact codec across device/host/disk tiers.

    ``codec``: "fp16" (default), "bf16", "fp8" (e4m3 with a per-row scale) or "fp32" (exact); rows a codec cannot
    keep within its precision (too large or too small) are stored as fp32. ``where``: "auto" (device until
    ``budget``, then host until ``host_budget``, then disk), "cuda", "host" or "disk". ``budget``: bytes (int or
    "20GiB"). ``path``: the disk tier's directory (persistent; one writer at a time); None = a temporary one.
    ``evict``: "lru" (default) or "none" (a full cache stores nothing more; stored rows are never dropped).
    ``strict``: a sample id whose input changed since its row was stored raises instead of warning.
    ``readonly``: read the disk store at ``path`` without writing it (no lock; new rows stay in memory tiers).
    ``epoch_rows``: the dataset size, if known: once more rows than that were stored with none found again, the
    cache says once that nothing is reused (default: 65,536).
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
        strict: bool = False,
        readonly: bool = False,
        epoch_rows: int | None = None,
    ):
        if not isinstance(codec, str) or codec not in CODECS:
            raise CacheError(f"codec={codec!r} is not supported; use one of 'fp16', 'bf16', 'fp8', 'fp32'")
        if where not in WHERE:
            raise CacheError(f"where={where!r} is not a tier; use 'auto', 'cuda', 'host' or 'disk'")
        if evict not in ("lru", "none"):
            raise CacheError(f"evict={evict!r} is not a policy; use 'lru' (evict least-recently-used) or 'none'")
        if epoch_rows is not None and (
            not isinstance(epoch_rows, int) or isinstance(epoch_rows, bool) or epoch_rows < 1
        ):
            raise CacheError(f"epoch_rows={epoch_rows!r} is not a sample count; pass len(dataset) or None")
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise CacheError(f"path={path!r} is not a directory path; pass a str or os.PathLike, or None")
            if where not in ("auto", "disk"):
                raise CacheError(
                    f"path={os.fspath(path)!r} is only used by the disk tier, but where={where!r} has none; "
                    "use where='disk' or 'auto', or drop path="
                )
            path = os.fspath(path)
            _disk.check_dir_path(path)
        if readonly and path is None:
            raise CacheError("readonly=True reads an existing disk store, but path= is None; pass path= of the store")
        self.codec, self.where, self.path, self.evict = codec, where, path, evict
        self.strict, self.readonly, self.epoch_rows = bool(strict), bool(readonly), epoch_rows
        self._budget_arg = (budget, host_budget, disk_budget)
        b = parse_bytes("budget", budget, error=CacheError)
        hb = None if host_budget is None else parse_bytes("host_budget", host_budget, error=CacheError)
        db = parse_bytes("disk_budget", disk_budget, allow_none=True, error=CacheError)
        if where == "auto":
            self._budgets = {"device": b, "host": hb, "disk": db}  # host None: resolved at bind
        elif where == "cuda":
            self._budgets = {"device": b}
        elif where == "host":
            self._budgets = {"host": b if hb is None else hb}
        else:
            self._budgets = {"disk": b if disk_budget is None else db}
        self._reset_state()

    def _reset_state(self) -> None:
        self.fingerprint: str | None = None
        self.layout: list[tuple[tuple[int, ...], torch.dtype]] | None = None
        self.device: torch.device | None = None
        self._bound = False  # bind() succeeded at least once (a later change invalidates instead of refusing)
        self._tiers: list[Tier] = []
        # key -> (tier index, codec, slot, content); LRU first. content: the input's hash, or None (disk rows:
        # the record's own content field is authoritative and is read at each fetch)
        self._index: collections.OrderedDict[int, tuple[int, str, int, int | None]] = collections.OrderedDict()
        self._protected: set[int] = set()
        self._disk_dir: str | None = None
        self._disk_slabs: list[DiskSlab] = []  # shared with the finalizer, which closes them
        self._lock: list[Any] = []  # the StoreLock of a writable disk tier (shared with the finalizer)
        self._tmpdir: str | None = None
        self._finalizer: Any = None
        self._warned: set[str] = set()
        self._counts = Counters()
        self._content_misses = 0  # rows handed to put() under content keys while no stored row was ever found
        self._found = 0  # rows a fetch found stored and verified (served, even if the caller then recomputed them)
        self._detached = False  # a read-only store left behind by an invalidation: no longer read
        self._stored_content: dict[int, int | None] = {}  # content of the last fetch's stored rows (for extend)

    # -- copies and pickles ----------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "codec": self.codec,
            "where": self.where,
            "budget": self._budget_arg[0],
            "path": self.path,
            "host_budget": self._budget_arg[1],
            "disk_budget": self._budget_arg[2],
            "evict": self.evict,
            "strict": self.strict,
            "readonly": self.readonly,
            "epoch_rows": self.epoch_rows,
        }

    def __getstate__(self) -> dict:
        """A copy or pickle keeps the configuration, not the rows: it starts empty and is bound on first use.

        A disk tier at ``path`` has one writer; the copy gets a private temporary disk tier instead (or, for a
        read-only cache, reads the same path).
        """
        cfg = self._config()
        if not self.readonly:
            cfg["path"] = None
        return cfg

    def __setstate__(self, cfg: dict) -> None:
        self.__init__(**cfg)

    def __deepcopy__(self, memo: dict) -> FeatureCache:
        new = FeatureCache.__new__(FeatureCache)
        new.__setstate__(self.__getstate__())
        return new

    # -- binding ---------------------------------------------------------------------------------------------------
    def bind(self, fingerprint: str, layout, device) -> None:
        """Binds to the frozen setup ``fingerprint`` with per-sample boundary ``layout`` on ``device``."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise CacheError(f"fingerprint={fingerprint!r} is not a fingerprint; pass the str from fingerprint_of()")
        layout = check_layout(layout)
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
            if self._detached and self._tier("disk") is not None:
                self._tier("disk").readonly = True
            elif self.path is not None or self._disk_dir is not None:
                self._open_disk(self._disk_dir or self.path)
        except BaseException:
            self._close_disk_files()
            self.fingerprint = self.layout = self.device = None
            self._tiers = []
            raise
        self._bound = True

    def extend(self, fingerprint: str, layout, device, convert, *, chunk_bytes: int = 64 * 2**20) -> int:
        """Re-binds to ``fingerprint``/``layout`` keeping every stored row, converted by ``convert(rows)`` rather
        than dropped; returns how many rows were carried (see ``freezert.cache.extend``)."""
        return _extend.extend(self, fingerprint, layout, device, convert, chunk_bytes=chunk_bytes)

    def _dims(self) -> list[int]:
        return [math.prod(s) for s, _ in self.layout]

    def _row_bytes(self, codec: str, tier: str) -> int:
        """Bytes one sample takes in a tier: the encoded row (memory) or the whole record (disk)."""
        if tier == "disk":
            return _disk.RecordLayout(codec, self._dims()).size
        return CODECS[codec].row_bytes(self._dims())

    def _build_tiers(self) -> None:
        budgets = dict(self._budgets)
        if "host" in budgets and budgets["host"] is None:  # auto: 4x budget, at most half the free RAM
            half = available_ram() / 2
            if self.device.type == "cpu":  # the device tier is CPU memory too: share the half
                budgets["device"] = min(budgets["device"], half)
                half = max(0.0, half - budgets["device"])
            budgets["host"] = float(int(min(4 * budgets["device"], half)))
        tiers = [Tier(n, budgets[n]) for n in WHERE[self.where]]
        if not any(self._row_bytes(self.codec, t.name) <= t.budget for t in tiers):
            raise CacheError(
                f"the cache cannot hold a sample: one sample's boundary {[list(s) for s, _ in self.layout]} in codec "
                f"{self.codec!r} takes more than every tier's whole budget ("
                + ", ".join(
                    f"{t.name}: {fmt_bytes(self._row_bytes(self.codec, t.name))} per sample, budget "
                    f"{fmt_bytes(t.budget)}"
                    for t in tiers
                )
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
            if self._disk_readonly():  # never deleted: this cache stops reading it, and keeps new rows in memory
                self._detached = True
                self._warn_once(
                    "detached",
                    f"freezert: the read-only cache store {self._disk_dir!r} holds features "
                    "of the previous frozen setup; they are no longer served, and new rows are not "
                    "stored there",
                )
                self._disk_dir = None
            else:
                _disk.remove_store_files(self._disk_dir)
        self._tiers = []

    def _disk_readonly(self) -> bool:
        t = self._tier("disk")
        return bool(t is not None and t.readonly) or self.readonly

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
    def _tier(self, name: str) -> Tier | None:
        return next((t for t in self._tiers if t.name == name), None)

    def _disk_ti(self) -> int:
        return next((i for i, t in enumerate(self._tiers) if t.name == "disk"), -1)

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
                slab = MemSlab(codec, self._dims(), dev, pinned, int(min(tier.budget, 2**62) // max(per, 1)))
            tier.slabs[codec] = slab
        return slab

    def _disk_slab(self, codec: str) -> DiskSlab:
        tier = self._tier("disk")
        slab = tier.slabs.get(codec)
        if slab is None:
            seed = store_seed(self.fingerprint, self.codec, self.layout, codec)
            slab = DiskSlab(
                codec, self._dims(), os.path.join(self._disk_dir, f"slab_{codec}.bin"), seed, readonly=tier.readonly
            )
            self._disk_slabs.append(slab)
            tier.slabs[codec] = slab
        return slab

    def _open_disk(self, path: str | None) -> None:
        """Opens (or creates) the disk store; refuses one that is foreign, unverifiable or being written elsewhere."""
        if path is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="freezert-cache-")
            path = self._tmpdir
        _disk.check_dir_path(path)
        if not self.readonly:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise CacheError(
                    f"the cache directory {path!r} cannot be created ({e.strerror}); use another path"
                ) from None
        elif not os.path.isdir(path):
            raise CacheError(f"readonly=True but {path!r} holds no cache store; pass the path of an existing store")
        found = _disk.read_header(path)
        if found is not None:
            head, layout = found
            stored = head["fingerprint"]
            if stored != self.fingerprint or head["codec"] != self.codec:
                raise CacheError(
                    self._foreign_msg(
                        f"{stored} (codec {head['codec']!r})",
                        f"{self.fingerprint} (codec {self.codec!r})",
                        f"the cache directory {path!r}",
                    )
                )
            if layout != self.layout:
                raise CacheError(
                    f"the cache directory {path!r} (fingerprint {stored}) holds boundary layout {head.get('layout')}, "
                    f"but this model produces {_disk.layout_json(self.layout)}; clear it or use another path"
                )
        elif self.readonly:
            raise CacheError(f"readonly=True but {path!r} holds no cache store; pass the path of an existing store")
        tier = self._tier("disk")
        tier.readonly = self.readonly or not _disk.dir_writable(path)
        if tier.readonly and not self.readonly:
            self._warn_once(
                "readonly",
                f"freezert: the cache directory {path!r} is not writable; its rows are "
                "served, and new rows are kept in memory tiers only (or skipped)",
            )
        if not tier.readonly and not self._lock:
            self._lock.append(_disk.StoreLock(path))
        self._disk_dir = path
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _close_disk, self._disk_slabs, self._lock, self._tmpdir)
            self._finalizer.atexit = False  # at exit _close_all flushes the index first, then closes
            _LIVE.add(self)
        for codec in (self.codec, ESCAPE):
            file = os.path.join(path, f"slab_{codec}.bin")
            _disk.check_regular(file)
            if os.path.exists(file):
                self._disk_slab(codec)
        _disk.check_regular(os.path.join(path, _disk.INDEX))
        if found is None:
            _disk.write_header(path, self.fingerprint, self.codec, self.layout)
        else:
            self._load_index(path)

    def _close_disk_files(self) -> None:
        for slab in self._disk_slabs:
            try:
                slab.close()
            except OSError:
                pass
        self._disk_slabs[:] = []
        for lock in self._lock:
            lock.release()
        self._lock[:] = []
        self._disk_dir = None

    def _load_index(self, path: str) -> None:
        ti = self._disk_ti()
        disk = self._tiers[ti]
        got = _disk.read_index(path)
        keys, codes, slots = got if got is not None else self._scan_records()
        caps = {codec: slab.cap for codec, slab in disk.slabs.items()}
        for key, code, slot in zip(keys, codes, slots):
            codec = self.codec if code == 0 else ESCAPE
            if codec not in disk.slabs or not 0 <= slot < caps[codec]:  # truncated file: the record is gone
                self._counts["corrupt"] += 1
                continue
            if key in self._index:
                continue
            slab = disk.slabs[codec]
            self._index[key] = (ti, codec, slot, None)
            slab.top = max(slab.top, slot + 1)
            disk.used += self._row_bytes(codec, "disk")
            disk.rows += 1
        for codec, slab in disk.slabs.items():
            used = {s for (t, c, s, _) in self._index.values() if t == ti and c == codec}
            slab.free = [s for s in range(slab.top) if s not in used]

    def _scan_records(self) -> tuple[list[int], list[int], list[int]]:
        keys, codes, slots = [], [], []
        disk = self._tier("disk")
        for codec, slab in disk.slabs.items():
            cap = slab.cap
            for lo in range(0, cap, 4096):
                n = min(4096, cap - lo)
                rec, _ = slab.read([0] * n, list(range(lo, lo + n)))
                ks = DiskSlab.keys_of(rec)
                _, ok = slab.read(ks, list(range(lo, lo + n)))
                for j in range(n):
                    if ok[j]:
                        keys.append(ks[j])
                        codes.append(0 if codec == self.codec else 1)
                        slots.append(lo + j)
        warnings.warn(
            f"freezert: the cache index in {self._disk_dir!r} was unreadable; rebuilt from {len(keys)} "
            "verified records",
            stacklevel=3,
        )
        return keys, codes, slots

    def flush(self) -> None:
        """Writes the disk tier's index atomically (temp file + os.replace) and flushes its records."""
        if self._disk_dir is None or self._tier("disk") is None or self.fingerprint is None or self._disk_readonly():
            return
        ti = self._disk_ti()
        for slab in self._tiers[ti].slabs.values():
            slab.flush()
        _disk.write_index(
            self._disk_dir, [(k, 0 if c == self.codec else 1, s) for k, (t, c, s, _) in self._index.items() if t == ti]
        )

    # -- keys ------------------------------------------------------------------------------------------------------
    def _key_list(self, keys: Any) -> list[int]:
        return ids_to_keys(keys, "keys").tolist()

    def _content_list(self, content: Any, n: int) -> list[int] | None:
        if content is None:
            return None
        cs = ids_to_keys(content, "content").tolist()
        if len(cs) != n:
            raise CacheError(f"content has {len(cs)} value(s) for {n} key(s); pass one content hash per key")
        return cs

    def _check_repeats(self, ks: list[int], cs: list[int] | None) -> None:
        """A key twice in one call: fine for content keys (the same input twice), and for ids with equal content
        (a sampler drawing one sample twice); two different inputs under one id is refused."""
        if len(set(ks)) == len(ks):
            return
        first: dict[int, int] = {}
        for j, k in enumerate(ks):
            i = first.setdefault(k, j)
            if i == j:
                continue
            if cs is not None and cs[i] != cs[j]:
                raise CacheError(
                    f"sample id {k} appears at positions {i} and {j} of one batch with different inputs; two "
                    "samples cannot share an id (the next epoch would serve one's features for both): pass unique "
                    "ids, e.g. the dataset indices"
                )

    def _need_bound(self, what: str) -> None:
        if not self._tiers:
            raise CacheError(f"{what}() on a cache that is not bound; call bind(fingerprint, layout, device) first")

    # -- the data path ---------------------------------------------------------------------------------------------
    def fetch(self, keys, device, *, content=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(hit, rows) for ``keys``: ``hit`` a bool CPU tensor (N,); ``rows`` one tensor per boundary tensor holding
        the rows of ``keys[hit]`` in order, decoded on ``device`` in the layout's dtypes.

        Every row served is verified (disk records: key, checksum bound to this store; with ``content``: the
        input's content hash). A row that fails is dropped and reported as a miss, never raised, except a changed
        input under ``strict=True`` (CacheError). ``content`` (int64 (N,)) marks ``keys`` as sample ids.
        """
        t0 = time.perf_counter()
        ks = self._key_list(keys)
        cs = self._content_list(content, len(ks))
        self._check_repeats(ks, cs)
        device = torch.device(device)
        self._counts["lookups"] += len(ks)
        if not self._tiers:
            return torch.zeros(len(ks), dtype=torch.bool), []
        hit, recs = self._probe(ks, cs)
        served = [k for k, h in zip(ks, hit) if h]
        rows = self._decode(served, device, recs)
        self._counts["hits"] += len(served)
        self._counts.get_s += time.perf_counter() - t0
        return torch.tensor(hit, dtype=torch.bool), rows

    def _probe(self, ks: list[int], cs: list[int] | None) -> tuple[list[bool], dict[int, tuple[str, torch.Tensor]]]:
        """Hit per key, and the verified disk records of the hits; drops corrupt and stale rows."""
        self._protected = set()
        want = dict(zip(ks, cs)) if cs is not None else {}
        present = [k for k in dict.fromkeys(ks) if k in self._index]
        disk_ti = self._disk_ti()
        recs: dict[int, tuple[str, torch.Tensor]] = {}
        bad: set[int] = set()
        by_slab: dict[str, list[int]] = {}
        for k in present:
            if self._index[k][0] == disk_ti:
                by_slab.setdefault(self._index[k][1], []).append(k)
        stored: dict[int, int | None] = {k: self._index[k][3] for k in present}
        for codec, group in by_slab.items():
            slots = [self._index[k][2] for k in group]
            rec, ok = self._tiers[disk_ti].slabs[codec].read(group, slots)
            contents = DiskSlab.contents_of(rec)
            for j, (k, good) in enumerate(zip(group, ok)):
                if good:
                    recs[k] = (codec, rec, j)
                    stored[k] = None if contents[j] == NO_CONTENT else contents[j]
                else:
                    bad.add(k)
        stale = [k for k in present if k not in bad and k in want and stored[k] is not None and stored[k] != want[k]]
        if stale and self.strict:
            raise CacheError(
                f"sample id {stale[0]} (and {len(stale) - 1} more) arrived with a different input than when its "
                "features were stored (strict=True); the likely cause is random augmentation, which makes cached "
                "features stale: cache un-augmented inputs, or use strict=False to recompute them with a warning"
            )
        if stale:
            self._counts["stale"] += len(stale)
            self._warn_once(
                "stale",
                f"freezert: sample id {stale[0]} (and {len(stale) - 1} more) arrived with a "
                "different input than when its features were stored, so they were recomputed "
                "(stats()['stale'] counts them). The likely cause is random augmentation: a feature cache "
                "only saves time when the same sample gives the same input; cache un-augmented inputs or "
                "drop cache= (strict=True turns this into an error)",
            )
        for k in bad:
            self._drop(k, corrupt=True)
        for k in stale:
            self._drop(k)
        unverified = {k for k in present if k in want and stored[k] is None}  # stored without content: recompute
        gone = bad | set(stale) | unverified
        hit = [k in self._index and k not in gone for k in ks]
        self._protected = {k for k, h in zip(ks, hit) if h}
        self._found += len(self._protected)
        for k in self._protected:
            self._index.move_to_end(k)
        self._stored_content = stored
        return hit, {k: v for k, v in recs.items() if k in self._protected}

    def _decode(self, ks: list[int], device: torch.device, recs: dict) -> list[torch.Tensor]:
        """Rows of ``ks`` (all stored; disk ones verified in ``recs``: key -> (codec, records, row)) decoded on
        ``device``."""
        want = [dt for _, dt in self.layout]
        dec = [w if w in IO_DTYPES else torch.float32 for w in want]
        outs = [torch.empty(len(ks), d, dtype=dt, device=device) for d, dt in zip(self._dims(), dec)]
        groups: dict[tuple[int, str], list[int]] = {}
        for pos, k in enumerate(ks):
            ti, codec, _, _ = self._index[k]
            groups.setdefault((ti, codec), []).append(pos)
        for (ti, codec), pos in groups.items():
            slab = self._tiers[ti].slabs[codec]
            whole = len(groups) == 1
            dst = outs if whole else [torch.empty(len(pos), o.shape[1], dtype=o.dtype, device=device) for o in outs]
            if self._tiers[ti].name == "disk":
                slab.decode(_gather_records([recs[ks[p]] for p in pos]), dst)
            else:
                slab.decode([self._index[ks[p]][2] for p in pos], dst)
            if not whole:
                idx = torch.tensor(pos, dtype=torch.int64, device=device)
                for o, d in zip(outs, dst):
                    o[idx] = d
        res = [o.view(len(ks), *shape) for o, (shape, _) in zip(outs, self.layout)]
        return [r if r.dtype == w else r.to(w) for r, w in zip(res, want)]

    def put(self, keys, rows, *, content=None) -> None:
        """Stores ``rows[i][j]`` (batch-first, the bound layout) under ``keys[j]``, with its input's ``content``."""
        self._need_bound("put")
        ks = self._key_list(keys)
        cs = self._content_list(content, len(ks))
        self._check_repeats(ks, cs)
        rows = list(rows)
        if len(rows) != len(self.layout):
            raise CacheError(
                f"put() got {len(rows)} boundary tensor(s) but the cache is bound to {len(self.layout)}; "
                "pass one batch-first tensor per boundary tensor"
            )
        for i, (t, (shape, _)) in enumerate(zip(rows, self.layout)):
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
        self._put(ks, cs, rows)
        if cs is None:
            self._note_content_misses(len(ks))

    def _put(self, ks: list[int], cs: list[int | None] | None, tensors: list[torch.Tensor]) -> None:
        n = len(ks)
        flat = [t.detach().reshape(n, -1) for t in tensors]
        flat = [f if f.dtype in IO_DTYPES else f.float() for f in flat]
        # per sample and boundary tensor max |x|; amax propagates NaN and inf, so it also flags them
        amax = torch.stack(
            [f.abs().amax(1).float() if f.shape[1] else f.new_zeros(n, dtype=torch.float32) for f in flat], 1
        ).cpu()
        finite = torch.isfinite(amax).all(1).tolist()
        kind = escape_kind(self.codec, torch.where(torch.isfinite(amax), amax, 0)).tolist()
        batch = set(ks)
        seen: set[int] = set()
        plan: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
        for j, k in enumerate(ks):
            if k in seen:  # the same input twice in one call (checked): stored once
                continue
            seen.add(k)
            if not finite[j]:
                self._counts["nonfinite"] += 1
                self._counts["skipped"] += 1
                self._warn_once(
                    "nonfinite",
                    "freezert: the frozen segment produced inf/NaN for some samples; "
                    "they are not cached (stats()['nonfinite'] counts them) and are recomputed each time",
                )
                continue
            codec = self.codec if kind[j] == 0 else ESCAPE
            if k in self._index:
                self._drop(k)
            claimed = self._claim(k, codec, batch, None if cs is None else cs[j])
            if claimed is None:
                continue
            ti, _, slot = claimed
            self._counts["stores"] += 1
            if codec != self.codec:
                self._counts["escaped"] += 1
                self._counts["escaped_large" if kind[j] == 1 else "escaped_small"] += 1
            rows_, slots = plan.setdefault((ti, codec), ([], []))
            rows_.append(j)
            slots.append(slot)
        for (ti, codec), (rws, slots) in plan.items():
            slab = self._tiers[ti].slabs[codec]
            idx = torch.tensor(rws, dtype=torch.int64, device=flat[0].device)
            src = [f.index_select(0, idx) if len(rws) != n else f.contiguous() for f in flat]
            if self._tiers[ti].name == "disk":
                contents = [NO_CONTENT if cs is None or cs[r] is None else cs[r] for r in rws]
                slab.encode([ks[r] for r in rws], contents, slots, src)
            else:
                slab.encode(slots, src)

    def _note_content_misses(self, n: int) -> None:
        """Content keys never hit under augmentation: say so once, after an epoch's worth of misses with no hit."""
        if self._found or "no_reuse" in self._warned:
            return
        self._content_misses += n
        limit = self.epoch_rows or _AUTO_EPOCH_ROWS
        if self._content_misses > limit:  # a whole epoch stored, and the next one's inputs are new again
            self._warn_once(
                "no_reuse",
                f"freezert: the feature cache stored {self._content_misses} rows, more than "
                f"an epoch's worth ({limit}{', epoch_rows=' if self.epoch_rows else ', the default'}), "
                "without finding any again: no input has arrived twice. With random augmentation every "
                "epoch's inputs differ, so their content keys never repeat and the cache only costs time "
                "and memory; cache un-augmented inputs (or pass cache_ids= to have changed inputs "
                "detected), or drop cache=. FeatureCache(epoch_rows=len(dataset)) times this check to "
                "your dataset",
            )

    def _warn_once(self, what: str, msg: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(msg, UserWarning, stacklevel=4)

    def _claim(self, key: int, codec: str, batch: set[int], content: int | None):
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
        self._index[key] = (ti, codec, slot, content)
        return ti, slab, slot

    def _place(self, codec: str, batch: set[int]) -> int:
        """The tier index for a new row of ``codec`` (evicting LRU rows if allowed), or -1: not stored."""
        sizes = [self._row_bytes(codec, t.name) for t in self._tiers]
        for ti, t in enumerate(self._tiers):
            if t.fits(sizes[ti]):
                return ti
        if self.evict == "none":
            return -1
        # evict least-recently-used rows (never of the current batch or the last fetch's hits, nor of a read-only
        # tier); the LRU end holds evictable rows (hits and new rows move to the other end), so the search is short
        while True:
            victim = next(
                (
                    k
                    for k, (ti, _, _, _) in self._index.items()
                    if k not in batch
                    and k not in self._protected
                    and not self._tiers[ti].readonly
                    and sizes[ti] <= self._tiers[ti].budget
                ),
                None,
            )
            if victim is None:
                return -1
            ti = self._index[victim][0]
            self._drop(victim, evicted=True)
            if self._tiers[ti].fits(sizes[ti]):
                return ti

    def _drop(self, key: int, *, evicted: bool = False, corrupt: bool = False) -> None:
        ti, codec, slot, _ = self._index.pop(key)
        tier = self._tiers[ti]
        nb = self._row_bytes(codec, tier.name)
        tier.used -= nb
        tier.rows -= 1
        if not tier.readonly:  # a read-only store's slots are never reused
            tier.slabs[codec].release(slot)
        if evicted:
            self._counts["evictions"] += 1
            self._counts["evicted_bytes"] += nb
        if corrupt:
            self._counts["corrupt"] += 1

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def note_segment_time(self, seconds: float, rows: int) -> None:
        """The wrapper's measured frozen-segment time for ``rows`` samples (for the time-saved estimate)."""
        self._counts.note_segment_time(seconds, rows)

    def stats(self) -> dict:
        """Counters, bytes and rows per tier, codec, and an estimate of the segment time the hits saved."""
        return build_stats(self)

    def __len__(self) -> int:
        return len(self._index)

    def __del__(self) -> None:  # the disk index is written when the cache goes away (then the finalizer closes)
        try:
            self.flush()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"FeatureCache(codec={self.codec!r}, where={self.where!r}, rows={len(self)}, "
            f"fingerprint={self.fingerprint!r}, path={self._disk_dir!r})"
        )

    def _drop_rows(self) -> None:
        self._index.clear()
        self._protected = set()
        for t in self._tiers:
            t.used = t.rows = 0
            for slab in t.slabs.values():
                if isinstance(slab, DiskSlab):
                    slab.truncate()
                else:
                    slab.free_memory()

    def clear(self) -> None:
        """Drops every stored row (memory freed, disk files truncated); counters and the binding are kept.

        On an unbound cache with ``path=``, wipes that store's files (the fix for a refused foreign store).
        """
        if self._disk_readonly():
            raise CacheError(
                f"clear() on the read-only store {self._disk_dir or self.path!r}; open it writable "
                "(readonly=False, with write permission) to clear it"
            )
        self._drop_rows()
        if self._disk_dir is not None and self.fingerprint is not None:
            _disk.write_index(self._disk_dir, [])
        elif self.path is not None and not self._tiers and os.path.isdir(self.path):
            lock = _disk.StoreLock(self.path)  # never wipe a store another cache is writing
            try:
                _disk.remove_store_files(self.path)
            finally:
                lock.release()

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
        _persist.save(self, path)

    @classmethod
    def load(cls, path) -> FeatureCache:
        """A cache holding what ``save(path)`` wrote (fingerprint and config included); rows on CPU until bound."""
        return _persist.load(cls, path)


def _gather_records(srcs: list[tuple[str, torch.Tensor, int]]) -> torch.Tensor:
    """The records (n, rec) named by (codec, records tensor, row) triples, without a copy when they are one
    tensor's rows in order (a fetch reads each slab's records in one tensor)."""
    base = srcs[0][1]
    if all(t is base for _, t, _ in srcs):
        rows = [j for _, _, j in srcs]
        if rows == list(range(base.shape[0])):
            return base
        return base.index_select(0, torch.tensor(rows, dtype=torch.int64))
    return torch.cat([t[j : j + 1] for _, t, j in srcs])


def _close_disk(slabs: list, locks: list, tmpdir: str | None) -> None:
    for s in slabs:
        try:
            s.close()
        except OSError:
            pass
    for lock in locks:
        lock.release()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # caches with a disk tier, flushed at interpreter exit


@atexit.register
def _close_all() -> None:  # the disk tier's index is written at interpreter exit
    for cache in list(_LIVE):
        try:
            cache.close()
        except Exception:
            pass
