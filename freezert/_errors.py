"""Error types raised by freezert; every message names the offending value and the fix."""

from __future__ import annotations


class FreezeError(ValueError):
    """Invalid freezing request or configuration (a ``ValueError``)."""


class NativeError(FreezeError):
    """A tensor handed to the native extension has the wrong dtype, device, shape or layout."""


class CacheError(FreezeError):
    """The feature cache cannot serve a request (budget, shape, corrupted or foreign store)."""


class FreezeWarning(UserWarning):
    """freezert had to run part of the model differently from what was asked (e.g. frozen blocks eagerly)."""
