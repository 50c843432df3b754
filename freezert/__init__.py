"""freezert: transfer learning with frozen layers, cheaper in memory and time, same function."""

from __future__ import annotations

from ._errors import CacheError, FreezeError, NativeError

__version__ = "0.1.0"

__all__ = ["CacheError", "FreezeError", "NativeError", "__version__"]
