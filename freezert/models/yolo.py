"""A YOLOv5-style detector (v6.0 layer table with a Focus stem), built like YOLOv5's ``parse_model``.

Module names, attribute names (``conv``/``bn``/``act``), the ``.i``/``.f``/``.type``/``.np`` layer tags,
``save`` and the initialisation follow ultralytics/yolov5, so that code written against YOLOv5 checkpoints'
structure (``model.0.`` ... name prefixes, ``--freeze N``) behaves the same on this model.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "C3",
    "SPPF",
    "Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "Focus",
    "YOLOv5",
    "detection_loss",
    "detection_targets_like",
    "make_divisible",
    "parse_model",
    "synthetic_images",
    "yolov5",
    "yolov5_cfg",
]

ANCHORS = [
    [10, 13, 16, 30, 33, 23],  # P3/8
    [30, 61, 62, 45, 59, 119],  # P4/16
    [116, 90, 156, 198, 373, 326],  # P5/32
]

# size -> (depth_multiple, width_multiple), as in yolov5{n,s,m,l,x}.yaml
SIZES = {
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.0, 1.0),
    "x": (1.33, 1.25),
}


def autopad(k, p=None, d=1):
    """'same' padding for kernel ``k`` (int or list) and dilation ``d``."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def make_divisible(x, divisor=8):
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv5's channel rounding)."""
    return math.ceil(x / divisor) * divisor


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        # YOLOv5 shares one class-level SiLU; one per Conv keeps module ownership unambiguous.
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 Conv with an optional residual."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP bottleneck with 3 convolutions."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class Focus(nn.Module):
    """Space-to-depth (x(b,c,h,w) -> y(b,4c,h/2,w/2)) followed by a Conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools of size ``k``."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenates a list of tensors along ``dimension``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """YOLOv5 detection head: one 1x1 conv per level, ``na`` anchors each, ``no = nc + 5`` outputs."""

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        # Filled in by YOLOv5.__init__; a buffer so that .to()/.half() move it (YOLOv5 overrides _apply).
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        x = list(x)  # YOLOv5 rewrites its input list in place; a copy leaves the caller's list alone
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                g = self.grid[i]
                if g.shape[2:4] != x[i].shape[2:4] or g.device != x[i].device or g.dtype != x[i].dtype:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i, x[i].dtype)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx=20, ny=20, i=0, dtype=None):
        d = self.anchors[i].device
        t = dtype or self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        y, x = torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # offset so that xy = 2*sigmoid - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).to(t).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def yolov5_cfg(size: str = "s", nc: int = 80) -> dict:
    """The layer table (YOLOv5 v6.0 with a Focus stem) for ``size`` in n/s/m/l/x."""
    if size not in SIZES:
        raise ValueError(f"yolov5 size {size!r} is not one of {sorted(SIZES)}")
    gd, gw = SIZES[size]
    return {
        "nc": nc,
        "depth_multiple": gd,
        "width_multiple": gw,
        "anchors": deepcopy(ANCHORS),
        # [from, number, module, args]
        "backbone": [
            [-1, 1, Focus, [64, 3]],  # 0-P1/2
            [-1, 1, Conv, [128, 3, 2]],  # 1-P2/4
            [-1, 3, C3, [128]],
            [-1, 1, Conv, [256, 3, 2]],  # 3-P3/8
            [-1, 6, C3, [256]],
            [-1, 1, Conv, [512, 3, 2]],  # 5-P4/16
            [-1, 9, C3, [512]],
            [-1, 1, Conv, [1024, 3, 2]],  # 7-P5/32
            [-1, 3, C3, [1024]],
            [-1, 1, SPPF, [1024, 5]],  # 9
        ],
        "head": [
            [-1, 1, Conv, [512, 1, 1]],
            [-1, 1, nn.Upsample, [None, 2, "nearest"]],
            [[-1, 6], 1, Concat, [1]],  # cat backbone P4
            [-1, 3, C3, [512, False]],  # 13
            [-1, 1, Conv, [256, 1, 1]],
            [-1, 1, nn.Upsample, [None, 2, "nearest"]],
            [[-1, 4], 1, Concat, [1]],  # cat backbone P3
            [-1, 3, C3, [256, False]],  # 17 (P3/8-small)
            [-1, 1, Conv, [256, 3, 2]],
            [[-1, 14], 1, Concat, [1]],  # cat head P4
            [-1, 3, C3, [512, False]],  # 20 (P4/16-medium)
            [-1, 1, Conv, [512, 3, 2]],
            [[-1, 10], 1, Concat, [1]],  # cat head P5
            [-1, 3, C3, [1024, False]],  # 23 (P5/32-large)
            [[17, 20, 23], 1, Detect, ["nc", "anchors"]],  # Detect(P3, P4, P5)
        ],
    }


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Builds the layers of a YOLOv5 table ``d`` for input channels ``ch``; returns (layers, save)."""
    anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors}

    layers, save, c2 = [], [], ch[-1]
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        args = [names.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n  # depth gain
        if m in {Conv, Bottleneck, SPPF, Focus, C3}:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m is C3:
                args.insert(2, n)  # number of repeats
                n = 1
        elif m is nn.BatchNorm2d:
            args = [ch[f]]
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):  # number of anchors
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]

        m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        t = str(m)[8:-2].replace("__main__.", "")  # module type, as YOLOv5 records it
        m_.i, m_.f, m_.type, m_.np = i, f, t, sum(x.numel() for x in m_.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


class YOLOv5(nn.Module):
    """YOLOv5 detection model: ``self.model`` (layers tagged ``.i``/``.f``), ``self.save``, ``self.stride``."""

    def __init__(self, cfg: dict | str = "s", ch: int = 3, nc: int | None = None):
        super().__init__()
        if isinstance(cfg, str):
            cfg = yolov5_cfg(cfg, 80 if nc is None else nc)
        elif nc is not None:
            cfg = {**cfg, "nc": nc}
        self.yaml = cfg
        self.model, self.save = parse_model(deepcopy(cfg), ch=[ch])
        self.names = [str(i) for i in range(cfg["nc"])]

        m = self.model[-1]
        s = 64  # probe size (YOLOv5 uses 256; any multiple of the largest stride gives the same strides)
        with torch.no_grad():
            m.stride.copy_(torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))]))
        m.anchors /= m.stride.view(-1, 1, 1)  # anchors in grid units
        self._initialize_biases()
        _initialize_weights(self)

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    def forward(self, x):
        y = []  # outputs kept for later layers (None where nobody reads them)
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _initialize_biases(self, cf=None):
        """Objectness prior of ~8 objects per 640 image, class prior 0.6/nc (YOLOv5, arXiv 1708.02002 3.3)."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + m.nc] += math.log(0.6 / (m.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)


def _initialize_weights(model: nn.Module) -> None:
    # YOLOv5's initialize_weights, plus a reset of the running statistics that the stride probe
    # (a training-mode forward of zeros) disturbed.
    for m in model.modules():
        t = type(m)
        if t is nn.BatchNorm2d:
            m.reset_running_stats()
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


def yolov5(size: str = "s", nc: int = 80, ch: int = 3) -> YOLOv5:
    """A randomly initialised YOLOv5{n,s,m,l,x} (Focus stem) with ``nc`` classes and ``ch`` input channels."""
    return YOLOv5(size, ch=ch, nc=nc)


# --- synthetic data and a toy loss, for the demo, the benchmarks and the tests -------------------------


def synthetic_images(
    batch: int,
    img_size: int,
    generator: torch.Generator | None = None,
    *,
    ch: int = 3,
    device=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) images of shape (batch, ch, img_size, img_size)."""
    x = torch.rand(batch, ch, img_size, img_size, generator=generator)
    return x.to(device=device, dtype=dtype or torch.float32)


def _levels(preds):
    # eval mode returns (decoded, per-level raw); training mode the per-level list
    if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], (list, tuple)):
        return list(preds[1])
    return list(preds)


def detection_targets_like(preds, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Random targets in [0, 1) with the shapes of Detect's per-level outputs (training or eval form)."""
    return [torch.rand(p.shape, generator=generator).to(device=p.device, dtype=torch.float32) for p in _levels(preds)]


def detection_loss(preds, targets) -> torch.Tensor:
    """A toy differentiable loss: mean squared error of sigmoid(outputs) against targets, summed over levels."""
    levels = _levels(preds)
    if len(levels) != len(targets):
        raise ValueError(f"detection_loss: {len(levels)} prediction levels but {len(targets)} targets")
    return sum(F.mse_loss(p.float().sigmoid(), t.float()) for p, t in zip(levels, targets))
