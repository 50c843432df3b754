"""The disk store: a directory with a verified header, an index, and slabs of fixed-size checksummed records.

One record layout (``RecordLayout``) serves the slab, the budget and save(). Records are read with ``preadv`` and
written with ``pwrite`` (no memory map): a file truncated by someone else reads short and counts as a miss, a
write past its end grows it again, and neither can raise SIGBUS. One writer per directory at a time, enforced
with ``flock`` on the directory itself (so a read-only directory needs no lock file).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import stat

import torch

from .. import _native
from .._errors import CacheError
from .binding import Layout, layout_from_json, layout_json
from .codecs import CODECS, ESCAPE
from .tiers import Slab

__all__ = ["DiskSlab", "RecordLayout", "StoreLock", "read_header", "write_header"]

FORMAT = "freezert-feature-cache"
VERSION = 2  # 2: records carry the input content and a checksum seeded by the store's fingerprint
HEADER, INDEX = "header.json", "index.pt"
NO_CONTENT = 0  # a record stored without an input-content hash (a content of 0 reads as "none")


def _fix(path: str) -> str:
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
            f"the cache file {file!r} cannot be examined ({e.strerror}); {_fix(os.path.dirname(file))}"
        ) from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise CacheError(f"the cache file {file!r} is {kind}; remove it, or use another path for the cache")


def check_dir_path(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CacheError(
            f"path={path!r} is a file, not a directory; pass a directory for the disk store (it is created if missing)"
        )


class DiskSlab(Slab):
    """Fixed-size records of one codec in one file, read and written by offset."""

    def __init__(self, codec: str, dims: list[int], file: str, seed: int, *, readonly: bool = False):
        super().__init__(codec, dims)
        self.layout = RecordLayout(codec, dims)
        self.rec = self.layout.size
        self.file, self.seed, self.readonly = file, seed, readonly
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

    def truncate(self) -> None:
        self.reset()
        if not self.readonly:
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
        n, lay = len(keys), self.layout
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
        rec = torch.zeros(n, self.rec, dtype=torch.uint8)
        whole = [False] * n
        if n:
            buf = _buffer(rec)
            for j, slot in enumerate(slots):
                if slot < 0:
                    continue
                view, off, got = buf[j * self.rec : (j + 1) * self.rec], slot * self.rec, 0
                while got < self.rec:
                    r = os.preadv(self.fd, [view[got:]], off + got)
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
        n, payload, scales, lay = rec.shape[0], [], [], self.layout
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


# ---------------------------------------------------------------------------------------------------------------
# the directory: header, index, lock
# ---------------------------------------------------------------------------------------------------------------
def _header_check(head: dict) -> str:
    body = {k: v for k, v in head.items() if k != "header_check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def write_header(path: str, fingerprint: str, codec: str, layout: Layout, config: dict | None = None) -> None:
    head = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "layout": layout_json(layout),
        "codec": codec,
        "escape_codec": ESCAPE,
        "checksum": "hash_rows(record[8:], seed=store_seed(fingerprint, codec, layout, slab codec))",
    }
    if config is not None:
        head["config"] = config
    head["header_check"] = _header_check(head)
    write_atomic(os.path.join(path, HEADER), json.dumps(head, indent=1).encode())


def read_header(path: str) -> tuple[dict, Layout] | None:
    """(header, layout) of the store at ``path``; None when it has no header.json and no store files.

    A header that exists but cannot be verified (unreadable, malformed, another format or version, a layout that
    does not parse, a self-check that fails), or store files without a header, raise CacheError: such a store is
    never adopted, and nothing is deleted.
    """
    file = os.path.join(path, HEADER)
    check_regular(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        if os.path.isdir(path) and any(is_store_file(n) for n in os.listdir(path)):
            raise CacheError(
                f"the cache directory {path!r} holds cache files but no {HEADER}, so whose features they are "
                f"cannot be verified; {_fix(path)}"
            ) from None
        return None
    except OSError as e:
        raise CacheError(
            f"the cache directory {path!r} has an unreadable {HEADER} ({e.strerror}); {_fix(path)}"
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
    elif why is None and (not isinstance(head.get("fingerprint"), str) or head.get("codec") not in CODECS):
        why = f"its fingerprint {head.get('fingerprint')!r} or codec {head.get('codec')!r} is not valid"
    layout = None if why else layout_from_json(head.get("layout"))
    if why is None and layout is None:
        why = f"its layout {head.get('layout')!r} is not a list of [shape, dtype] pairs"
    if why:
        raise CacheError(f"the cache directory {path!r} has a {HEADER} that cannot be verified ({why}); {_fix(path)}")
    return head, layout


def is_store_file(name: str) -> bool:
    return name in (HEADER, INDEX) or (name.startswith("slab_") and name.endswith(".bin"))


def remove_store_files(path: str) -> None:
    """Removes slabs and index first and the header last: a crash in between leaves a header, never orphans."""
    names = sorted((n for n in os.listdir(path) if is_store_file(n)), key=lambda n: n == HEADER)
    for name in names:
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            raise CacheError(f"the cache file {p!r} is a directory; remove it by hand, or use another path")
        os.remove(p)


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index(path: str, entries: list[tuple[int, int, int]]) -> None:
    """``entries``: (key, 0 = main codec / 1 = escape, slot), LRU first; written atomically."""
    buf = io.BytesIO()
    torch.save(
        {
            "keys": torch.tensor([e[0] for e in entries], dtype=torch.int64),
            "codec": torch.tensor([e[1] for e in entries], dtype=torch.int8),
            "slot": torch.tensor([e[2] for e in entries], dtype=torch.int64),
        },
        buf,
    )
    write_atomic(os.path.join(path, INDEX), buf.getvalue())


def read_index(path: str) -> tuple[list[int], list[int], list[int]] | None:
    """(keys, codes, slots) from index.pt; ([], [], []) when absent; None when unreadable (rebuild by scanning)."""
    file = os.path.join(path, INDEX)
    check_regular(file)
    try:
        idx = torch.load(file, weights_only=True)
        keys, codes, slots = idx["keys"].tolist(), idx["codec"].tolist(), idx["slot"].tolist()
        if not (len(keys) == len(codes) == len(slots)):
            return None
        return keys, codes, slots
    except FileNotFoundError:
        return [], [], []
    except Exception:
        return None


class StoreLock:
    """An exclusive ``flock`` on the store directory, held while a cache may write it (one writer per path)."""

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
                    "process); one writer per directory: close() the other cache, give each process its own path "
                    "(e.g. path=f'cache/rank{rank}'), or pass readonly=True to read what the other one stored"
                ) from None
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def dir_writable(path: str) -> bool:
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    return all(os.access(os.path.join(path, n), os.W_OK) for n in os.listdir(path) if is_store_file(n))
