"""BatchNorm folding: the arithmetic as a pure function over weights, the module-level fold of a private copy,
and the scan that finds which convolution feeds which BatchNorm in one forward."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FoldScan", "after_fold", "fold_", "fuse_conv_bn_weights"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fuse_conv_bn_weights(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one convolution (eval-mode BatchNorm), computed in float64 and
    returned in ``w``'s dtype."""
    var, mean = var.double(), mean.double()
    gamma = gamma.double() if gamma is not None else torch.ones_like(var)
    beta = beta.double() if beta is not None else torch.zeros_like(var)
    b = b.double() if b is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + eps)
    fused_w = w.double() * scale.view(-1, *([1] * (w.dim() - 1)))
    return fused_w.to(w.dtype), ((b - mean) * scale + beta).to(w.dtype)


def fold_(conv: nn.Module, bn: _BatchNorm) -> None:
    """Folds eval-mode ``bn`` into ``conv`` in place: new weight and bias tensors on ``conv`` (a private copy: the
    user's tensors are never written)."""
    w, b = fuse_conv_bn_weights(
        conv.weight.detach(),
        None if conv.bias is None else conv.bias.detach(),
        bn.running_mean,
        bn.running_var,
        bn.eps,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
    )
    conv._parameters["weight"], conv._parameters["bias"] = w, b


def after_fold(bn: _BatchNorm) -> nn.Module | None:
    """What stands in for ``bn`` once it is folded: nothing for torch's own BatchNorms; for timm's
    ``BatchNormAct2d`` (normalise, then its ``drop`` and ``act``) those two; None (do not fold) for any other
    subclass whose forward does more than normalise."""
    if type(bn).forward in (nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward, _BatchNorm.forward):
        return nn.Identity()
    if type(bn).__name__.startswith("BatchNormAct") and isinstance(getattr(bn, "act", None), nn.Module):
        drop = getattr(bn, "drop", None)
        return nn.Sequential(*([drop] if isinstance(drop, nn.Module) else []), bn.act)
    return None


class FoldScan:
    """Watches one forward through ``targets``, recording each conv whose output object is exactly a
    BatchNorm's input: such pairs fold, also across targets (a ResNet stem's conv1 and bn1)."""

    def __init__(self, targets: list[nn.Module]):
        self.produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        self.calls: dict[int, int] = {}
        self.pairs: list[tuple[nn.Module, _BatchNorm]] = []
        self.handles = []
        for target in targets:
            for m in target.modules():
                self.handles.append(m.register_forward_pre_hook(self._count))
                if isinstance(m, CONVS):
                    self.handles.append(m.register_forward_hook(self._after_conv))
                elif isinstance(m, _BatchNorm):
                    self.handles.append(m.register_forward_pre_hook(self._before_bn))

    def _count(self, m, *_):
        self.calls[id(m)] = self.calls.get(id(m), 0) + 1

    def _after_conv(self, m, _inp, out):
        self.produced[id(out)] = (m, out)  # keeping ``out`` alive keeps its id unique

    def _before_bn(self, m, inp):
        hit = self.produced.get(id(inp[0])) if inp else None
        if hit is not None and hit[1] is inp[0]:
            self.pairs.append((hit[0], m))

    def close(self) -> list[tuple[nn.Module, _BatchNorm]]:
        """Removes the hooks; the pairs whose conv and BatchNorm each ran exactly once."""
        for h in self.handles:
            h.remove()
        self.produced.clear()
        return [(c, b) for c, b in self.pairs if self.calls.get(id(c)) == 1 and self.calls.get(id(b)) == 1]
