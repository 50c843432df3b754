"""The feature cache, by concern: ``options`` (the validated configuration), ``binding`` (fingerprint, codec
ladder, layouts, keys), ``tiers`` (budgets, memory slabs), ``records`` (the disk record and its slab), ``disk`` (the
store: shards, header, index file, lock; the disk tier), ``index`` (rows by layout and key, placement, LRU,
counters), ``rows`` (write / read-verify-decode), ``prefetch``, ``stats``, ``extend`` and ``persist``
(save/load), ``feature_cache`` (``FeatureCache``, the facade), ``augment`` (augmentation a cache can serve) and
``loop`` (prefetching in a training loop). The codec table is ``freezert._codecs``.
See docs/CACHE.md."""

from __future__ import annotations

from .augment import FeatureFlip, FeatureShift, FiniteAugment
from .binding import Layout, fingerprint_of, ids_to_keys
from .feature_cache import FeatureCache
from .loop import prefetching

__all__ = [
    "FeatureCache",
    "FeatureFlip",
    "FeatureShift",
    "FiniteAugment",
    "Layout",
    "fingerprint_of",
    "ids_to_keys",
    "prefetching",
]
