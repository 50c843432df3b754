"""Third-party models beside naive freezing: what the zoo tests (``tests/zoo``) and ``benchmarks/bench_zoo.py``
both need to compare freezert with ``requires_grad=False`` fairly."""

from __future__ import annotations

import torch
from torch import nn


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout, stochastic depth and drop-path off, whatever the package calls them."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif type(m).__name__ == "StochasticDepth":  # torchvision
            m.p = 0.0
        elif type(m).__name__ == "DropPath":  # timm
            m.drop_prob = 0.0
    return model


def naive_freeze(model: nn.Module, frozen: set[str], modes: dict[str, bool] | None = None) -> nn.Module:
    """``model`` frozen the naive way, in place: ``requires_grad=False`` on the parameters named in ``frozen``;
    every module all of whose parameters are frozen in eval mode (its BatchNorm uses running statistics, as
    in freezert's inference segment); the rest in the mode ``modes`` gives (module name -> training), if given."""
    if modes is not None:
        for n, m in model.named_modules():
            m.training = modes[n]
    ids = set()
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
            ids.add(id(p))
    for m in model.modules():
        ps = list(m.parameters())
        if ps and all(not p.requires_grad for p in ps) and any(id(p) in ids for p in ps):
            m.eval()
    return model


def naive_freeze_modules(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` in train mode, frozen the naive way by module: ``requires_grad=False`` on the named modules, their
    BatchNorms in eval mode (freezert's default ``bn="frozen"``)."""
    model.train()
    for name in names:
        block = model.get_submodule(name)
        block.requires_grad_(False)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list, dict, Hugging Face ModelOutput, dataclass), in order."""
    from .._tree import tensors

    return tensors(out)
