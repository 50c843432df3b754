"""The feature cache, by concern: ``options`` (the validated configuration), ``binding`` (fingerprint, codec
ladder, layouts, keys), ``tiers`` (budgets, memory slabs), ``records`` (the disk record and its slab), ``disk`` (the
store: shards, header, index file, lock; the disk tier), ``index`` (rows by layout and key, placement, LRU,
counters), ``rows`` (write / read-verify-decode), ``prefetch``, ``stats``, ``extend`` and ``persist``
(save/load), and ``feature_cache`` (``FeatureCache``, the facade). The codec table is ``freezert._codecs``.
See docs/CACHE.md."""

from __future__ import annotations

from .binding import Layout, fingerprint_of, ids_to_keys
from .feature_cache import FeatureCache

__all__ = ["FeatureCache", "Layout", "fingerprint_of", "ids_to_keys"]
