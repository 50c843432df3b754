"""Kernels for the trainable part: Triton fast paths with plain-torch references and fallbacks.

Each op runs its Triton kernels on CUDA (or on CPU through Triton's interpreter when
``TRITON_INTERPRET=1``) and its ``*_reference`` otherwise; ``backend()`` says which path ran.
Importing this package never imports triton.
"""

from __future__ import annotations

from ._registry import backend, reset_backend
from .batch_norm_act import batch_norm_act, batch_norm_act_reference
from .layer_norm import layer_norm, layer_norm_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .substitute import FusedConvBNAct, FusedLayerNorm, apply_substitutions, plan_substitutions, restore, swapped

__all__ = [
    "FusedConvBNAct",
    "FusedLayerNorm",
    "apply_substitutions",
    "backend",
    "batch_norm_act",
    "batch_norm_act_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "plan_substitutions",
    "reset_backend",
    "restore",
    "swapped",
]
