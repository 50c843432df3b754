"""Composer: ``LayerFreezing``, an Algorithm with Composer's protocol and arithmetic, checkpointable.

Composer pins an older torch and is not a dependency, so this module never needs it: the class follows
Composer's documented protocol (``match(event, state)``, ``apply(event, state, logger)``,
``state_dict``/``load_state_dict``) and, where ``composer`` *is* importable, also subclasses its ``Algorithm``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .._errors import FreezeError
from ..schedule import (
    check_fraction,
    freeze_layers,
    freeze_layers_state_dict,
    load_freeze_layers_state_dict,
    record_forward_order,
)

__all__ = ["LayerFreezing"]


def _algorithm_base() -> type:
    if importlib.util.find_spec("composer") is None:
        return object
    try:
        from composer.core import Algorithm  # type: ignore[import-not-found]
    except Exception:  # a composer that does not import beside this torch
        return object
    return Algorithm


def _event_name(event: Any) -> str:
    """Composer's ``Event`` is a string enum (``Event.EPOCH_END.value == "epoch_end"``); plain strings work too."""
    return str(getattr(event, "value", event)).lower()


class LayerFreezing(_algorithm_base()):  # type: ignore[misc]
    """Composer's ``LayerFreezing`` (linear schedule over leaf layers) with freezert's fixes.

    Same arithmetic and events as Composer's (``freeze_layers`` at ``Event.EPOCH_END``, freezing at the call);
    layers are ordered by forward use (recorded from ``Event.INIT``/``FIT_START``), frozen parameters' optimizer
    state is purged (composer#1002), and the freeze (order, depth, frozen layers) is in ``state_dict``, so a run
    resumed through ``load_path`` has the saved layers frozen before its first step and continues exactly.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0):
        self.freeze_start = check_fraction("freeze_start", freeze_start)
        self.freeze_level = check_fraction("freeze_level", freeze_level)
        self._model: Any = None
        self._optimizers: Any = None
        self._loaded: dict | None = None

    # Composer reads these properties off every algorithm.
    @property
    def find_unused_parameters(self) -> bool:
        """Frozen parameters get no gradient: DDP must not wait for them (as Composer's LayerFreezing says)."""
        return True

    @property
    def backwards_create_graph(self) -> bool:
        return False

    @staticmethod
    def required_on_load() -> bool:
        return False

    def match(self, event: Any, state: Any) -> bool:
        """Runs at ``Event.INIT`` and ``Event.FIT_START`` (bind, record forward order) and ``Event.EPOCH_END``."""
        return _event_name(event) in ("init", "fit_start", "epoch_end")

    def apply(self, event: Any, state: Any, logger: Any) -> None:
        """Binds to ``state.model`` at INIT/FIT_START; at EPOCH_END freezes per Composer's linear schedule."""
        name = _event_name(event)
        self._bind(state)
        if name != "epoch_end":
            return None
        elapsed = state.get_elapsed_duration()
        if elapsed is None:
            raise FreezeError(
                "state.get_elapsed_duration() is None at EPOCH_END; give the Trainer a max_duration (e.g. '10ep')"
            )
        depth, pct = freeze_layers(
            state.model,
            state.optimizers,
            float(elapsed),
            freeze_start=self.freeze_start,
            freeze_level=self.freeze_level,
        )
        metrics = {"layer_freezing/layers_frozen": depth, "layer_freezing/percentage_frozen": pct}
        if hasattr(logger, "log_metrics"):
            logger.log_metrics(metrics)
        elif hasattr(logger, "data_epoch"):  # Composer before 0.10
            logger.data_epoch(metrics)
        return None

    def _bind(self, state: Any) -> None:
        model = getattr(state, "model", None)
        if model is None:
            return
        self._model, self._optimizers = model, getattr(state, "optimizers", None)
        record_forward_order(model)
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            load_freeze_layers_state_dict(model, loaded, self._optimizers)

    def state_dict(self) -> dict[str, Any]:
        """The layer order and depth reached (by layer name), instead of Composer's empty dict and warning."""
        if self._model is None:
            return {"freeze_layers": self._loaded}
        return {"freeze_layers": freeze_layers_state_dict(self._model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the freeze into the bound model and optimizers (or at the next INIT/FIT_START if unbound)."""
        inner = state.get("freeze_layers") if isinstance(state, dict) else None
        if inner is None:
            return
        if self._model is None:
            self._loaded = inner
        else:
            load_freeze_layers_state_dict(self._model, inner, self._optimizers)

    def __repr__(self) -> str:
        return f"LayerFreezing(freeze_start={self.freeze_start}, freeze_level={self.freeze_level})"
