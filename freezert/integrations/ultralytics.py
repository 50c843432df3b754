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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import FreezeError
from ..schedule import Schedule
from ..wrapper import FrozenModel, wrap

__all__ = ["AUGMENTATION_ARGS", "FreezertCallback", "augmentation_in_use"]

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
    """Names of the trainer's augmentation arguments that are on (a feature cache would never hit under them)."""
    on = []
    for name in AUGMENTATION_ARGS:
        v = getattr(args, name, 0) or 0
        if isinstance(v, (tuple, list)):  # scale may be an explicit (min, max) range
            v = 0 if tuple(v) in ((1, 1), (1.0, 1.0)) else 1
        if float(v) > 0:
            on.append(name)
    return on


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
    ``cache``: a feature cache (see ``freezert.wrap``); refused while augmentation is on (say ``mosaic=0``,
    ``fliplr=0``, ... or ``allow_augmented_cache=True`` for a dataset that is augmented once, offline).
    Other keyword arguments (``bn``, ``dtype``, ``channels_last``, ``graphs``, ``kernels``) go to ``wrap``.
    """

    def __init__(self, freeze: Any = None, *, cache: Any = None, allow_augmented_cache: bool = False, **wrap_kwargs):
        self.freeze = freeze
        self.cache = cache
        self.allow_augmented_cache = allow_augmented_cache
        self.wrap_kwargs = wrap_kwargs
        self.frozen: FrozenModel | None = None

    def register(self, target: Any) -> FreezertCallback:
        """Adds the callback to a ``YOLO`` model or a trainer (anything with ``add_callback``); returns self."""
        if not hasattr(target, "add_callback"):
            raise FreezeError(f"register() got a {type(target).__name__}; pass an ultralytics YOLO model or trainer")
        target.add_callback("on_pretrain_routine_end", self.on_pretrain_routine_end)
        target.add_callback("on_train_epoch_start", self.on_train_epoch_start)
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
        if self.cache is not None and not self.allow_augmented_cache:
            aug = augmentation_in_use(trainer.args)
            if aug:
                on = ", ".join(f"{a}={getattr(trainer.args, a)}" for a in aug)
                raise FreezeError(
                    f"cache={self.cache!r} with augmentation on ({on}): every epoch sees new inputs, so the cache "
                    "would never hit; set those to 0 (mosaic=0, fliplr=0, ...) or drop cache="
                )
        if isinstance(freeze, Schedule) and getattr(trainer, "resume", False):
            raise FreezeError(
                "resuming a run whose frozen set follows a schedule is not supported by the Ultralytics callback "
                "(Ultralytics loads the optimizer state before any callback runs); start a new run, or use freeze=N"
            )
        self.frozen = wrap(model, freeze=freeze, cache=self.cache, **self.wrap_kwargs)
        trainer.model = _TrainerModel(self.frozen)
        if self.frozen.schedule is not None:
            # Ultralytics' LambdaLR learns about groups added by unfreezing; its warmup reads their initial_lr.
            self.frozen.schedule.attach(optimizer=trainer.optimizer, lr_schedulers=trainer.scheduler)

    def on_train_epoch_start(self, trainer: Any) -> None:
        """Steps a schedule given as ``freeze=`` with progress ``epoch / epochs``."""
        fm = self.frozen
        if fm is not None and fm.schedule is not None and not fm._unwrapped:
            fm.schedule.step(min(trainer.epoch / max(trainer.epochs, 1), 1.0))

    def on_train_end(self, trainer: Any) -> None:
        """Puts the plain model back on the trainer with its own ``requires_grad`` flags and BatchNorm modes."""
        if isinstance(trainer.model, _TrainerModel) and self.frozen is not None:
            trainer.model = self.frozen.unwrap()
