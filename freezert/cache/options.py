"""``CacheOptions``: a ``FeatureCache``'s configuration, validated once (codec or codec ladder, tiers, budgets, path,
policies), and the budgets each tier gets when the cache binds to a device."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .._errors import CacheError
from .._units import parse_bytes
from .binding import parse_codec
from .disk import check_dir_path
from .tiers import WHERE, available_ram

__all__ = ["CacheOptions"]


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """The arguments of ``FeatureCache(...)`` (see its docstring), checked; a CacheError names a bad one."""

    codec: str = "fp16"
    where: str = "auto"
    budget: Any = "20GiB"
    path: Any = None
    host_budget: Any = None
    disk_budget: Any = None
    evict: str = "lru"
    strict: bool = False
    readonly: bool = False
    epoch_rows: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        parse_codec(self.codec)
        if self.where not in WHERE:
            raise CacheError(f"where={self.where!r} is not a tier; use 'auto', 'cuda', 'host' or 'disk'")
        if self.evict not in ("lru", "none"):
            raise CacheError(f"evict={self.evict!r} is not a policy; use 'lru' (evict least-recently-used) or 'none'")
        for name, v, least, fix in (("epoch_rows", self.epoch_rows, 1, "len(dataset)"), ("rank", self.rank, 0, "")):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                raise CacheError(
                    f"{name}={v!r} is not {'a sample count' if least else 'a rank'}; pass "
                    f"{fix or 'an int >= 0 (the process rank)'} or None"
                )
        path = self.path
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise CacheError(f"path={path!r} is not a directory path; pass a str or os.PathLike, or None")
            if self.where not in ("auto", "disk"):
                raise CacheError(
                    f"path={os.fspath(path)!r} is only used by the disk tier, but where={self.where!r} has none; "
                    "use where='disk' or 'auto', or drop path="
                )
            object.__setattr__(self, "path", os.fspath(path))
            check_dir_path(self.path)
        if self.readonly and self.path is None:
            raise CacheError("readonly=True reads an existing disk store, but path= is None; pass path= of the store")
        object.__setattr__(self, "strict", bool(self.strict))
        object.__setattr__(self, "readonly", bool(self.readonly))
        self.budgets()  # every budget parses

    def budgets(self) -> dict[str, float | None]:
        """Bytes per tier of ``where`` (the host tier of "auto" None: resolved at bind)."""
        b = parse_bytes("budget", self.budget, error=CacheError)
        hb = None if self.host_budget is None else parse_bytes("host_budget", self.host_budget, error=CacheError)
        db = parse_bytes("disk_budget", self.disk_budget, allow_none=True, error=CacheError)
        return {
            "auto": {"device": b, "host": hb, "disk": db},
            "cuda": {"device": b},
            "host": {"host": b if hb is None else hb},
            "disk": {"disk": b if self.disk_budget is None else db},
        }[self.where]

    def tier_budgets(self, device: torch.device) -> dict[str, float]:
        """``budgets()`` for a model on ``device``: "auto"'s host tier gets 4x budget, at most half the free RAM
        (shared with the device tier when the model runs on the CPU)."""
        budgets = self.budgets()
        if "host" in budgets and budgets["host"] is None:
            half = available_ram() / 2
            if device.type == "cpu":  # the device tier is CPU memory too: share the half
                budgets["device"] = min(budgets["device"], half)
                half = max(0.0, half - budgets["device"])
            budgets["host"] = float(int(min(4 * budgets["device"], half)))
        return budgets

    def check_device(self, device: torch.device) -> None:
        if self.where == "cuda" and device.type != "cuda":
            raise CacheError(
                f"where='cuda' keeps rows in CUDA memory, but the model runs on {device}; "
                "use where='host', 'disk' or 'auto'"
            )
