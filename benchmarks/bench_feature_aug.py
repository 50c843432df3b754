"""Test accuracy and epoch time of augmentation with a frozen prefix: image space (naive freezing), exact finite
variants served from the cache (FiniteAugment), and feature space on cached rows (FeatureFlip, FeatureShift).

    pip install scikit-learn   # for its bundled digits data set (load_digits: 1,797 8x8 images), not a dependency
    python benchmarks/bench_feature_aug.py [--seeds 5] [--epochs 40] [--train-frac 0.15]

Transfer on real data: a small CNN (a root ``nn.Sequential``, so freezert drives it) is trained on digits 0-4
(the "pretrained" backbone), then its first 9 blocks (stem to a 64x8x8 map, stride 4) are frozen and the rest
re-initialised and trained on digits 5-9 (15% of them, ``--train-frac``; the rest are the test set). Images are
upsampled to 32x32. Each variant trains from the same pretrained weights and tail initialisation per seed; the table
gives the test accuracy (mean and standard deviation over seeds) and the median epoch time (epochs 2 on; CPU, one
thread; the variants' epochs alternate, and each epoch's ratio to the naive no-augmentation epoch of its round is
taken, median and quartiles). Variants:

* naive: ``requires_grad=False`` on the prefix (BatchNorm in eval mode), the prefix runs every step; no
  augmentation, image-space horizontal flip (p=0.5), image-space shift by a multiple of the boundary stride
  (p=0.5, up to 4 px each way, zeros fill).
* cache: ``freezert.wrap(model, freeze=9, cache="fp16")``; no augmentation; ``FiniteAugment([identity, hflip])`` with
  ``cache_ids``/``cache_aug`` (exact: each flipped image computed once); ``feature_aug=FeatureFlip(0.5)``;
  ``feature_aug=FeatureShift(1, p=0.5)`` (one cell = 4 px).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import freezert
from freezert.cache import FeatureFlip, FeatureShift, FiniteAugment

FREEZE = 9  # blocks 0..8: the stem and two conv stages
STRIDE = 4  # the boundary's stride in pixels


def data(train_frac: float, seed: int = 0):
    """(source x, source y, target train x, y, target test x, y, target train indices) from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    src = y < 5
    tx, ty = x[~src], y[~src] - 5
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(tx), generator=g)
    cut = int(train_frac * len(tx))
    tr, te = perm[:cut], perm[cut:]
    return x[src], y[src], tx[tr], ty[tr], tx[te], ty[te]


def cnn() -> nn.Sequential:
    def stage(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *stage(1, 32, 1),  # 0-2
        *stage(32, 48, 2),  # 3-5: 16x16
        *stage(48, 64, 2),  # 6-8: 8x8, the boundary
        *stage(64, 96, 2),  # 9-11: 4x4
        *stage(96, 96, 1),  # 12-14
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 5),
    )


def pretrain(x, y, epochs: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    m = cnn()
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return m.eval()


def fresh_tail(pre: nn.Sequential, seed: int) -> nn.Sequential:
    m = copy.deepcopy(pre)
    torch.manual_seed(1000 + seed)
    for blk in list(m)[FREEZE:]:
        for sub in blk.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return m


def hflip(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    return torch.where(on.view(-1, 1, 1, 1), x.flip(-1), x)


def shift_images(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    on = torch.rand(len(x), generator=g) < 0.5
    d = torch.randint(-1, 2, (len(x), 2), generator=g) * on.view(-1, 1) * STRIDE
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(d.tolist()):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def identity(x):
    return x


def flip_one(x):
    return x.flip(-1)


VARIANTS = (
    "naive, no aug",
    "naive, image hflip",
    "naive, image shift",
    "cache, no aug",
    "cache, FiniteAugment hflip (exact)",
    "cache, FeatureFlip(0.5)",
    "cache, FeatureShift(1 cell)",
)


class Run:
    """One variant's fine-tuning for one seed, an epoch at a time (so that the variants' epochs can alternate)."""

    def __init__(self, variant: str, pre: nn.Sequential, d, seed: int):
        _, _, self.x, self.y, self.tx, self.ty = d
        self.variant, self.naive = variant, variant.startswith("naive")
        self.m = m = fresh_tail(pre, seed)
        self.g = torch.Generator().manual_seed(seed)  # batch order: the same for every variant
        self.fa = torch.Generator().manual_seed(seed)  # augmentation draws
        if self.naive:
            for blk in list(m)[:FREEZE]:
                blk.requires_grad_(False)
            self.model = m
        else:
            aug = None
            if "FeatureFlip" in variant:
                aug = FeatureFlip(0.5, generator=self.fa)
            elif "FeatureShift" in variant:
                aug = FeatureShift(1, p=0.5, generator=self.fa)
            self.model = freezert.wrap(m, freeze=FREEZE, cache="fp16", feature_aug=aug)
        self.finite = None
        if "FiniteAugment" in variant:
            self.finite = FiniteAugment(range(len(self.x)), [identity, flip_one], seed=seed)
        self.opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 2e-3)

    def epoch(self, e: int) -> float:
        """Trains one epoch; returns its seconds."""
        m, x, y = self.m, self.x, self.y
        self.model.train()
        if self.naive:
            for blk in list(m)[:FREEZE]:
                blk.eval()  # frozen BatchNorm: fixed statistics, as freezert's bn="frozen"
        t0 = time.perf_counter()
        for idx in torch.randperm(len(x), generator=self.g).split(32):
            xb = x[idx]
            if self.variant == "naive, image hflip":
                xb = hflip(xb, torch.rand(len(idx), generator=self.fa) < 0.5)
            elif self.variant == "naive, image shift":
                xb = shift_images(xb, self.fa)
            if self.finite is not None:
                v = torch.tensor([self.finite.variant(int(i), e) for i in idx])
                out = self.model(hflip(xb, v == 1), cache_ids=idx, cache_aug=v)
            elif self.naive:
                out = self.model(xb)
            else:
                out = self.model(xb, cache_ids=idx)
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(out, y[idx]).backward()
            self.opt.step()
        return time.perf_counter() - t0

    def accuracy(self) -> float:
        with torch.no_grad():
            self.m.eval()
            return (self.m(self.tx).argmax(1) == self.ty).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-frac", type=float, default=0.15, help="share of digits 5-9 to train on (rest: test)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = data(a.train_frac)
    pre = pretrain(d[0], d[1])
    print(
        f"{datetime.date.today()}, torch {torch.__version__}, CPU ({a.threads} thread), digits 5-9: "
        f"{len(d[2])} train / {len(d[4])} test images at 32x32, {a.epochs} epochs, batch 32, {a.seeds} seeds"
    )
    accs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for seed in range(a.seeds):
        runs = [Run(v, pre, d, seed) for v in VARIANTS]
        for e in range(a.epochs):  # the variants' epochs in turn: drift on a shared machine lands on all alike
            ts = [r.epoch(e) for r in runs]
            if e:  # the first epoch fills the cache
                for v, t in zip(VARIANTS, ts):
                    times[v].append(t)
                    ratios[v].append(t / ts[0])
        for r in runs:
            accs[r.variant].append(r.accuracy())
    print(f"| variant | test accuracy (mean ± sd, {a.seeds} seeds) | median epoch | epoch / naive no aug, per round |")
    print("| --- | --- | --- | --- |")
    for v in VARIANTS:
        acc, sd = statistics.mean(accs[v]), statistics.stdev(accs[v]) if a.seeds > 1 else 0.0
        t, q = statistics.median(times[v]), statistics.quantiles(ratios[v], n=4)
        print(
            f"| {v} | {100 * acc:.2f}% ± {100 * sd:.2f} | {1000 * t:.0f} ms | {statistics.median(ratios[v]):.2f}x "
            f"[{q[0]:.2f}, {q[2]:.2f}] |"
        )


if __name__ == "__main__":
    main()
