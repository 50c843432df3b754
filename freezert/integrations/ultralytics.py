"""Ultralytics: a callback that trains ``YOLO(...).train(...)`` with the frozen prefix run by freezert.

    from ultralytics import YOLO
    from freezert.integrations.ultralytics import FreezertCallback

    model = YOLO("yolov8n.yaml")
    FreezertCallback().register(model)            # freezes what train(freeze=...) names
    model.train(data="coco8.yaml", freeze=10)

At ``on_pretrain_routine_end`` (after Ultralytics froze its layers and built the optimizer and EMA) the
callback replaces ``trainer.model`` with a ``FrozenModel``; ``unwrap_model`` still finds the plain
``DetectionModel`` (EMA, ``save_model``, the criterion), validation runs on the EMA as always, and
``last.pt``/``best.pt`` hold the plain model. At ``on_train_end`` the plain model is put back.

``FreezertCallback(feature_cache="fp16")`` keeps the frozen prefix's outputs in a disk store beside the run's
checkpoints (``<save_dir>/freezert_cache``), reopened by ``train(resume=True)``; it needs augmentation a cache can
serve (flips: each variant is a row of its own) and starts when mosaic closes (``close_mosaic``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .._errors import FreezeError
from ..cache import FeatureCache
from ..schedule import Schedule
from ..wrapper import FrozenModel, wrap
from ._stores import STORE_DIR, disk_store

#: The frozen blocks' exact weights, beside the store in the run's ``save_dir`` (last.pt holds them in float16).
FROZEN_FILE = "freezert_frozen.pt"

__all__ = [
    "AUGMENTATION_ARGS",
    "FINITE_AUGMENTATION_ARGS",
    "FROZEN_FILE",
    "STORE_DIR",
    "FreezertCallback",
    "augmentation_in_use",
]

#: Augmentations that draw from a finite set of variants of an image (flipped or not, channels swapped or not): with
#: keys by content each variant is a row of its own, computed once and served from then on.
FINITE_AUGMENTATION_ARGS = ("fliplr", "flipud", "bgr")

#: Augmentations that mix images; Ultralytics turns them off for the last ``close_mosaic`` epochs.
_MIXING_ARGS = ("mosaic", "mixup", "cutmix", "copy_paste")

#: Training arguments that make the same image give a different input from epoch to epoch.
AUGMENTATION_ARGS = (
    "mosaic",
    "mixup",
    "cutmix",
    "copy_paste",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "shear",
    "perspective",
    "flipud",
    "fliplr",
    "bgr",
    "multi_scale",
)


def augmentation_in_use(args: Any) -> list[str]:
    """Names of the trainer's augmentation arguments that are on (``augmentations``: a custom Albumentations list)."""
    on = []
    for name in AUGMENTATION_ARGS:
        v = getattr(args, name, 0) or 0
        if isinstance(v, (tuple, list)):  # scale may be an explicit (min, max) range
            v = 0 if tuple(v) in ((1, 1), (1.0, 1.0)) else 1
        if float(v) > 0:
            on.append(name)
    if getattr(args, "augmentations", None):
        on.append("augmentations")
    return on


def _cache_start(args: Any, epochs: int) -> int:
    """The first epoch whose inputs a feature cache can serve: 0, or the first ``close_mosaic`` epoch when only
    mixing augmentations (mosaic, mixup, cutmix, copy_paste) stand in the way; refuses the rest, naming them."""
    on = [a for a in augmentation_in_use(args) if a not in FINITE_AUGMENTATION_ARGS]
    mixing = [a for a in on if a in _MIXING_ARGS]
    close = int(getattr(args, "close_mosaic", 0) or 0)
    other = [a for a in on if a not in _MIXING_ARGS or not close]
    if other:
        vals = ", ".join(f"{a}={getattr(args, a)}" for a in other)
        raise FreezeError(
            f"feature_cache= with augmentation on ({vals}): those inputs never repeat, so the cache would never hit; "
            "set them to 0 (flips may stay: fliplr, flipud, bgr), let mosaic/mixup stop for the last epochs with "
            "close_mosaic=N, pass allow_augmented_cache=True for a data set augmented once offline, or drop "
            "feature_cache="
        )
    return max(0, epochs - close) if mixing else 0


def _keep_frozen_weights(trainer: Any, names: list[str], model: nn.Module) -> None:
    """Writes the frozen blocks' exact (float32) state beside the store; on ``train(resume=True)`` copies it back into
    the model and its EMA, whose weights came from last.pt in float16: the resumed run then holds the frozen weights
    the rows were computed with, and the store is reopened, not refused (a no-op for float16 pretrained weights)."""
    save_dir = getattr(trainer, "save_dir", None)
    if save_dir is None:
        return
    path = os.path.join(save_dir, FROZEN_FILE)
    ema = getattr(getattr(trainer, "ema", None), "ema", None)
    targets = [model] + ([ema] if isinstance(ema, nn.Module) else [])
    if getattr(trainer, "resume", False):
        if os.path.exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for name, state in saved.items():
                    for m in targets:
                        for key, t in m.get_submodule(name).state_dict(keep_vars=True).items():
                            t.copy_(state[key])
        return
    state = {n: {k: v.detach().cpu().clone() for k, v in model.get_submodule(n).state_dict().items()} for n in names}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class _TrainerModel(nn.Module):
    """What ``trainer.model`` becomes: routes the image of Ultralytics' batch dict through the FrozenModel.

    The trainer calls ``model(batch)``; sending only ``batch["img"]`` through freezert lets it drive the YOLO
    block graph itself (and key a cache by image), then the plain model's own ``loss`` scores the predictions.
    """

    def __init__(self, fm: FrozenModel):
        super().__init__()
        self.frozen = fm

    @property
    def module(self) -> nn.Module:
        """The plain model, where Ultralytics' ``unwrap_model`` looks (EMA, criterion, checkpoints)."""
        return self.frozen.module

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):
            return self.frozen.module.loss(x, self.frozen(x["img"]))
        return self.frozen(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "frozen" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["frozen"], name)  # then on to the plain model

    def state_dict(self, *args, **kwargs):
        return self.frozen.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.frozen.load_state_dict(state_dict, strict=strict, assign=assign)


class FreezertCallback:
    """Runs an Ultralytics training with its frozen blocks as a freezert inference segment.

    ``freeze``: anything ``freezert.wrap`` accepts; ``None`` takes the trainer's own ``freeze=`` argument. A
    schedule (``freezert.Linear(0.5, 1.0)``, ``FreezeOut``, ``Unfreeze``) steps at every epoch start.
    ``feature_cache``: True or a codec name (a disk store at ``<save_dir>/freezert_cache``, reopened by
    ``train(resume=True)``), or a ``FeatureCache`` used as given. It needs augmentation the cache can serve: flips
    (``fliplr``, ``flipud``, ``bgr``) may stay; mosaic/mixup/cutmix/copy_paste defer it to the last
    ``close_mosaic`` epochs; the rest must be 0 (or ``allow_augmented_cache=True`` for a data set augmented once,
    offline). ``cache=`` is its old name (Ultralytics' own ``train(cache=...)`` caches images). Other keyword
    arguments (``bn``, ``dtype``, ``channels_last``, ``graphs``, ``kernels``) go to ``wrap``.
    """

    def __init__(
        self,
        freeze: Any = None,
        *,
        feature_cache: Any = None,
        allow_augmented_cache: bool = False,
        cache: Any = None,
        **wrap_kwargs,
    ):
        if cache is not None:
            if feature_cache is not None:
                raise FreezeError("pass feature_cache= only (cache= is its old name)")
            warnings.warn(
                "FreezertCallback(cache=...) is now feature_cache=... (train(cache=...) is Ultralytics' image cache); "
                "cache= will be removed",
                DeprecationWarning,
                stacklevel=2,
            )
            feature_cache = cache
        if not (feature_cache is None or isinstance(feature_cache, (bool, str, FeatureCache))):
            raise FreezeError(
                f"feature_cache={feature_cache!r} is not understood; pass True, a codec name ('fp16', 'progressive', "
                "...) or a freezert.FeatureCache"
            )
        self.freeze = freeze
        self.feature_cache = None if feature_cache is False else feature_cache
        self.allow_augmented_cache = allow_augmented_cache
        self.wrap_kwargs = wrap_kwargs
        self.frozen: FrozenModel | None = None
        self.store: FeatureCache | None = None  # the cache in use (made here for True or a codec name)
        self._made_store = False
        self._cache_from: int | None = None  # the epoch from which the cache runs (None: no cache)
        self._freeze: Any = None

    @property
    def cache(self) -> Any:
        """The old name of ``feature_cache``."""
        return self.feature_cache

    def register(self, target: Any) -> FreezertCallback:
        """Adds the callback to a ``YOLO`` model or a trainer (anything with ``add_callback``); returns self."""
        if not hasattr(target, "add_callback"):
            raise FreezeError(f"register() got a {type(target).__name__}; pass an ultralytics YOLO model or trainer")
        target.add_callback("on_pretrain_routine_end", self.on_pretrain_routine_end)
        target.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        target.add_callback("on_model_save", self.on_model_save)
        target.add_callback("on_train_end", self.on_train_end)
        return self

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """Wraps ``trainer.model`` (single process; compile off) once Ultralytics has set it up."""
        model = trainer.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise FreezeError(
                "the freezert callback got a DistributedDataParallel model; train on one device (device=0), "
                "Ultralytics' DDP subprocesses do not carry callbacks"
            )
        if getattr(trainer.args, "compile", False) or hasattr(model, "_orig_mod"):
            raise FreezeError("train(compile=True) is not supported with the freezert callback; pass compile=False")
        if isinstance(model, _TrainerModel):  # a second train() on the same trainer
            return
        freeze = self.freeze if self.freeze is not None else trainer.args.freeze
        if freeze is None:
            raise FreezeError(
                "nothing to freeze: pass train(freeze=N) or FreezertCallback(freeze=N), "
                "e.g. freeze=10 for a YOLO backbone"
            )
        if isinstance(freeze, Schedule) and getattr(trainer, "resume", False):
            raise FreezeError(
                "resuming a run whose frozen set follows a schedule is not supported by the Ultralytics callback "
                "(Ultralytics loads the optimizer state before any callback runs); start a new run, or use freeze=N"
            )
        self._freeze, self._cache_from = freeze, None
        if self.feature_cache is not None:
            epochs = int(getattr(trainer, "epochs", 0) or getattr(trainer.args, "epochs", 0) or 0)
            self._cache_from = 0 if self.allow_augmented_cache else _cache_start(trainer.args, epochs)
            if isinstance(freeze, Schedule) and self._cache_from > int(getattr(trainer, "start_epoch", 0) or 0):
                raise FreezeError(
                    "feature_cache= with a schedule needs the cache from the first epoch, but mosaic runs until "
                    f"epoch {self._cache_from}; pass mosaic=0 (and mixup=0, cutmix=0, copy_paste=0) or freeze=N"
                )
        start = int(getattr(trainer, "start_epoch", 0) or 0)
        self._wrap(trainer, model, cached=self._cache_from is not None and start >= self._cache_from)
        if self.frozen.schedule is not None:
            # Ultralytics' LambdaLR learns about groups added by unfreezing; its warmup reads their initial_lr.
            self.frozen.schedule.attach(optimizer=trainer.optimizer, lr_schedulers=trainer.scheduler)

    def _wrap(self, trainer: Any, model: nn.Module, cached: bool) -> None:
        first = self.frozen is None or self.frozen.module is not model
        self.frozen = wrap(
            model, freeze=self._freeze, cache=self._store_for(trainer) if cached else None, **self.wrap_kwargs
        )
        if first and self._persistent(trainer) and not isinstance(self._freeze, Schedule):
            # before any row is computed: a resumed run must hold the frozen weights its store's rows came from
            _keep_frozen_weights(trainer, [self.frozen.blocks[i][0] for i in self.frozen.frozen_indices], model)
        trainer.model = _TrainerModel(self.frozen)

    def _persistent(self, trainer: Any) -> bool:
        """Whether the cache's rows outlive the run (a store at a path): then a resume must find the same weights."""
        fc = self.feature_cache
        if isinstance(fc, FeatureCache):
            return fc.path is not None
        return fc is not None and getattr(trainer, "save_dir", None) is not None

    def _store_for(self, trainer: Any) -> FeatureCache:
        """The feature cache: the one given, or a disk store beside the run's checkpoints (made once)."""
        if isinstance(self.feature_cache, FeatureCache):
            self.store = self.feature_cache
        elif self.store is None:
            save_dir = getattr(trainer, "save_dir", None)  # beside weights/; train(resume=True) reuses the folder
            self.store = disk_store(self.feature_cache, None if save_dir is None else os.path.join(save_dir, STORE_DIR))
            self._made_store = True
        return self.store

    def on_train_epoch_start(self, trainer: Any) -> None:
        """Starts the cache at its first epoch (mosaic closed) and steps a schedule with progress ``epoch / epochs``."""
        fm = self.frozen
        if fm is None or fm._unwrapped:
            return
        if self._cache_from is not None and fm.cache is None and trainer.epoch >= self._cache_from:
            # mosaic closes this epoch: wrap again with the cache (same modules and parameters: the optimizer and the
            # EMA keep theirs)
            self._wrap(trainer, fm.unwrap(), cached=True)
            fm = self.frozen
        if fm.schedule is not None:
            fm.schedule.step(min(trainer.epoch / max(trainer.epochs, 1), 1.0))

    def on_model_save(self, trainer: Any) -> None:
        """Writes the store's index with each checkpoint, so a resumed run finds every row stored until then."""
        if self.store is not None and self.frozen is not None and self.frozen.cache is self.store:
            self.store.flush()

    def on_train_end(self, trainer: Any) -> None:
        """Puts the plain model back on the trainer with its own ``requires_grad`` flags and BatchNorm modes; closes
        the store the callback made (its index written)."""
        if isinstance(trainer.model, _TrainerModel) and self.frozen is not None:
            trainer.model = self.frozen.unwrap()
        if self._made_store and self.store is not None:
            self.store.close()
            self.store = None
