"""Giving a randomly initialised example model the BatchNorm statistics a pretrained one would have."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, sample) -> nn.Module:
    """Sets every BatchNorm's running statistics to those of the activations ``model(sample)`` produces.

    A pretrained network's running statistics match what its layers see; a fresh one's (mean 0, var 1) do
    not, and frozen (eval-mode) BatchNorm would then mis-scale every activation after it. The example models
    stand in for pretrained networks, so the demo and benchmarks calibrate them once.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration pass
    model.train()
    model(*sample) if isinstance(sample, tuple) else model(sample)
    model.train(was_training)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model
