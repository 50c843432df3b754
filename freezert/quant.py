"""Weight-only int8 / fp8 (e4m3) storage for frozen Linear and Conv layers: one byte per weight plus scales.

``quantize_frozen_(module, "int8")`` replaces, inside ``module``, every ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` (and transformers' GPT-2 ``Conv1D``) by an inference module holding the quantized weight and
fp32 scales (symmetric: ``w ~= q * scale``): one per output channel, or with ``group_size=g`` one per ``g``
consecutive weights of an output channel's flattened (in, kh, kw) row (int8 error per weight shrinks with the
group's largest value; fp8 keeps its 3 mantissa bits whatever the scale). Call it on a private structural copy
(the frozen segment's), never on the user's model: the layers are swapped in their parents.

Forward: dequantize then ``F.linear`` / ``F.conv*`` (any device), or on CUDA for Linear with per-channel
scales, when the shapes allow, ``torch._int_mm`` (int8 x int8 -> int32, activations quantized per row on the
fly) and ``torch._scaled_mm`` (fp8 e4m3 with row-wise scales), with the dequantize path as the fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import FreezeError

__all__ = [
    "FORMATS",
    "QuantConv",
    "QuantLinear",
    "dequantize",
    "quantize_frozen_",
    "quantize_weight",
    "quantized_bytes",
]

FORMATS = ("int8", "fp8")
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FreezeError(f"weight format {fmt!r} is not supported; use one of {list(FORMATS)}")
    if fmt == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise FreezeError("weight format 'fp8' needs torch.float8_e4m3fn (torch >= 2.1); use 'int8'")
    return fmt


def _check_group(group_size: int | None) -> int | None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise FreezeError(f"group_size={group_size!r} is not a positive int; pass e.g. 32, or None for per-channel")
    return group_size


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` as (out, groups, g): each output channel's flattened row cut in ``g`` (one group: per-channel)."""
    rows = w.reshape(w.shape[0], -1)
    g = rows.shape[1] if group_size is None else min(group_size, rows.shape[1])
    pad = -rows.shape[1] % g
    if pad:  # the last group is short: zeros change no amax
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(w.shape[0], -1, g)


def quantize_weight(
    w: torch.Tensor, fmt: str = "int8", group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``w ~= q * scale``; q is int8 or float8_e4m3fn, w's shape. ``scale``: one per output
    channel (dim 0), shape (out,), or with ``group_size`` one per group of that many weights, shape (out, groups)."""
    _check_format(fmt)
    _check_group(group_size)
    w32 = w.detach().float()
    grouped = _groups(w32, group_size)
    amax = grouped.abs().amax(2)
    top = _INT8_MAX if fmt == "int8" else _FP8_MAX
    # an all-zero group gets scale 1 (q = 0 anyway) instead of a division by zero
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = grouped / scale.unsqueeze(2)
    if fmt == "int8":
        q = scaled.round().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        q = scaled.clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(w.shape[0], -1)[:, : w32[0].numel()].reshape(w.shape)
    return q.contiguous(), (scale.squeeze(1) if group_size is None else scale).contiguous()


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, group_size: int | None = None
) -> torch.Tensor:
    """``q * scale`` per output channel (``scale`` of shape (out,)) or per group (shape (out, groups), made with
    ``group_size``), in ``dtype``."""
    if scale.dim() == 1:
        w = q.to(torch.float32) * scale.view((-1,) + (1,) * (q.dim() - 1))
        return w.to(dtype)
    n = q[0].numel()
    if group_size is None:
        if n % scale.shape[1]:
            raise FreezeError(f"group_size=None with {scale.shape[1]} groups of a {n}-weight row; pass the group_size")
        group_size = n // scale.shape[1]
    grouped = _groups(q.to(torch.float32), group_size)
    w = (grouped * scale.unsqueeze(2)).reshape(q.shape[0], -1)[:, :n].reshape(q.shape)
    return w.to(dtype)


class _Quant(nn.Module):
    def _set(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int | None = None) -> None:
        q, scale = quantize_weight(weight, fmt, group_size)
        self.fmt, self.group_size = fmt, group_size
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) on the enclosing model (a segment's pre-cast) must not turn the fp8 weight or
        # the fp32 scales into fp16: they keep their dtypes and only follow device moves
        keep = {k: self._buffers[k] for k in ("qweight", "scale")}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype`` (a temporary; the module keeps only ``qweight`` and ``scale``)."""
        return dequantize(self.qweight, self.scale, dtype, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (in the bias's dtype, which follows the model's casts): for code that reads
        ``layer.weight`` (transformers' ViT reads the patch projection's dtype), not for the forward."""
        return self.weight_as(self.bias.dtype if self.bias is not None else torch.float32)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class QuantLinear(_Quant):
    """``F.linear`` with a weight stored as int8 / fp8 plus per-output-channel scales (inference only)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str = "int8",
        compute: str = "auto",
        group_size: int | None = None,
    ):
        super().__init__()
        if compute not in ("auto", "dequantize"):
            raise FreezeError(
                f"compute={compute!r} is not understood; use 'auto' (hardware matmul on CUDA "
                "where shapes allow) or 'dequantize'"
            )
        self.out_features, self.in_features = weight.shape
        self.compute = compute
        self._hw_failed = False
        self._set(weight, bias, fmt, group_size)

    @classmethod
    def from_module(
        cls, m: nn.Module, fmt: str = "int8", compute: str = "auto", group_size: int | None = None
    ) -> QuantLinear:
        if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers GPT-2: y = x @ W + b, W (in, out)
            return cls(m.weight.t(), m.bias, fmt, compute, group_size)
        return cls(m.weight, m.bias, fmt, compute, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.compute == "auto"
            and x.is_cuda
            and self.scale.dim() == 1  # the hardware matmuls take per-channel scales only
            and not self._hw_failed
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        ):
            y = self._hardware(x)
            if y is not None:
                return y
        return F.linear(x, self.weight_as(x.dtype), self._bias(x.dtype))

    def _hardware(self, x: torch.Tensor) -> torch.Tensor | None:
        x2 = x.reshape(-1, self.in_features)
        m, k, n = x2.shape[0], self.in_features, self.out_features
        try:
            if self.fmt == "int8":
                if not hasattr(torch, "_int_mm") or m <= 16 or k % 8 or n % 8:
                    return None
                # activations quantized per row (dynamic, symmetric) so both operands are int8
                xa = x2.float().abs().amax(1).clamp_min(1e-12) / _INT8_MAX
                xq = (x2.float() / xa[:, None]).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
                acc = torch._int_mm(xq, self.qweight.t())
                y = acc.float() * xa[:, None] * self.scale[None, :]
            else:
                if (
                    not hasattr(torch, "_scaled_mm")
                    or k % 16
                    or n % 16
                    or torch.cuda.get_device_capability(x.device) < (8, 9)
                ):
                    return None
                xa = (x2.float().abs().amax(1).clamp_min(1e-12) / _FP8_MAX)[:, None]
                xq = (x2.float() / xa).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
                out = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
                y = torch._scaled_mm(
                    xq,
                    self.qweight.t(),
                    scale_a=xa.contiguous(),
                    scale_b=self.scale[None, :].contiguous(),
                    out_dtype=out,
                )
                y = y.float()
        except (RuntimeError, NotImplementedError):  # an arch or build without the kernel: dequantize
            self._hw_failed = True
            return None
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, bias={self.bias is not None}"


class QuantConv(_Quant):
    """``F.conv1d`` / ``F.conv2d`` with a weight stored as int8 / fp8 plus per-output-channel scales."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, fmt: str = "int8", group_size: int | None = None):
        super().__init__()
        self.dim = 1 if isinstance(conv, nn.Conv1d) else 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._set(conv.weight, conv.bias, fmt, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dim == 1 else F.conv2d
        return conv(
            x, self.weight_as(x.dtype), self._bias(x.dtype), self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return f"{tuple(self.qweight.shape)}, fmt={self.fmt}, stride={self.stride}, padding={self.padding}"


def _quantizable(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    if type(m) in (nn.Conv1d, nn.Conv2d):
        # other padding modes pad in the module's own forward; a string padding ('same') is F.conv's too
        return m.padding_mode == "zeros"
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def quantize_frozen_(
    module: nn.Module,
    fmt: str = "int8",
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    compute: str = "auto",
    group_size: int | None = None,
    min_weights: int = 0,
) -> list[str]:
    """Replace the Linear / Conv1d / Conv2d layers below ``module`` by int8 / fp8 inference modules, in place.

    ``filter(name, layer)`` keeps a layer out when False; ``group_size``: one scale per that many weights of a
    row (None: per output channel); ``min_weights``: layers with fewer weights stay as they are (a CNN's first
    convolution and its narrow layers: few bytes, and the ones its output is most sensitive to). Returns the
    replaced dotted names. Use it only on a private structural copy: the parents' child slots are rewritten (the
    replaced layers are not edited).
    """
    _check_format(fmt)
    _check_group(group_size)
    done: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if _quantizable(child) and child.weight.numel() >= min_weights and (filter is None or filter(full, child)):
                rep = (
                    QuantConv(child, fmt, group_size)
                    if isinstance(child, (nn.Conv1d, nn.Conv2d))
                    else QuantLinear.from_module(child, fmt, compute, group_size)
                )
                for key, value in vars(child).items():  # plain attributes a parent may read (YOLO's .f / .i)
                    if not key.startswith("_") and key != "training" and key not in vars(rep):
                        setattr(rep, key, value)
                rep.train(child.training)
                m._modules[name] = rep
                done.append(full)
            else:
                visit(full, child)

    if _quantizable(module):
        raise FreezeError(
            f"quantize_frozen_ got a bare {type(module).__name__}; pass a module that contains it "
            "(its slot in the parent is what gets replaced)"
        )
    visit("", module)
    return done


def quantized_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the quantized weights, their scales, and every other parameter / buffer below ``module``."""
    out = {"weights": 0, "scales": 0, "other": 0}
    for m in module.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None:
                continue
            key = (
                "weights"
                if isinstance(m, _Quant) and name == "qweight"
                else "scales"
                if isinstance(m, _Quant) and name == "scale"
                else "other"
            )
            out[key] += t.numel() * t.element_size()
    return out
