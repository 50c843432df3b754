"""Kernels for the trainable part: Triton fast paths with plain-torch references and fallbacks.

Each op runs its Triton kernels on CUDA (or on CPU through Triton's interpreter when
``TRITON_INTERPRET=1``) and its ``*_reference`` otherwise; ``impl="lean"`` (or ``"auto"`` off CUDA) runs
its plain-torch ``*_lean`` autograd Function instead; ``backend()`` says which path ran.
Importing this package never imports triton.
"""

from __future__ import annotations

from ._registry import backend, reset_backend
from .activation import activation, activation_reference
from .batch_norm_act import batch_norm_act, batch_norm_act_lean, batch_norm_act_reference
from .layer_norm import layer_norm, layer_norm_lean, layer_norm_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .recompute import mark_recomputable, recompute_saved
from .rms_norm import rms_norm_lean, rms_norm_reference
from .substitute import FusedConvBNAct, FusedLayerNorm, apply_substitutions, plan_substitutions, restore, swapped

__all__ = [
    "FusedConvBNAct",
    "FusedLayerNorm",
    "activation",
    "activation_reference",
    "apply_substitutions",
    "backend",
    "batch_norm_act",
    "batch_norm_act_lean",
    "batch_norm_act_reference",
    "layer_norm",
    "layer_norm_lean",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "mark_recomputable",
    "plan_substitutions",
    "recompute_saved",
    "reset_backend",
    "rms_norm_lean",
    "rms_norm_reference",
    "restore",
    "swapped",
]
