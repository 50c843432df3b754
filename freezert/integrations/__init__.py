"""Thin adapters that put freezert into other trainers: Ultralytics, Lightning, Hugging Face, Composer.

Each submodule imports only its own ecosystem, so ``import freezert.integrations.composer`` works without
Lightning or transformers installed; a missing package raises an ``ImportError`` naming the extra to install.
See ``docs/INTEGRATIONS.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(package: str, extra: str, adapter: str) -> ModuleType:
    """Imports ``package`` or raises an ImportError that names the freezert extra providing it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"freezert.integrations.{adapter} needs the {package!r} package, which is not importable ({e}); "
            f"install it with: pip install 'freezert[{extra}]'"
        ) from e
