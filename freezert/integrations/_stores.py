"""The feature stores trainer integrations keep beside a run's checkpoints: one disk ``FeatureCache`` per frozen
module under ``<run folder>/freezert_cache``, and, on resume, the store a checkpoint names moved to the new run."""

from __future__ import annotations

import os
import shutil
from typing import Any

from ..cache import FeatureCache

__all__ = ["STORE_DIR", "adopt", "disk_store"]

#: The stores' folder inside a run's folder (beside Ultralytics' ``weights/``, Lightning's ``checkpoints/``, the
#: Hugging Face Trainer's ``checkpoint-N`` folders).
STORE_DIR = "freezert_cache"


def disk_store(spec: Any, folder: str | None) -> FeatureCache:
    """A disk store at ``folder`` (None: a temporary one) for ``cache=True`` (fp16) or a codec name; bounded by the
    drive, not by LRU."""
    return FeatureCache("fp16" if spec is True else spec, "disk", budget="1TiB", path=folder)


def adopt(saved: str | None, here: str) -> bool:
    """Moves the store ``saved`` (named by the checkpoint being resumed) to ``here``, unless ``here`` holds one
    already or ``saved`` is gone; True when it moved. The first bind opens it then, or refuses it (another setup)."""
    if not saved or not os.path.isdir(saved) or os.path.exists(here):
        return False
    if os.path.abspath(saved) == os.path.abspath(here):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(here)), exist_ok=True)
    shutil.move(saved, here)
    return True
