"""freezert: transfer learning with frozen layers, cheaper in memory and time, same function.

Every public name is imported on first use (PEP 562), so ``import freezert`` and ``freezert --help`` load neither
torch nor the cache, ops, bench, integrations, matplotlib or triton until something asks for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import CacheError, FreezeError, FreezeWarning, NativeError

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "native_info": "._native",
    "find_blocks": ".blocks",
    "FeatureCache": ".cache",
    "FreezeOut": ".schedule",
    "GradientNorm": ".schedule",
    "Linear": ".schedule",
    "Unfreeze": ".schedule",
    "apply_freeze": ".schedule",
    "freeze_layers": ".schedule",
    "freeze_layers_state_dict": ".schedule",
    "load_freeze_layers_state_dict": ".schedule",
    "FreezeConfig": ".config",
    "FrozenModel": ".wrapper",
    "inspect": ".wrapper",
    "wrap": ".wrapper",
}

__all__ = [
    "CacheError",
    "FreezeError",
    "FreezeWarning",
    "FeatureCache",
    "FreezeConfig",
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("_"):
        # A submodule (freezert.monitor, freezert.models, freezert.bench, ...): imported on first access, as an
        # eager package would have made it available.
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports is missing: say that, not "no attribute"
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import monitor
    from ._native import native_info
    from .blocks import find_blocks
    from .cache import FeatureCache
    from .config import FreezeConfig
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
