"""The disk store: a directory of shards, each a verified header, an index and slab files of records, written by one
cache at a time and read by every cache that opens the directory (docs/CACHE.md, "Disk store format").

Rank 0 (or a lone process) writes the directory itself, rank r > 0 its ``rank<r>`` subdirectory; each writer holds
an exclusive ``flock`` on its shard's directory (so a read-only directory needs no lock file). ``DiskTier`` is the
cache's disk tier: its own shard, written, and every other shard of the directory, read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any

import torch

from .._codecs import CODECS, ESCAPE
from .._errors import CacheError
from .binding import Layout, Layouts, layout_from_json, layout_json, store_seed
from .records import DiskSlab, RecordLayout, check_regular, fix_hint
from .tiers import Tier

__all__ = ["DiskTier", "StoreLock", "read_header", "remove_store", "write_header"]

FORMAT = "freezert-feature-cache"
VERSION = 3  # 3: a store holds many layouts (one slab file per layout and codec) in one or more shards
HEADER, INDEX = "header.json", "index.pt"
_RANK_DIR = re.compile(r"rank\d+")
Entry = tuple[Layout, int, DiskSlab, int]  # (layout, key, slab, slot) of a row a shard's index names


def check_dir_path(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CacheError(
            f"path={path!r} is a file, not a directory; pass a directory for the disk store (it is created if missing)"
        )


def foreign_msg(stored: str, wanted: str, where: str) -> str:
    return (
        f"{where} holds features of fingerprint {stored}, but this model's frozen setup has fingerprint "
        f"{wanted} (other frozen weights, freeze depth, BN mode, dtype, codec or input shape); "
        f"clear it (FeatureCache(path=...).clear(), or delete the directory) or use another path"
    )


# ---------------------------------------------------------------------------------------------------------------
# files: header, index, lock
# ---------------------------------------------------------------------------------------------------------------
def _header_check(head: dict) -> str:
    body = {k: v for k, v in head.items() if k != "header_check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def write_header(path: str, fingerprint: str, codec: str, layouts: list[Layout], config: dict | None = None) -> None:
    head = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "codec": codec,
        "escape_codec": ESCAPE,
        "layouts": [{"id": x.uid, "tensors": layout_json(x.tensors), "tag": x.tag, "codec": x.codec} for x in layouts],
        "checksum": "hash_rows(record[8:], seed=store_seed(fingerprint, codec, layout, slab codec))",
    }
    if config is not None:
        head["config"] = config
    head["header_check"] = _header_check(head)
    write_atomic(os.path.join(path, HEADER), json.dumps(head, indent=1).encode())


def _parse_layouts(obj: Any) -> list[tuple[str, list, str | None, str]] | None:
    """(uid, tensors, tag, codec) per layout a header lists, each uid checked against its contents; None if bad."""
    if not isinstance(obj, list):
        return None
    out = []
    for e in obj:
        tensors = layout_from_json(e.get("tensors")) if isinstance(e, dict) else None
        if tensors is None or e.get("codec") not in CODECS or not isinstance(e.get("tag"), (str, type(None))):
            return None
        if Layout(tensors, e["tag"], e["codec"]).uid != e.get("id"):
            return None
        out.append((e["id"], tensors, e["tag"], e["codec"]))
    return out


def read_header(path: str) -> dict | None:
    """The verified header of the shard at ``path`` (``layouts`` parsed); None when it has no header and no files.

    A header that exists but cannot be verified (unreadable, malformed, another format or version, layouts that do
    not parse, a self-check that fails), or store files without a header, raise CacheError: such a store is never
    adopted, and nothing is deleted.
    """
    file = os.path.join(path, HEADER)
    check_regular(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(1 << 22)
    except FileNotFoundError:
        if os.path.isdir(path) and any(is_store_file(n) for n in os.listdir(path)):
            raise CacheError(
                f"the cache directory {path!r} holds cache files but no {HEADER}, so whose features they are "
                f"cannot be verified; {fix_hint(path)}"
            ) from None
        return None
    except OSError as e:
        raise CacheError(
            f"the cache directory {path!r} has an unreadable {HEADER} ({e.strerror}); {fix_hint(path)}"
        ) from None
    why = None
    try:
        head = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        head, why = None, "it is not JSON"
    if why is None and not isinstance(head, dict):
        why = "it is not a JSON object"
    elif why is None and (head.get("format") != FORMAT or head.get("version") != VERSION):
        why = (
            f"it is format {head.get('format')!r} version {head.get('version')!r}, and this freezert reads "
            f"{FORMAT!r} version {VERSION}"
        )
    elif why is None and head.get("header_check") != _header_check(head):
        why = "its self-check does not match its contents (edited or damaged)"
    elif why is None and (not isinstance(head.get("fingerprint"), str) or not isinstance(head.get("codec"), str)):
        why = f"its fingerprint {head.get('fingerprint')!r} or codec {head.get('codec')!r} is not valid"
    layouts = None if why else _parse_layouts(head.get("layouts"))
    if why is None and layouts is None:
        why = f"its layouts {head.get('layouts')!r} are not a list of verified layouts"
    if why:
        raise CacheError(
            f"the cache directory {path!r} has a {HEADER} that cannot be verified ({why}); {fix_hint(path)}"
        )
    return {**head, "layouts": layouts}


def is_store_file(name: str) -> bool:
    return name in (HEADER, INDEX) or (name.startswith("slab_") and name.endswith(".bin"))


def slab_file(path: str, layout: Layout, codec: str) -> str:
    return os.path.join(path, f"slab_{layout.uid}_{codec}.bin")


def _remove_files(path: str) -> None:
    """Removes slabs and index first and the header last: a crash in between leaves a header, never orphans."""
    names = sorted((n for n in os.listdir(path) if is_store_file(n)), key=lambda n: n == HEADER)
    for name in names:
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            raise CacheError(f"the cache file {p!r} is a directory; remove it by hand, or use another path")
        os.remove(p)


def remove_store(root: str, *, shards: bool = True, locked: bool = True) -> None:
    """Wipes the store at ``root`` (with ``shards``, every ``rank<r>`` shard too), each shard under its writer lock
    (``locked``) so that a store another cache is writing is never wiped under it."""
    for path in shard_dirs(root) if shards else [root]:
        lock = StoreLock(path) if locked else None
        try:
            _remove_files(path)
        finally:
            if lock is not None:
                lock.release()
        if path != root and not os.listdir(path):
            os.rmdir(path)


def shard_dirs(root: str) -> list[str]:
    """``root`` and its ``rank<r>`` shard directories."""
    subs = sorted(n for n in os.listdir(root) if _RANK_DIR.fullmatch(n)) if os.path.isdir(root) else []
    return [root] + [os.path.join(root, n) for n in subs if os.path.isdir(os.path.join(root, n))]


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_index(path: str, entries: list[tuple[int, int, int, int]]) -> None:
    """``entries``: (key, layout uid64, 0 = the layout's codec / 1 = escape, slot), LRU first; written atomically."""
    buf = io.BytesIO()
    cols = list(zip(*entries)) if entries else [[], [], [], []]
    torch.save(
        {
            "keys": torch.tensor(cols[0], dtype=torch.int64),
            "layout": torch.tensor(cols[1], dtype=torch.int64),
            "codec": torch.tensor(cols[2], dtype=torch.int8),
            "slot": torch.tensor(cols[3], dtype=torch.int64),
        },
        buf,
    )
    write_atomic(os.path.join(path, INDEX), buf.getvalue())


def read_index(path: str) -> list[tuple[int, int, int, int]] | None:
    """(key, layout uid64, codec code, slot) per row of index.pt; [] when absent; None when unreadable."""
    file = os.path.join(path, INDEX)
    check_regular(file)
    try:
        idx = torch.load(file, weights_only=True)
        cols = [idx[k].tolist() for k in ("keys", "layout", "codec", "slot")]
        return list(zip(*cols)) if len({len(c) for c in cols}) == 1 else None
    except FileNotFoundError:
        return []
    except Exception:
        return None


def _stamp(path: str) -> tuple:
    """What changes when a shard's writer flushes or re-creates it (mtimes and sizes of header and index)."""
    out = []
    for name in (HEADER, INDEX):
        try:
            st = os.stat(os.path.join(path, name))
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class StoreLock:
    """An exclusive ``flock`` on a shard directory, held while a cache may write it (one writer per shard)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # maybe a dropped cache that only a reference cycle keeps alive: collect, retry
                import gc

                gc.collect()
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheError(
                    f"the cache directory {path!r} is open for writing by another FeatureCache (in this or another "
                    "process); one writer per shard: close() the other cache, give each process its own shard "
                    "(FeatureCache(path=..., rank=r), automatic under torch.distributed), or pass readonly=True to "
                    "read what the other one stored"
                ) from None
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def _dir_writable(path: str) -> bool:
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    return all(os.access(os.path.join(path, n), os.W_OK) for n in os.listdir(path) if is_store_file(n))


# ---------------------------------------------------------------------------------------------------------------
# a shard, and the disk tier
# ---------------------------------------------------------------------------------------------------------------
class Shard:
    """One shard directory: header (fingerprint, codec, layouts), one slab file per layout and codec, index."""

    def __init__(self, path: str, *, readonly: bool, shared: bool):
        self.path, self.readonly, self.shared = path, readonly, shared
        self.layouts: list[Layout] = []  # as its header lists them
        self.slabs: dict[tuple[Layout, str], DiskSlab] = {}
        self.stamp: tuple = ()
        self.fingerprint = self.codec = None

    def load(self, head: dict, fingerprint: str, codec: str, layouts: Layouts) -> None:
        """Adopts a verified header of this setup: its layouts, and the slab files that exist."""
        self.fingerprint, self.codec = fingerprint, codec
        self.layouts = [layouts.get(t, tag, c) for _, t, tag, c in head["layouts"]]
        for lay in self.layouts:
            for c in dict.fromkeys((lay.codec, ESCAPE)):
                check_regular(slab_file(self.path, lay, c))
                if os.path.exists(slab_file(self.path, lay, c)):
                    self.slab(lay, c)
        check_regular(os.path.join(self.path, INDEX))

    def create(self, fingerprint: str, codec: str) -> None:
        self.fingerprint, self.codec = fingerprint, codec
        write_header(self.path, fingerprint, codec, [])

    def slab(self, layout: Layout, codec: str) -> DiskSlab:
        """The slab of ``layout`` in ``codec``; a new layout enters the header before its first record is written."""
        slab = self.slabs.get((layout, codec))
        if slab is None:
            if layout not in self.layouts and not self.readonly:
                write_header(self.path, self.fingerprint, self.codec, [*self.layouts, layout])
                self.layouts.append(layout)
            seed = store_seed(self.fingerprint, self.codec, layout, codec)
            file = slab_file(self.path, layout, codec)
            slab = DiskSlab(layout, codec, file, seed, readonly=self.readonly, shared=self.shared)
            self.slabs[(layout, codec)] = slab
        return slab

    def entries(self) -> tuple[list[Entry], int]:
        """(layout, key, slab, slot) of every row its index names whose slot lies in its file, and how many it
        names that do not (a truncated file); an unreadable index is rebuilt by verifying every record."""
        got = read_index(self.path)
        if got is None:
            got = self._scan()
            warnings.warn(
                f"freezert: the cache index in {self.path!r} was unreadable; rebuilt from {len(got)} verified records",
                UserWarning,
                stacklevel=6,
            )
        by_uid = {lay.uid64: lay for lay in self.layouts}
        caps = {k: s.cap for k, s in self.slabs.items()}
        out, lost = [], 0
        for key, uid, code, slot in got:
            lay = by_uid.get(uid)
            codec = None if lay is None else (lay.codec if code == 0 else ESCAPE)
            if lay is None or (lay, codec) not in self.slabs or not 0 <= slot < caps[(lay, codec)]:
                lost += 1  # its record is gone (truncated file) or its layout unknown
                continue
            out.append((lay, key, self.slabs[(lay, codec)], slot))
        for slab in self.slabs.values():  # slots below the high-water mark that no row holds are free
            used = {e[3] for e in out if e[2] is slab}
            slab.top = max([slab.top, *(s + 1 for s in used)])
            slab.free = [s for s in range(slab.top) if s not in used]
        self.stamp = _stamp(self.path)
        return out, lost

    def _scan(self) -> list[tuple[int, int, int, int]]:
        found = []
        for (lay, codec), slab in self.slabs.items():
            cap = slab.cap
            for lo in range(0, cap, 4096):
                n = min(4096, cap - lo)
                rec, _ = slab.read([0] * n, list(range(lo, lo + n)))
                ks = DiskSlab.keys_of(rec)
                _, ok = slab.read(ks, list(range(lo, lo + n)))
                found += [(ks[j], lay.uid64, 0 if codec == lay.codec else 1, lo + j) for j in range(n) if ok[j]]
        return found

    def write_index(self, rows: list[tuple[int, int, int, int]]) -> None:
        for slab in self.slabs.values():
            slab.flush()
        write_index(self.path, rows)
        self.stamp = _stamp(self.path)

    def close(self) -> None:
        for slab in self.slabs.values():
            try:
                slab.close()
            except OSError:
                pass
        self.slabs = {}


class DiskTier(Tier):
    """The disk tier: this cache's own shard (written by it alone; a temporary directory without ``root``) and
    every other shard of the directory (read: rows other ranks stored)."""

    def __init__(self, budget: float, root: str | None, *, rank: int | None, readonly: bool):
        super().__init__("disk", budget)
        self.root, self.rank, self.want_readonly = root, rank, readonly
        self.own: Shard | None = None
        self.others: dict[str, Shard] = {}
        self.lock: StoreLock | None = None
        self.tmpdir: str | None = None
        self.fingerprint = self.codec = self.layouts = None
        self.lost = 0  # rows the indexes named whose records were gone (truncated files): counted as corrupt
        self.sharded = False  # other shards exist or may appear: flush and refresh now and then

    @property
    def path(self) -> str | None:
        return None if self.own is None else self.own.path

    def _row_bytes(self, layout: Any, codec: str) -> int:
        return RecordLayout(codec, layout.dims).size

    def bind(self, fingerprint: str, codec: str, layouts: Layouts, *, first: bool) -> list[Entry]:
        """Opens this cache's shard (created if missing) and reads the others; returns the rows they hold.

        ``first``: the cache's first binding, where a shard of another setup is refused (CacheError, nothing
        deleted); later (the setup changed, other ranks are re-creating theirs) such shards are skipped until a
        refresh finds them re-created.
        """
        self.fingerprint, self.codec, self.layouts = fingerprint, codec, layouts
        if self.root is None:
            return []  # a temporary directory, made when the first row spills here
        rank = self.rank
        if rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, self.sharded = (dist.get_rank(), dist.get_world_size() > 1) if on else (0, False)
        else:
            self.sharded = True
        own = self.root if rank == 0 else os.path.join(self.root, f"rank{rank}")
        check_dir_path(self.root)
        rows = self._open_own(own, first)
        for path in shard_dirs(self.root):
            if path != own:
                rows += self._open_other(path, first=first)
        self.sharded = self.sharded or bool(self.others)
        return rows

    def _open_own(self, path: str, first: bool) -> list[Entry]:
        self.readonly = self.want_readonly
        if self.want_readonly:
            if not os.path.isdir(path) or not any(read_header(p) for p in shard_dirs(self.root)):
                raise CacheError(f"readonly=True but {path!r} holds no cache store; pass the path of an existing store")
        else:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise CacheError(
                    f"the cache directory {path!r} cannot be created ({e.strerror}); use another path"
                ) from None
        if not os.path.isdir(path):
            return []
        head = read_header(path)
        readonly = self.want_readonly or not _dir_writable(path)
        if readonly and not self.want_readonly:
            warnings.warn(
                f"freezert: the cache directory {path!r} is not writable; its rows are served, and new rows are "
                "kept in memory tiers only (or skipped)",
                UserWarning,
                stacklevel=5,
            )
        self.readonly = readonly
        if head is not None:
            self._check(head, path)
        if not readonly and self.lock is None:
            self.lock = StoreLock(path)
        self.own = Shard(path, readonly=readonly, shared=False)
        if head is None:
            self.own.create(self.fingerprint, self.codec)
            return []
        self.own.load(head, self.fingerprint, self.codec, self.layouts)
        return self._rows(self.own)

    def _open_other(self, path: str, *, first: bool) -> list[Entry]:
        if not os.path.exists(os.path.join(path, HEADER)):
            # another rank's shard it is creating now (its lock comes before its header, which is written
            # whole): nothing to read from it yet, and nothing to refuse; the next refresh looks again
            return []
        try:
            head = read_header(path)
            if head is not None:
                self._check(head, path)
        except CacheError:
            if first:
                raise
            return []  # being re-created for the new setup, or damaged: looked at again at the next refresh
        if head is None:
            return []
        shard = self.others[path] = Shard(path, readonly=True, shared=True)
        shard.load(head, self.fingerprint, self.codec, self.layouts)
        return self._rows(shard)

    def _check(self, head: dict, path: str) -> None:
        if head["fingerprint"] != self.fingerprint or head["codec"] != self.codec:
            raise CacheError(
                foreign_msg(
                    f"{head['fingerprint']} (codec {head['codec']!r})",
                    f"{self.fingerprint} (codec {self.codec!r})",
                    f"the cache directory {path!r}",
                )
            )

    def _rows(self, shard: Shard) -> list[Entry]:
        rows, lost = shard.entries()
        self.lost += lost
        return rows

    def slab(self, layout: Any, codec: str) -> DiskSlab:
        if self.own is None:  # no path: a temporary directory, removed when the cache closes
            self.tmpdir = tempfile.mkdtemp(prefix="freezert-cache-")
            self.lock = StoreLock(self.tmpdir)
            self.own = Shard(self.tmpdir, readonly=False, shared=False)
            self.own.create(self.fingerprint, self.codec)
        return self.own.slab(layout, codec)

    def refresh(self) -> tuple[set[DiskSlab], list[Entry]]:
        """Re-reads the other shards whose writers flushed since (and finds new ones): the slabs whose rows leave
        the index (a shard re-read, gone, or no longer of this setup) and the rows the re-read shards hold."""
        gone: set[DiskSlab] = set()
        rows: list[Entry] = []
        if self.root is None or self.fingerprint is None:
            return gone, rows
        for path in shard_dirs(self.root):
            old = self.others.get(path)
            if path == self.path or (old is not None and old.stamp == _stamp(path)):
                continue
            if old is not None:
                gone.update(old.slabs.values())
                old.close()
                del self.others[path]
            rows += self._open_other(path, first=False)
        self.sharded = self.sharded or bool(self.others)
        return gone, rows

    def all_slabs(self) -> list[DiskSlab]:
        shards = ([self.own] if self.own else []) + list(self.others.values())
        return [s for sh in shards for s in sh.slabs.values()]

    def allocated(self) -> int:
        return sum(s.nbytes() for s in self.own.slabs.values()) if self.own else 0

    def write_index(self, rows: list[tuple[int, int, int, int]]) -> None:
        if self.own is not None and not self.own.readonly:
            self.own.write_index(rows)

    def clear(self) -> None:
        """Drops every row: this cache's shard is truncated (its index emptied); other shards are left alone (their
        rows leave the index, and the next refresh reads them again)."""
        self.used = self.rows = self.shared = self.shared_rows = 0
        if self.own is not None:
            for slab in self.own.slabs.values():
                slab.free_memory()
        for shard in self.others.values():
            shard.stamp = ()

    def discard(self) -> bool:
        """The setup changed: this cache's shard is emptied (its files removed; re-created at the next bind) and
        the other shards are closed. Returns False when the shard is read-only and was left as it is."""
        self.clear()
        for shard in self.others.values():
            shard.close()
        self.others = {}
        own, self.own = self.own, None
        if own is not None:
            own.close()
            if own.readonly:
                return False
            _remove_files(own.path)
            if self.tmpdir is None:
                return True
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
            self.lock.release()
            self.lock = None
        return True

    def close(self) -> None:
        for shard in ([self.own] if self.own else []) + list(self.others.values()):
            shard.close()
        self.own, self.others = None, {}
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
