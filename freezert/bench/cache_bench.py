"""The feature cache across epochs: a fixed synthetic dataset (no augmentation) iterated for several epochs.

Variants: full fine-tune, naive freeze, freezert (freeze=N, no cache): every epoch costs the same;
``freezert+cache``: epoch 1 runs the frozen prefix and fills the cache, epochs 2+ read it back (hits);
``floor``: the boundary features are precomputed once into device memory (outside the timed epochs) and only
the trainable part trains on them: what a perfect cache could at best do.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .runner import _NoProgress
from .variants import (
    FREEZERT,
    FULL,
    NAIVE,
    BenchError,
    TrainConfig,
    build_model,
    check_depth,
    naive_freeze,
    yolo_optimizer,
)

CACHED, FLOOR = "freezert+cache", "floor"
CACHE_VARIANTS = (FULL, NAIVE, FREEZERT, CACHED, FLOOR)
ENCODER_LAYERS = 12
# BERT-base shape on GPU; a narrow encoder on CPU.
ENCODER_SIZES = {
    "cpu": {"vocab_size": 1000, "d_model": 128, "nhead": 4, "dim_ff": 256},
    "cuda": {"vocab_size": 30522, "d_model": 768, "nhead": 12, "dim_ff": 3072},
}
_COUNTERS = ("lookups", "hits", "misses", "stores", "skipped", "evictions")


@dataclass(frozen=True)
class CacheConfig:
    """The cached variant's ``FeatureCache``: codec, tier, and keys by dataset index (``ids``) or content."""

    codec: str = "fp16"
    where: str = "auto"
    ids: bool = False


class YoloTask:
    """The built-in detector on uniform images with random per-level targets; the toy detection loss."""

    family = "yolo"

    def __init__(
        self, *, model: str, img: int, batch: int, dataset_size: int, freeze: int, device: torch.device, seed: int = 0
    ):
        from ..models import synthetic_images

        self.initial = build_model(model)
        check_depth(self.initial, freeze, model)
        det = self.initial.model[-1]
        strides = [int(s) for s in det.stride.tolist()]

        def data(n: int, g: torch.Generator):
            x = synthetic_images(n, img, g)
            t = [torch.rand(n, det.na, img // s, img // s, det.no, generator=g) for s in strides]
            return x.to(device), [ti.to(device) for ti in t]

        self.x, self.t = data(dataset_size, torch.Generator().manual_seed(seed))
        self.warm = data(batch, torch.Generator().manual_seed(seed + 1))  # not in the dataset
        self.describe = f"{model}, img {img}"

    def batch(self, s: slice):
        return self.x[s], [t[s] for t in self.t]

    def forward(self, module: nn.Module, b, ids=None):
        return module(b[0]) if ids is None else module(b[0], cache_ids=ids)

    def loss(self, out, b) -> torch.Tensor:
        from ..models import detection_loss

        return detection_loss(out, b[1])

    def naive(self, model: nn.Module, n: int) -> None:
        naive_freeze(model, n)

    def optimizer(self, model: nn.Module, params=None):
        return yolo_optimizer(model, params)

    def floor_features(self, fm, b) -> dict[int, torch.Tensor]:
        return {j: t.detach() for j, t in fm.segment.run(b[0]).items()}  # the driven path: {block: output}

    def floor_forward(self, fm, feats, b):
        return fm._tail.blocks_after(dict(feats))  # blocks_after adds the tail's saved outputs to the dict it is given


class EncoderTask:
    """``transformer_encoder(num_layers=12)`` on token batches (B, L) with padding masks; cross-entropy."""

    family = "encoder"

    def __init__(
        self, *, seq_len: int, batch: int, dataset_size: int, freeze: int, device: torch.device, seed: int = 0
    ):
        from ..models import transformer_encoder

        self.sizes = dict(ENCODER_SIZES[device.type])
        self.classes = 4
        self.initial = transformer_encoder(
            num_layers=ENCODER_LAYERS, num_classes=self.classes, max_len=max(512, seq_len), **self.sizes
        )
        if freeze >= ENCODER_LAYERS:
            raise BenchError(
                f"freeze {freeze} would freeze every layer of the encoder ({ENCODER_LAYERS}); "
                f"pass at most {ENCODER_LAYERS - 1}"
            )
        self.k = freeze
        vocab = self.sizes["vocab_size"]

        def data(n: int, g: torch.Generator):
            ids = torch.randint(1, vocab, (n, seq_len), generator=g)
            lengths = torch.randint(max(seq_len // 2, 1), seq_len + 1, (n,), generator=g)
            mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
            labels = torch.randint(0, self.classes, (n,), generator=g)
            return ids.mul(mask).to(device), mask.to(device), labels.to(device)  # padding is token 0

        self.data = data(dataset_size, torch.Generator().manual_seed(seed))
        self.warm = data(batch, torch.Generator().manual_seed(seed + 1))
        self.describe = (
            f"encoder ({ENCODER_LAYERS} layers, d_model {self.sizes['d_model']}, vocab {vocab}), L {seq_len}"
        )

    def batch(self, s: slice):
        return tuple(t[s] for t in self.data)

    def forward(self, module: nn.Module, b, ids=None):
        if ids is None:
            return module(b[0], attention_mask=b[1])
        return module(b[0], attention_mask=b[1], cache_ids=ids)

    def loss(self, out, b) -> torch.Tensor:
        return nn.functional.cross_entropy(out.float(), b[2])

    def naive(self, model: nn.Module, n: int) -> None:
        # the same set freezert freezes: the embeddings (its stem) and layers 0..n-1
        prefixes = ("embed.",) + tuple(f"layers.{i}." for i in range(n))
        for k, v in model.named_parameters():
            v.requires_grad = not k.startswith(prefixes)

    def optimizer(self, model: nn.Module, params=None):
        params = list(model.parameters()) if params is None else list(params)  # naive: frozen ones included
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def floor_features(self, fm, b) -> torch.Tensor:
        """The output of the last frozen layer, computed with the model's own modules."""
        model = fm.model
        keep = b[1].to(torch.bool)[:, None, None, :]
        x = model.embed(b[0])
        for layer in model.layers[: self.k]:
            x = layer(x, keep)
        return x.detach()

    def floor_forward(self, fm, feats, b):
        """Layers k.., norm, masked mean pooling and the head: the model's forward after the boundary."""
        model = fm.model
        keep = b[1].to(torch.bool)
        mask = keep[:, None, None, :]
        x = feats
        for layer in model.layers[self.k :]:
            x = layer(x, mask)
        x = model.norm(x)
        w = keep.to(x.dtype).unsqueeze(-1)
        return model.head((x * w).sum(1) / w.sum(1).clamp_min(1.0))


@dataclass
class EpochResult:
    """One cache-benchmark variant's epochs: per epoch its step times, epoch time and cache counter deltas."""

    name: str
    trainable: int
    epochs: list[dict] = field(default_factory=list)  # per epoch: step_ms, epoch_s, cache (counter deltas)
    peak_bytes: int | None = None  # CUDA: max allocated during the variant, less what was resident before
    loss: float | None = None
    setup_s: float | None = None  # floor: the one-off precompute of the boundary features

    @property
    def first_ms(self) -> float:
        return statistics.median(self.epochs[0]["step_ms"]) if self.epochs else float("nan")

    @property
    def rest_ms(self) -> float:
        steps = [t for e in self.epochs[1:] for t in e["step_ms"]]
        return statistics.median(steps) if steps else float("nan")

    @property
    def first_s(self) -> float:
        return self.epochs[0]["epoch_s"] if self.epochs else float("nan")

    @property
    def rest_s(self) -> float:
        rest = [e["epoch_s"] for e in self.epochs[1:]]
        return statistics.median(rest) if rest else float("nan")


class EpochVariant:
    """One variant of the cache benchmark: its model copy, optimizer and a timed training step."""

    def __init__(
        self,
        name: str,
        task,
        config: TrainConfig,
        device: torch.device,
        batches: list,
        cache: CacheConfig = CacheConfig(),
    ):
        from ..wrapper import wrap

        self.name, self.task, self.device = name, task, device
        self.cuda = device.type == "cuda"
        model = copy.deepcopy(task.initial).to(device).train()
        self.fm = None
        if name == FULL:
            for p in model.parameters():
                p.requires_grad_(True)
            self.module, self.opt = model, task.optimizer(model)
        elif name == NAIVE:
            task.naive(model, config.freeze)
            self.module, self.opt = model, task.optimizer(model)  # every parameter, as YOLOv5 does
        elif name in (FREEZERT, CACHED, FLOOR):
            fc = None
            if name == CACHED:
                from ..cache import FeatureCache

                fc = FeatureCache(codec=cache.codec, where=cache.where)
            self.fm = wrap(
                model,
                freeze=config.freeze,
                bn=config.bn,
                channels_last=config.channels_last or "auto",
                graphs=config.graphs,
                cache=fc,
            )
            self.module, self.opt = self.fm, task.optimizer(model, self.fm.trainable_parameters())
        else:
            raise BenchError(f"unknown variant {name!r}; choose from {', '.join(CACHE_VARIANTS)}")
        self.module.train()
        self.amp = bool(config.amp) and self.cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ids = name == CACHED and cache.ids
        self.n = len(task.batch(slice(None))[0])
        trainable = {id(p): p for p in self.module.parameters() if p.requires_grad}
        self.result = EpochResult(name, sum(p.numel() for p in trainable.values()))
        self.features: list = []
        if name == FLOOR:
            self._precompute(batches)

    def _precompute(self, batches: list) -> None:
        """The floor's boundary features for every batch, once, into device memory (timed as setup)."""
        with torch.no_grad():
            self.task.forward(self.fm, self.task.warm)  # builds the segment (and folds BN) on a warm-up batch
            self.sync()
            t0 = time.perf_counter()
            self.features = [self.task.floor_features(self.fm, b) for _, b in batches]
            self.sync()
        self.result.setup_s = time.perf_counter() - t0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _kernel_context(self, b):
        # The floor trains the tail with the same freezert.ops substitutions the wrapped variants get.
        plan = self.fm._tail.kernels_for([b[0]])
        if not plan:
            return contextlib.nullcontext()
        from ..ops.substitute import swapped

        return swapped(self.fm.model, plan)

    def _forward(self, i: int | None, s: slice | None, b):
        if self.name == FLOOR:
            if i is None:  # a warm-up batch: its features on the fly (untimed)
                with torch.no_grad():
                    feats = self.task.floor_features(self.fm, b)
            else:
                feats = self.features[i]
            with self._kernel_context(b):
                return self.task.floor_forward(self.fm, feats, b)
        ids = None
        if self.ids:
            ids = torch.arange(s.start, s.stop) if s is not None else torch.arange(self.n, self.n + len(b[0]))
        return self.task.forward(self.module, b, ids)

    def step(self, i: int | None, s: slice | None, b) -> float:
        """One optimizer step on batch ``i`` (slice ``s`` of the dataset; None: the warm-up batch), in ms."""
        self.sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.task.loss(self._forward(i, s, b), b)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        self.result.loss = float(loss.detach())
        return (time.perf_counter() - t0) * 1e3

    def counters(self) -> dict[str, int]:
        """The cache's counters now (lookups, hits, misses, ...); empty without a cache."""
        if self.fm is None or self.fm.cache is None:
            return {}
        st = self.fm.cache.stats()
        return {k: int(st.get(k, 0)) for k in _COUNTERS}


def epoch_batches(task, batch: int, dataset_size: int) -> list[tuple[slice, object]]:
    """The dataset as (slice, batch) pairs: one epoch, whole batches only."""
    return [(s, task.batch(s)) for s in (slice(i * batch, (i + 1) * batch) for i in range(dataset_size // batch))]


def run_epochs(
    task,
    batches: list,
    config: TrainConfig,
    cache: CacheConfig,
    device: torch.device,
    *,
    epochs: int,
    warmup: int,
    progress=None,
) -> tuple[dict[str, EpochResult], dict | None]:
    """Each of ``CACHE_VARIANTS`` in turn: ``warmup`` steps on other data, then ``epochs`` timed epochs.

    Returns the results and the cached variant's final ``cache.stats()``.
    """
    bar = progress or _NoProgress()
    cuda = device.type == "cuda"
    results: dict[str, EpochResult] = {}
    stats = None
    for name in CACHE_VARIANTS:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)  # the dataset and anything else already resident
            torch.cuda.reset_peak_memory_stats(device)
        v = EpochVariant(name, task, config, device, batches, cache)
        for _ in range(warmup):
            v.step(None, None, task.warm)
            bar.update()
        for _ in range(epochs):
            before = v.counters()
            v.sync()
            t0 = time.perf_counter()
            times = []
            for i, (s, b) in enumerate(batches):
                times.append(v.step(i, s, b))
                bar.update()
            v.sync()
            epoch_s = time.perf_counter() - t0
            after = v.counters()
            v.result.epochs.append(
                {"step_ms": times, "epoch_s": epoch_s, "cache": {k: after[k] - before.get(k, 0) for k in after}}
            )
        if cuda:
            torch.cuda.synchronize(device)
            v.result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        if name == CACHED:
            stats = v.fm.cache.stats()
        results[name] = v.result
        del v
    gc.collect()
    return results, stats


def cache_ratios(results: dict[str, EpochResult]) -> dict[str, float | None]:
    """Ratios of median steps (epochs 2+) and of epoch times between the variants; None where unmeasured."""

    def ratio(a, b):
        return None if a is None or b is None or not b or a != a or b != b else a / b

    c, floor, full, naive, unc = (results.get(n) for n in (CACHED, FLOOR, FULL, NAIVE, FREEZERT))
    get = lambda r, attr: getattr(r, attr) if r is not None else None  # noqa: E731
    # Median steps rather than epoch sums: every epoch has the same steps, and a median shrugs off the odd
    # preempted step on a shared machine. Epoch times are in the table and the JSON.
    return {
        "cached_vs_floor": ratio(get(c, "rest_ms"), get(floor, "rest_ms")),
        "full_vs_cached": ratio(get(full, "rest_ms"), get(c, "rest_ms")),
        "naive_vs_cached": ratio(get(naive, "rest_ms"), get(c, "rest_ms")),
        "uncached_vs_cached": ratio(get(unc, "rest_ms"), get(c, "rest_ms")),
        "fill_vs_uncached": ratio(get(c, "first_ms"), get(unc, "rest_ms")),
        "cached_epoch_vs_floor": ratio(get(c, "rest_s"), get(floor, "rest_s")),
        "full_epoch_vs_cached_epoch": ratio(get(full, "rest_s"), get(c, "rest_s")),
    }


_IO_FOR_CODEC = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}


def host_bandwidth(device: torch.device, codec: str = "fp16", mib: int = 512, reps: int = 10) -> dict:
    """Pinned-host->device copy bandwidth vs the native host-tier gather (``_native.gather_decode`` reading a
    pinned store from the GPU), in GB/s of bytes read; CUDA events, synchronised before reading them."""
    from .. import _native

    if device.type != "cuda":
        return {"skipped": "needs a GPU; this run is on the CPU"}
    info = _native.native_info()
    if not info.get("cuda_available"):
        return {
            "skipped": "the native CUDA kernels are not usable here: "
            f"{info.get('cuda_reason') or info.get('reason') or 'not compiled with CUDA'}"
        }
    with torch.cuda.device(device):
        return _host_bandwidth(device, codec, mib, reps)


def _host_bandwidth(device: torch.device, codec: str, mib: int, reps: int) -> dict:
    from .. import _native

    nbytes = mib * 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn) -> float:
        fn()  # warm-up (allocations, first-touch)
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    copy_s = timed(lambda: host.to(device, non_blocking=True))
    host = None  # free the pinned buffer before the store is allocated

    # The host tier's gather: a batch of whole rows picked at random from a pinned store of the codec's dtype.
    store_dtype = _native.CODECS[codec]
    esize = torch.empty((), dtype=store_dtype).element_size()
    dim = 128 * 1024  # elements per row (a boundary row of a mid-size model)
    rows = max(nbytes // (dim * esize), 2)
    batch = max(rows // 4, 1)
    store = torch.empty(rows, dim, dtype=store_dtype, pin_memory=True)
    store.view(torch.uint8).fill_(0x30)  # finite in every codec
    scales = torch.ones(rows, dtype=torch.float32, pin_memory=True) if codec == "fp8" else None
    index = torch.randperm(rows)[:batch].to(device)
    out = torch.empty(batch, dim, dtype=_IO_FOR_CODEC[codec], device=device)
    gather_s = timed(lambda: _native.gather_decode(store, scales, index, out, codec))
    read = batch * dim * esize + (batch * 4 if codec == "fp8" else 0)
    copy_gbs, gather_gbs = nbytes / copy_s / 1e9, read / gather_s / 1e9
    return {
        "copy_bytes": nbytes,
        "copy_GBps": copy_gbs,
        "gather_bytes_read": read,
        "gather_rows": batch,
        "gather_row_bytes": dim * esize,
        "gather_GBps": gather_gbs,
        "codec": codec,
        "ratio": gather_gbs / copy_gbs,
    }
