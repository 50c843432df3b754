"""The feature cache, by concern: ``codecs`` (the one codec table), ``tiers`` (budgets, memory slabs),
``disk`` (the store: header, index, records, lock), ``binding`` (fingerprint, layout, keys), ``stats`` and
``feature_cache`` (``FeatureCache``: bind, fetch/put, placement), ``extend`` and ``persist`` (save/load).
See docs/CACHE.md."""

from __future__ import annotations

from .binding import fingerprint_of, ids_to_keys
from .feature_cache import FeatureCache

__all__ = ["FeatureCache", "fingerprint_of", "ids_to_keys"]
