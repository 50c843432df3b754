"""freezert: transfer learning with frozen layers, cheaper in memory and time, same function."""

from __future__ import annotations

from ._errors import CacheError, FreezeError, NativeError
from .blocks import find_blocks
from .wrapper import FrozenModel, inspect, wrap

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "FreezeError",
    "FrozenModel",
    "NativeError",
    "__version__",
    "find_blocks",
    "inspect",
    "wrap",
]
