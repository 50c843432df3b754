"""Ultralytics YOLOv8n with the cache recipe (no mosaic, flips only): epoch time of ``FreezertCallback(feature_cache=)``
against Ultralytics' own ``freeze=10``, epochs alternated across processes, and the cached run resumed half-way.

    python benchmarks/bench_ultralytics.py [--images 64] [--imgsz 320] [--epochs 8] [--batch 16]

A generated data set (coloured boxes on noise, YOLO labels, written to a temporary folder), ``YOLO("yolov8n.yaml")``
(nothing downloaded), the CPU, one thread, ``workers=0``, Ultralytics' own image cache (``cache="ram"``) for every
variant, and the documented recipe: ``mosaic=0, hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0.5``.
Each variant trains in its own process; a turn file makes them run one epoch each in turn (the others wait,
idle), so drift on a shared machine lands on all alike. An epoch is timed from ``on_train_epoch_start`` to
``on_train_epoch_end`` (data loading, forward, backward, optimizer, EMA; no validation). The cached variant is
interrupted after epoch ``epochs // 2`` and resumed with ``train(resume=True)`` and a new callback: its store
(``<save_dir>/freezert_cache``) is reopened. Prints each variant's epoch times, its cache hits per epoch, the
median epoch from epoch 2 on, and per-round ratios to Ultralytics' epoch; then the training losses and final
metrics of each variant next to Ultralytics'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ultralytics freeze=10", "freezert, no cache", "freezert, feature_cache='fp16' (disk)", "freezert, memory")
RECIPE = dict(mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.5)


def make_dataset(root: Path, n: int, imgsz: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(8, n // 4))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            img = (rng.random((imgsz, imgsz, 3)) * 60).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.integers(imgsz // 8, imgsz // 3, 2)
                x0, y0 = rng.integers(0, imgsz - w), rng.integers(0, imgsz - h)
                c = int(rng.integers(0, 2))
                img[y0 : y0 + h, x0 : x0 + w] = (200, 60, 60) if c == 0 else (60, 60, 200)
                cx, cy = (x0 + w / 2) / imgsz, (y0 + h / 2) / imgsz
                lines.append(f"{c} {cx:.5f} {cy:.5f} {w / imgsz:.5f} {h / imgsz:.5f}")
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    names = "names:\n  0: red\n  1: blue\n"
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n{names}")
    return root / "data.yaml"


class Turns:
    """A file holding whose epoch it is: ``wait(me)`` until it is ``me``; ``pass_on(me)`` gives it to the next."""

    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n

    def wait(self, me: int, timeout: float = 3600) -> None:
        t0 = time.monotonic()
        while int(self.path.read_text() or 0) != me:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"variant {me} waited {timeout} s for its turn")
            time.sleep(0.02)

    def pass_on(self, me: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str((me + 1) % self.n))
        os.replace(tmp, self.path)


def worker(me: int, data: str, out: Path, turns: Turns, a) -> None:
    import torch
    from ultralytics import YOLO

    from freezert.cache import FeatureCache
    from freezert.integrations.ultralytics import FreezertCallback

    torch.set_num_threads(1)
    variant = VARIANTS[me]
    rec: dict = {"variant": variant, "epochs": {}, "resumed_at": None}
    interrupt_after = a.epochs // 2 - 1 if "disk" in variant else None

    class Interrupt(Exception):
        pass

    def callback():
        if variant.startswith("ultralytics"):
            return None
        if "no cache" in variant:
            return FreezertCallback()
        if "memory" in variant:
            return FreezertCallback(feature_cache=FeatureCache("fp16", "auto", budget="8GiB"))
        return FreezertCallback(feature_cache="fp16")

    def attach(model, cb):
        state = {}

        def start(tr):
            if rec.pop("resuming", False):  # the resume's setup ran in this variant's turn: its epoch waits a round
                turns.pass_on(me)
            turns.wait(me)
            state["t0"] = time.perf_counter()

        def end(tr):
            e = rec["epochs"].setdefault(str(tr.epoch), {})
            e["seconds"] = time.perf_counter() - state["t0"]
            e["tloss"] = {k: float(v) for k, v in tr.tloss.items()}
            if cb is not None and cb.frozen is not None and cb.frozen.cache is not None:
                st = cb.frozen.cache.stats()
                e["hits"], e["lookups"] = st["hits"], st["lookups"]

        def fit_end(tr):
            if interrupt_after is not None and tr.epoch == interrupt_after and rec["resumed_at"] is None:
                rec["resumed_at"], rec["resuming"] = tr.epoch + 1, True
                raise Interrupt  # keeps the turn through the resume's setup
            if tr.epoch + 1 < tr.epochs:
                turns.pass_on(me)

        def train_end(tr):
            rec["metrics"] = {k: float(v) for k, v in tr.metrics.items()}
            turns.pass_on(me)  # after the final validation

        model.add_callback("on_train_epoch_start", start)
        model.add_callback("on_train_epoch_end", end)
        model.add_callback("on_fit_epoch_end", fit_end)
        model.add_callback("on_train_end", train_end)

    args = dict(
        data=data,
        imgsz=a.imgsz,
        epochs=a.epochs,
        batch=a.batch,
        workers=0,
        device="cpu",
        cache="ram",
        plots=False,
        val=False,
        freeze=10,
        seed=0,
        deterministic=True,
        amp=False,
        project=str(out / "runs"),
        name=f"v{me}",
        exist_ok=True,
        verbose=False,
        **RECIPE,
    )
    model = YOLO("yolov8n.yaml")
    cb = callback()
    if cb is not None:
        cb.register(model)
    attach(model, cb)
    try:
        model.train(**args)
    except Interrupt:
        cb.store.close()  # the interrupted process would end here
        model = YOLO(out / "runs" / f"v{me}" / "weights" / "last.pt")
        cb = callback()
        cb.register(model)
        attach(model, cb)
        model.train(resume=True, data=data)
    (out / f"v{me}.json").write_text(json.dumps(rec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        out = Path(a.dir)
        worker(a.worker, str(out / "ds" / "data.yaml"), out, Turns(out / "turn", len(VARIANTS)), a)
        return
    out = Path(tempfile.mkdtemp(prefix="bench_ultralytics_"))
    make_dataset(out / "ds", a.images, a.imgsz)
    (out / "turn").write_text("0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--dir", str(out), "--images", str(a.images), "--imgsz", str(a.imgsz)]
    cmd += ["--epochs", str(a.epochs), "--batch", str(a.batch)]
    procs = [subprocess.Popen([*cmd, "--worker", str(i)], env=env, stdout=subprocess.DEVNULL) for i in range(4)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a variant failed; see {out}")
    recs = [json.loads((out / f"v{i}.json").read_text()) for i in range(len(VARIANTS))]
    import torch

    print(
        f"{datetime.date.today()}, torch {torch.__version__}, CPU (1 thread), YOLOv8n from yaml, {a.images} images at "
        f"{a.imgsz} px, batch {a.batch}, {a.epochs} epochs, workers=0, cache='ram', recipe {RECIPE}"
    )
    base = recs[0]["epochs"]
    epochs = sorted(int(e) for e in base)
    print("| variant | epoch s (1..n) | hits / lookups per epoch | median epoch 2..n | / Ultralytics, by round |")
    print("| --- | --- | --- | --- | --- |")
    for r in recs:
        ep = r["epochs"]
        secs = [ep[str(e)]["seconds"] for e in epochs]
        hits, prev = [], (0, 0)
        for e in epochs:
            if "hits" in ep[str(e)]:
                h, n = ep[str(e)]["hits"], ep[str(e)]["lookups"]
                if r["resumed_at"] == e:
                    prev = (0, 0)  # a new callback's cache: its counters start at 0
                hits.append(f"{h - prev[0]}/{n - prev[1]}")
                prev = (h, n)
            else:
                hits.append("-")
        ratios = [ep[str(e)]["seconds"] / base[str(e)]["seconds"] for e in epochs[1:]]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"| {r['variant']} | {', '.join(f'{s:.2f}' for s in secs)} | {', '.join(hits)} | "
            f"{statistics.median(secs[1:]):.2f} s | {statistics.median(ratios):.3f}x [{q[0]:.3f}, {q[2]:.3f}] |"
        )
    print(
        "\ntraining loss (box, cls, dfl) per epoch, largest relative difference to Ultralytics' (a resumed run: before "
        "its resume; Ultralytics seeds its RNG anew at a resume, so later flips differ); final metrics:"
    )
    for r in recs:
        upto = [e for e in epochs if r["resumed_at"] is None or e < r["resumed_at"]]
        worst = max(
            abs(r["epochs"][str(e)]["tloss"][k] - base[str(e)]["tloss"][k]) / abs(base[str(e)]["tloss"][k])
            for e in upto
            for k in base[str(e)]["tloss"]
        )
        resumed = f", resumed at epoch {r['resumed_at'] + 1}" if r["resumed_at"] is not None else ""
        m = {k.split("/")[-1]: round(v, 5) for k, v in r["metrics"].items()}
        print(f"- {r['variant']}: {worst:.2e} (epochs 1..{upto[-1] + 1}){resumed}; {m}")
    print(f"(runs in {out})")


if __name__ == "__main__":
    main()
