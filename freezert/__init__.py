"""freezert: transfer learning with frozen layers, cheaper in memory and time, same function."""

from __future__ import annotations

from . import monitor
from ._errors import CacheError, FreezeError, FreezeWarning, NativeError
from ._native import native_info
from .blocks import find_blocks
from .cache import FeatureCache
from .schedule import (
    FreezeOut,
    GradientNorm,
    Linear,
    Unfreeze,
    apply_freeze,
    freeze_layers,
    freeze_layers_state_dict,
    load_freeze_layers_state_dict,
)
from .wrapper import FrozenModel, inspect, wrap

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "FreezeError",
    "FreezeWarning",
    "FeatureCache",
    "FreezeOut",
    "FrozenModel",
    "GradientNorm",
    "Linear",
    "NativeError",
    "Unfreeze",
    "__version__",
    "apply_freeze",
    "find_blocks",
    "freeze_layers",
    "freeze_layers_state_dict",
    "load_freeze_layers_state_dict",
    "inspect",
    "monitor",
    "native_info",
    "wrap",
]
