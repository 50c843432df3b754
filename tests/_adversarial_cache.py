"""Adversarial run over the feature cache, its disk store and the native entry points (issue 10's closing table).

``PYTHONPATH=<tree> python tests/_adversarial_cache.py`` prints JSON: per category, attempts and how each ended:
``clear`` (a FreezeError sentence), ``raw`` (any other exception), ``wrong`` (a wrong result), ``crash`` (a
subprocess killed by a signal), ``ok`` (accepted and right). Runs on the lookup/get API too, to compare with
older trees. Uses setpriv to drop root's permission override for the read-only case. About two minutes.
"""

import collections
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import torch

import freezert
from freezert import FreezeError
from freezert import _native as nat
from freezert.cache import FeatureCache

NEW = hasattr(FeatureCache, "fetch")
LAY = [((3, 5), torch.float32), ((7,), torch.float32)]
FP, FP2 = "0123456789abcdef", "fedcba9876543210"
T = collections.defaultdict(lambda: collections.Counter())
LOG = []
TMP = tempfile.mkdtemp()
n_dir = [0]


def slab_of(path: str, codec: str) -> str:
    """The slab file of ``codec`` in a one-layout store: ``slab_<layout id>_<codec>.bin`` (``slab_<codec>.bin``
    in stores before format 3)."""
    names = [n for n in os.listdir(path) if n.startswith("slab_") and n.endswith(f"{codec}.bin")]
    return names[0] if names else f"slab_{codec}.bin"


def d():
    n_dir[0] += 1
    return os.path.join(TMP, f"d{n_dir[0]}")


def attempt(cat, name, fn):
    T[cat]["attempts"] += 1
    try:
        r = fn()
    except FreezeError as e:
        T[cat]["clear"] += 1
        LOG.append((cat, name, "clear", str(e)[:160]))
        return
    except Exception as e:
        T[cat]["raw"] += 1
        LOG.append((cat, name, "raw", f"{type(e).__name__}: {str(e)[:160]}"))
        return
    r = r or "ok"
    T[cat][r] += 1
    if r != "ok":
        LOG.append((cat, name, r, ""))


def sub(code, *args):
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    if r.returncode < 0:
        return "crash"
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        if "Error" in tail and ("CacheError" in tail or "FreezeError" in tail or "NativeError" in tail):
            raise freezert.CacheError(tail)
        raise RuntimeError(tail)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "ok"


def rows(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) * scale for s, _ in LAY]


def cache(codec="fp16", where="host", budget="1MiB", path=None, fp=FP, **kw):
    c = FeatureCache(codec, where, budget, path, **kw)
    c.bind(fp, LAY, "cpu")
    return c


def read(c, keys):
    keys = torch.as_tensor(keys)
    if NEW:
        return c.fetch(keys, "cpu")
    hit = c.lookup(keys)
    return hit, (c.get(keys[hit], "cpu") if hit.any() else [])


# 1. codec magnitudes ------------------------------------------------------------------------------------------
REL = {"fp16": 2**-11, "bf16": 2**-8, "fp8": 2**-4}
for codec in REL:
    for where in ("host", "disk"):
        for scale in (1e-45, 1e-39, 1e-30, 1e-12, 1e-8, 1e-5, 1.0, 6e4, 1e6, 1e30, 1e38):

            def f(codec=codec, where=where, scale=scale):
                c = cache(codec, where, path=d() if where == "disk" else None)
                x = rows(5, 1)
                x[1] = x[1] * scale
                c.put(torch.arange(5), x)
                hit, got = read(c, torch.arange(5))
                if not hit.all():
                    return "ok"  # not stored (e.g. non-finite): recomputed, never wrong
                for g, t in zip(got, x):
                    amax = t.reshape(5, -1).abs().amax(1)
                    if not ((g - t).reshape(5, -1).abs() <= amax[:, None] * REL[codec] * 1.0001).all():
                        return "wrong"

            attempt("codec range (fp16/bf16/fp8 x magnitude x tier)", f"{codec}/{where}/{scale}", f)


# 2. foreign and unverifiable stores ---------------------------------------------------------------------------
def foreign_copy():
    a, b = d(), d()
    ca = cache("fp32", "disk", path=a, fp=FP)
    ca.put(torch.arange(6), rows(6, 1))
    ca.close()
    cb = cache("fp32", "disk", path=b, fp=FP2)
    cb.put(torch.arange(6), rows(6, 2))
    cb.close()
    for n in (slab_of(a, "fp32"), "index.pt"):
        shutil.copy(os.path.join(a, n), os.path.join(b, n))
    cb = cache("fp32", "disk", path=b, fp=FP2)
    hit, got = read(cb, torch.arange(6))
    return "wrong" if hit.any() else "ok"


attempt("foreign / unverifiable store", "slab+index copied from another model", foreign_copy)

for dmg in ("garbage", "layout_str", "layout_int", "layout_dtype", "fingerprint_edit", "truncated_json", "empty"):

    def f(dmg=dmg):
        p = d()
        c = cache("fp32", "disk", path=p)
        c.put(torch.arange(4), rows(4))
        c.close()
        hf = os.path.join(p, "header.json")
        head = json.loads(open(hf).read())
        if dmg == "garbage":
            open(hf, "wb").write(b"\x00\xff")
        elif dmg == "truncated_json":
            open(hf, "w").write(json.dumps(head)[:40])
        elif dmg == "empty":
            open(hf, "w").write("")
        else:
            key, put = (
                ("layouts", lambda v: [{**head["layouts"][0], "tensors": v}])
                if "layouts" in head
                else (
                    "layout",
                    lambda v: v,
                )
            )
            if dmg == "layout_str":
                head[key] = "abc"
            elif dmg == "layout_int":
                head[key] = put([[[3, "x"], "float32"]])
            elif dmg == "layout_dtype":
                head[key] = put([[[3, 5], "nope"], [[7], "float32"]])
            elif dmg == "fingerprint_edit":
                head["fingerprint"] = FP2
            open(hf, "w").write(json.dumps(head))
        c2 = cache("fp32", "disk", path=p, fp=FP2 if dmg == "fingerprint_edit" else FP)
        hit, _ = read(c2, torch.arange(4))
        return "wrong" if hit.any() else "ok"  # adopted: a store it cannot verify served or silently wiped

    attempt("foreign / unverifiable store", f"header {dmg}", f)


def die_before_flush():
    p = d()
    c = cache("fp32", "disk", path=p, fp=FP)
    c.put(torch.arange(5), rows(5))
    c.close()
    hf = os.path.join(p, "header.json")
    open(hf, "wb").write(b"{")
    code = """
        import os, sys, torch
        from freezert.cache import FeatureCache
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1])
        try:
            c.bind(sys.argv[2], [((3, 5), torch.float32), ((7,), torch.float32)], "cpu")
        except Exception as e:
            print("refused"); sys.exit(0)
        os._exit(0)
    """
    r = sub(code, p, FP2)
    if r == "refused":
        return "ok"
    c2 = cache("fp32", "disk", path=p, fp=FP2)
    hit, _ = read(c2, torch.arange(5))
    return "wrong" if hit.any() else "ok"


attempt("foreign / unverifiable store", "corrupt header, adopted, death before flush", die_before_flush)


# 3/4. ids: duplicates, augmentation (through the wrapper, and at the cache when it has content=) -------------------
def wrap_dup():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fm = freezert.wrap(m, freeze=1, cache="fp32").eval()
    x = torch.randn(3, 4)
    try:
        fm(x, cache_ids=[0, 1, 0])
    except FreezeError:
        raise
    for j in (0, 2):  # next epoch: do both samples that claimed id 0 get their own features?
        if not torch.allclose(fm(x[[j]], cache_ids=[0]), m(x[[j]]), atol=1e-5):
            return "wrong"


attempt("ids: duplicate id in a batch", "wrap(cache_ids=[0,1,0])", wrap_dup)
if NEW:

    def cache_dup():
        c = cache("fp32")
        c.put(torch.tensor([0, 1, 0]), rows(3), content=torch.tensor([5, 6, 7]))
        return "wrong"

    attempt("ids: duplicate id in a batch", "put(ids, content=) same id, two inputs", cache_dup)


def wrap_aug():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fm = freezert.wrap(m, freeze=1, cache="fp32").eval()
    fm(torch.randn(3, 4), cache_ids=[0, 1, 2])
    x2 = torch.randn(3, 4)  # epoch 2: augmented
    out = fm(x2, cache_ids=[0, 1, 2])
    return "wrong" if not torch.allclose(out, m(x2), atol=1e-5) else "ok"


attempt("ids: augmented input under the same id", "wrap(cache_ids) epoch 2 augmented", wrap_aug)
if NEW:

    def cache_aug():
        import warnings

        c = cache("fp32")
        c.put(torch.arange(3), rows(3), content=torch.tensor([1, 2, 3]))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            hit, _ = c.fetch(torch.arange(3), "cpu", content=torch.tensor([1, 9, 3]))
        if hit[1]:
            return "wrong"
        return "ok" if any("augmentation" in str(x.message) for x in w) else "wrong"

    attempt("ids: augmented input under the same id", "fetch(content=) changed content", cache_aug)

    def cache_aug_strict():
        c = cache("fp32", strict=True)
        c.put(torch.arange(3), rows(3), content=torch.tensor([1, 2, 3]))
        c.fetch(torch.arange(3), "cpu", content=torch.tensor([1, 9, 3]))
        return "wrong"

    attempt("ids: augmented input under the same id", "strict=True", cache_aug_strict)

# 5. crashes: truncation, two writers, kill -9 -------------------------------------------------------------------
SIGBUS = """
    import os, sys, torch
    from freezert.cache import FeatureCache
    lay = [((3, 5), torch.float32), ((7,), torch.float32)]
    rec = int(sys.argv[2])
    c = FeatureCache("fp32", "disk", 8 * rec, sys.argv[1])
    c.bind("0123456789abcdef", lay, "cpu")
    x = [torch.randn(8, 3, 5), torch.randn(8, 7)]
    c.put(torch.arange(8), x)
    (slab,) = [n for n in os.listdir(sys.argv[1]) if n.startswith("slab_")]
    os.truncate(os.path.join(sys.argv[1], slab), int(sys.argv[3]))
    for step in range(1, 4):
        c.put(torch.arange(8) + 100 * step, x)
    k = torch.arange(8) + 300
    if hasattr(c, "fetch"):
        hit, r = c.fetch(k, "cpu")
    else:
        hit = c.lookup(k); r = c.get(k[hit], "cpu")
    print("ok" if hit.all() and torch.equal(r[0], x[0]) else "wrong")
"""
REC = 112 if NEW else 104
for cut in (0, 1, REC * 3 + 5):
    attempt(
        "disk: truncation / concurrent writers / kill -9",
        f"writes at budget after truncate to {cut}",
        lambda cut=cut: sub(SIGBUS, d(), str(REC), str(cut)),
    )


def two_writers():
    p = d()
    code = """
        import sys, torch
        from freezert.cache import FeatureCache
        lay = [((3, 5), torch.float32), ((7,), torch.float32)]
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1]); c.bind("0123456789abcdef", lay, "cpu")
        base = int(sys.argv[2])
        for s in range(30):
            k = torch.arange(4) + base + 4 * s
            c.put(k, [torch.full((4, 3, 5), float(base + s)), torch.full((4, 7), float(base + s))])
        c.flush()
        import time; time.sleep(3)  # both processes hold the store at once
        print("ok")
    """
    c0 = cache("fp32", "disk", path=p)
    c0.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), p, str(b)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in (0, 1000)
    ]
    outs = [pr.communicate(timeout=300) for pr in procs]
    if any(pr.returncode < 0 for pr in procs):
        return "crash"
    refused = sum("CacheError" in e for _, e in outs)
    c = cache("fp32", "disk", path=p)
    for base in (0, 1000):
        for s in range(30):
            k = torch.arange(4) + base + 4 * s
            hit, got = read(c, k)
            if hit.any() and not (got[0] == float(base + s)).all():
                return "wrong"
    if refused:
        raise freezert.CacheError("second writer refused")
    return "ok"


attempt("disk: truncation / concurrent writers / kill -9", "two processes writing one path", two_writers)


def kill9():
    p = d()
    code = """
        import os, sys, torch, threading
        from freezert.cache import FeatureCache
        lay = [((3, 5), torch.float32), ((7,), torch.float32)]
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1]); c.bind("0123456789abcdef", lay, "cpu")
        threading.Timer(0.3, lambda: os._exit(9)).start()
        s = 0
        while True:
            k = torch.arange(4) + 4 * (s % 50)
            c.put(k, [torch.full((4, 3, 5), float(s % 50)), torch.full((4, 7), float(s % 50))])
            if s % 7 == 0: c.flush()
            s += 1
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), p], capture_output=True, timeout=120)
    c = cache("fp32", "disk", path=p)
    for s in range(50):
        hit, got = read(c, torch.arange(4) + 4 * s)
        if hit.any() and not (got[0] == float(s)).all():
            return "wrong"


attempt("disk: truncation / concurrent writers / kill -9", "kill -9 mid-write, reopen", kill9)


# 6. native boundary ----------------------------------------------------------------------------------------------
def alias_gather():
    st = torch.tensor([[0.0], [3.0], [6.0], [9.0]])
    nat.gather_decode(st, None, torch.tensor([3, 2, 1, 0]), st, "fp32")
    return "ok" if st.flatten().tolist() == [9.0, 6.0, 3.0, 0.0] else "wrong"


attempt("native: aliasing / views / broadcast", "gather out=store", alias_gather)


def alias_scatter():
    st = torch.arange(8.0).view(4, 2)
    want = st.clone()
    want[[2, 3]] = st[[0, 1]].clone()
    nat.encode_scatter(st[:2], torch.tensor([2, 3]), st, None, "fp32")
    return "ok" if torch.equal(st, want) else "wrong"


attempt("native: aliasing / views / broadcast", "scatter src=store[:2]", alias_scatter)


def alias_scatter2():
    st = torch.arange(8.0).view(4, 2)
    want = st.clone()
    want[[1, 2]] = st[[0, 1]].clone()
    nat.encode_scatter(st[:2], torch.tensor([1, 2]), st, None, "fp32")
    return "ok" if torch.equal(st, want) else "wrong"


attempt("native: aliasing / views / broadcast", "scatter overlapping rows", alias_scatter2)
for ref in (False, True):
    for name, mk in [
        ("1-element strided", lambda: torch.arange(24.0).reshape(4, 6)[:, ::2][:1]),
        ("empty strided", lambda: torch.arange(24.0).reshape(4, 6)[:, ::2][:0]),
        ("1-element 2-step", lambda: torch.arange(24.0).reshape(4, 6)[::3, ::2][1:2]),
        ("transposed row", lambda: torch.arange(24.0).reshape(4, 6).t()[:1]),
    ]:

        def f(mk=mk, ref=ref):
            nat._FORCE_REFERENCE = ref
            try:
                v = mk()
                return (
                    "ok"
                    if torch.equal(nat.hash_rows(v), nat.hash_rows(v.clone(memory_format=torch.contiguous_format)))
                    else "wrong"
                )
            finally:
                nat._FORCE_REFERENCE = False

        attempt("native: aliasing / views / broadcast", f"hash {name} ref={ref}", f)


def bcast():
    return sub("""
        import torch, freezert._native as n
        x = torch.randn(1, 2**16).expand(2**22, 2**16)
        h = n.hash_rows(x)
        print("ok" if bool((h == h[0]).all()) else "wrong")
    """)


attempt("native: aliasing / views / broadcast", "hash 1 TiB expand", bcast)


# 7. bad inputs ---------------------------------------------------------------------------------------------------
def bad(name, fn):
    def g():
        fn()
        return "ok"

    attempt("bad input: clear error expected", name, g)


def file_path():
    f = os.path.join(TMP, "afile")
    open(f, "w").write("x")
    cache("fp16", "disk", path=f)


bad("path= a regular file", file_path)
for what in ("slab", "index.pt"):
    for kind in ("dir", "devnull"):

        def f(what=what, kind=kind):
            p = d()
            c = cache("fp16", "disk", path=p)
            c.put(torch.arange(3), rows(3))
            c.close()
            what = slab_of(p, "fp16") if what == "slab" else what
            os.remove(os.path.join(p, what))
            os.mkdir(os.path.join(p, what)) if kind == "dir" else os.symlink("/dev/null", os.path.join(p, what))
            c = cache("fp16", "disk", path=p)
            read(c, torch.arange(3))
            c.put(torch.arange(3) + 10, rows(3))
            c.flush()

        bad(f"{what} is a {kind}", f)
for b in (10**400, "9" * 400, float("nan"), -1, "12 parsecs", 2**63):
    bad(f"budget={str(b)[:12]}", lambda b=b: FeatureCache("fp16", "host", b))


def disk_msg():
    c = FeatureCache("fp32", "disk", 130)
    try:
        c.bind(FP, [((3, 5), torch.float32), ((12,), torch.float32)], "cpu")
    except FreezeError as e:
        if "136 B" not in str(e) and "144 B" not in str(e):
            raise RuntimeError(f"self-contradicting: {e}") from e
        raise


bad("disk budget message", disk_msg)


def ids_big():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fm = freezert.wrap(m, freeze=1, cache="fp32")
    fm(torch.randn(1, 4), cache_ids=[2**63])


bad("wrap cache_ids=[2**63]", ids_big)


def keys_big():
    c = cache()
    c.fetch([2**63], "cpu") if NEW else c.lookup([2**63])


bad("cache keys [2**63]", keys_big)


def deep():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fm = freezert.wrap(m, freeze=1, cache=FeatureCache("fp16", "disk", path=d()))
    x = torch.randn(2, 4)
    fm(x)
    twin = copy.deepcopy(fm)
    twin(x)


bad("copy.deepcopy(fm) with a disk cache", deep)


def ro():
    p = d()
    c = cache("fp32", "disk", path=p)
    c.put(torch.arange(3), rows(3))
    c.close()
    code = """
        import os, sys, torch
        from freezert.cache import FeatureCache
        c = FeatureCache("fp32", "disk", "1MiB", sys.argv[1])
        c.bind("0123456789abcdef", [((3, 5), torch.float32), ((7,), torch.float32)], "cpu")
        k = torch.arange(3)
        hit = c.fetch(k, "cpu")[0] if hasattr(c, "fetch") else c.lookup(k)
        print("ok" if hit.all() else "wrong")
    """
    for n in os.listdir(p):
        os.chmod(os.path.join(p, n), 0o444)
    os.chmod(p, 0o555)
    os.chmod(TMP, 0o755)
    r = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search,-fowner",
            sys.executable,
            "-c",
            textwrap.dedent(code),
            p,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    os.chmod(p, 0o755)
    if r.returncode < 0:
        return "crash"
    if r.returncode:
        tail = r.stderr.strip().splitlines()[-1]
        if "CacheError" in tail:
            raise freezert.CacheError(tail)
        raise RuntimeError(tail)
    r = r.stdout.strip()
    if r != "ok":
        return r


bad("read-only store (other user)", ro)


def bad_layout_bind():
    cache().bind(FP, [((3, "x"), torch.float32)], "cpu")


bad("bind(layout=malformed)", bad_layout_bind)


def put_wrong():
    cache().put(torch.arange(2), [torch.zeros(2, 3, 5)])


bad("put(one tensor short)", put_wrong)


def native_bad():
    nat.gather_decode(torch.zeros(4, 2), None, torch.tensor([0, 9]), torch.empty(2, 2), "fp32")


bad("gather index out of range", native_bad)


def native_meta():
    nat.hash_rows(torch.empty(3, 4, device="meta"))


bad("hash a meta tensor", native_meta)

print(json.dumps({"new": NEW, "table": {k: dict(v) for k, v in T.items()}, "log": [x for x in LOG]}, indent=1))
