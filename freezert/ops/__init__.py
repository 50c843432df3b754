"""Kernels for the trainable part: Triton fast paths with plain-torch references and fallbacks.

Each op runs its Triton kernels on CUDA (or on CPU through Triton's interpreter when
``TRITON_INTERPRET=1``) and its ``*_reference`` otherwise; ``impl="lean"`` (or ``"auto"`` off CUDA) runs
its plain-torch ``*_lean`` autograd Function instead; ``backend()`` says which path ran.
``lean_plan(model, skip=...)`` + ``swapped(model, plan)`` run a model's trainable part lean and exact.
Importing this package never imports triton.
"""

from __future__ import annotations

from ._registry import backend, reset_backend
from .activation import activation, activation_, activation_reference, elementwise
from .batch_norm_act import batch_norm_act, batch_norm_act_reference
from .batch_norm_lean import batch_norm_act_lean, batch_norm_lean
from .dropout import dropout_lean
from .layer_norm import layer_norm, layer_norm_lean, layer_norm_reference
from .lean import lean_region
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .recompute import mark_recomputable, recompute_saved
from .rms_norm import rms_norm_lean, rms_norm_reference
from .substitute import (
    FusedConvBNAct,
    FusedLayerNorm,
    apply_substitutions,
    lean_plan,
    plan_substitutions,
    replay,
    restore,
    swapped,
)

__all__ = [
    "FusedConvBNAct",
    "FusedLayerNorm",
    "activation",
    "activation_",
    "activation_reference",
    "apply_substitutions",
    "backend",
    "batch_norm_act",
    "batch_norm_act_lean",
    "batch_norm_act_reference",
    "batch_norm_lean",
    "dropout_lean",
    "elementwise",
    "layer_norm",
    "layer_norm_lean",
    "layer_norm_reference",
    "lean_plan",
    "lean_region",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "mark_recomputable",
    "plan_substitutions",
    "recompute_saved",
    "replay",
    "reset_backend",
    "rms_norm_lean",
    "rms_norm_reference",
    "restore",
    "swapped",
]
