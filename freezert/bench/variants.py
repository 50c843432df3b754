"""The three training variants compared by ``freezert demo``/``bench``, the example models and their data.

All variants start from one deep-copied initial model and see the same synthetic batches:

* ``full fine-tune``: every parameter trains;
* ``naive freeze``: YOLOv5's ``--freeze N`` (``requires_grad=False`` on ``model.0.`` .. ``model.{N-1}.``,
  every parameter still handed to the optimizer, frozen BatchNorm still in training mode);
* ``freezert``: ``freezert.wrap(model, freeze=N)``, optimizer over ``fm.trainable_parameters()``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._errors import FreezeError
from .catalog import FREEZERT, FULL, MODELS, NAIVE, VARIANTS
from .stats import quartiles


class BenchError(FreezeError):
    """A benchmark setting that cannot run (unknown model, a depth that freezes everything, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """How the variants train: blocks 0..freeze-1 frozen, freezert's options, float16 autocast on CUDA."""

    freeze: int = 10
    bn: str = "frozen"
    amp: bool = False
    graphs: bool = False
    channels_last: bool = False

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """The fields of an ``argparse.Namespace`` (or any object) that carry them."""
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})


def build_model(name: str) -> nn.Module:
    """A built-in example model by CLI name (``yolov5n``..``yolov5x``, ``cnn``, ``encoder``)."""
    from .. import models

    # The example models stand in for pretrained networks: BatchNorm statistics measured on synthetic images,
    # so frozen BatchNorm normalises as a trained backbone's would (fresh statistics would mis-scale it).
    g = torch.Generator().manual_seed(0)
    if name.startswith("yolov5") and len(name) == 7:
        return models.calibrate_batchnorm(models.yolov5(name[-1]), torch.rand(4, 3, 128, 128, generator=g))
    if name == "cnn":
        return models.calibrate_batchnorm(models.cnn_classifier(), torch.rand(4, 3, 64, 64, generator=g))
    if name == "encoder":
        return models.transformer_encoder()
    raise BenchError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def check_depth(model: nn.Module, freeze: int, name: str = "the model") -> None:
    """Refuses a YOLO-style depth that would freeze every block."""
    n = len(model.model)
    if freeze >= n:
        raise BenchError(
            f"freeze {freeze} would freeze every block of {name} ({n} blocks, 0..{n - 1}); pass at most {n - 1}"
        )


def synthetic_batches(model: nn.Module, n: int, batch: int, img: int, device: torch.device, seed: int = 0):
    """``n`` (images, targets) pairs with the shapes of the detector's per-level outputs."""
    from ..models import synthetic_images

    det = model.model[-1]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = synthetic_images(batch, img, g)
        t = [torch.rand(batch, det.na, img // int(s), img // int(s), det.no, generator=g) for s in det.stride.tolist()]
        out.append((x.to(device), [ti.to(device) for ti in t]))
    return out


def yolo_optimizer(model: nn.Module, params=None, lr: float = 0.01, momentum: float = 0.937, decay: float = 5e-4):
    """YOLOv5's ``smart_optimizer`` (SGD, nesterov; decay on conv/linear weights only), over ``params``.

    ``params=None`` hands every parameter to the optimizer, frozen ones included, as YOLOv5 does.
    """
    keep = None if params is None else {id(p) for p in params}
    groups: list[list[nn.Parameter]] = [[], [], []]  # decayed weights, norm weights, biases
    seen: set[int] = set()
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (keep is not None and id(p) not in keep):
                continue
            seen.add(id(p))
            if name == "bias":
                groups[2].append(p)
            elif name == "weight" and isinstance(module, norms):
                groups[1].append(p)
            else:
                groups[0].append(p)
    spec = [(groups[2], 0.0), (groups[0], decay), (groups[1], 0.0)]
    spec = [(g, d) for g, d in spec if g]
    if not spec:
        raise BenchError("nothing to optimize: every parameter is frozen; freeze fewer blocks")
    opt = torch.optim.SGD(spec[0][0], lr=lr, momentum=momentum, nesterov=True, weight_decay=spec[0][1])
    for g, d in spec[1:]:
        opt.add_param_group({"params": g, "weight_decay": d})
    return opt


def naive_freeze(model: nn.Module, n: int) -> nn.Module:
    """YOLOv5's ``--freeze N``: ``requires_grad=False`` on parameters named ``model.0.`` .. ``model.{N-1}.``."""
    prefixes = tuple(f"model.{x}." for x in range(n))
    for k, v in model.named_parameters():
        v.requires_grad = not k.startswith(prefixes)
    return model


@dataclass
class VariantResult:
    """One variant's numbers: every timed step, its memory, its last loss and what the monitors saw."""

    name: str
    trainable: int
    step_ms: list[float] = field(default_factory=list)  # every timed step
    peak_bytes: int | None = None  # CUDA: max allocated while it stepped, plus what it keeps resident
    train_bytes: int | None = None  # gradients + optimizer state + activations saved for backward, one step
    loss: float | None = None
    monitor: dict | None = None  # Monitors.data: what the memory and gradient monitors saw (plain data)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = quartiles(self.step_ms)
        return q3 - q1

    @property
    def memory_bytes(self) -> int | None:
        """The memory figure reported: CUDA peak where measured, else the training-memory count."""
        return self.peak_bytes if self.peak_bytes is not None else self.train_bytes


class Variant:
    """One training setup: model, optimizer, a timed step function and its bookkeeping."""

    def __init__(self, name: str, initial: nn.Module, config: TrainConfig, device: torch.device):
        from ..blocks import find_blocks
        from ..wrapper import wrap

        self.name = name
        model = copy.deepcopy(initial).to(device).train()
        if name == FULL:
            for p in model.parameters():
                p.requires_grad_(True)
            self.module, self.opt = model, yolo_optimizer(model)
            self.blocks = find_blocks(model)
        elif name == NAIVE:
            naive_freeze(model, config.freeze)
            self.module, self.opt = model, yolo_optimizer(model)  # all params, as YOLOv5
            self.blocks = find_blocks(model)
        elif name == FREEZERT:
            layout = config.channels_last or "auto"
            fm = wrap(model, freeze=config.freeze, bn=config.bn, channels_last=layout, graphs=config.graphs)
            self.module, self.opt = fm, yolo_optimizer(model, fm.trainable_parameters())
            self.blocks = fm.blocks
        else:
            raise BenchError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        self.mon = None  # a Monitors, attached around the steps the monitors should see
        self.module.train()
        self.device = device
        self.amp = bool(config.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        trainable = {id(p): p for p in self.module.parameters() if p.requires_grad}
        self.result = VariantResult(name, sum(p.numel() for p in trainable.values()))
        self.static_bytes = 0  # CUDA bytes this variant keeps between steps (weights, optimizer state, ...)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch) -> float:
        """One optimizer step; returns its wall time in ms (device synchronised)."""
        from ..models import detection_loss

        x, t = batch
        self._sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = detection_loss(self.module(x), t)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)  # unscales the gradients in place first: the monitor sees true norms
        self.scaler.update()
        untimed = 0.0
        if self.mon is not None:
            # The gradient norms are read before zero_grad, with the timer paused: their kernels and host sync
            # are subtracted from the step time.
            self._sync()
            t1 = time.perf_counter()
            self.mon.after_backward(skip_nonfinite=self.amp)
            untimed = time.perf_counter() - t1
        self.opt.zero_grad(set_to_none=True)  # grads do not stay resident between steps
        self._sync()
        ms = (time.perf_counter() - t0 - untimed) * 1e3
        self.result.loss = float(loss.detach())
        if self.mon is not None:
            self.mon.after_step()  # a memory sample, after the timer stopped
        return ms

    def count_train_bytes(self, batch) -> int:
        """One untimed step counting gradients, optimizer state and activations saved for backward (bytes).

        Weights are left out (the same model in every variant); storages are counted once, parameters never.
        """
        from ..memory import SavedMeter
        from ..models import detection_loss

        x, t = batch
        with SavedMeter(exclude=self.module.parameters()) as saved:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss = detection_loss(self.module(x), t)
        self.scaler.scale(loss).backward()
        grads = sum(p.grad.nbytes for p in self.module.parameters() if p.grad is not None)
        self.scaler.step(self.opt)  # creates the optimizer state a training step keeps
        self.scaler.update()
        state = {
            v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for s in self.opt.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        }
        self.opt.zero_grad(set_to_none=True)
        self.result.train_bytes = saved.total + grads + sum(state.values())
        return self.result.train_bytes
