"""Freezing schedules: decisions, optimizer surgery, applying a freeze, Composer's functional form, DDP rebuild.

A schedule only *decides* a frozen set of blocks from training progress (``decide.py``: ``Linear``, ``FreezeOut``,
``GradientNorm``, ``Unfreeze``; the ``Schedule`` base class in ``base.py`` binds and steps them); ``apply_freeze``
(``apply.py``) carries a decision out: it freezes the blocks (through ``set_freeze`` on a ``Freezable`` such as
``FrozenModel``, else by ``requires_grad``), and the optimizer surgery (``optim.py``) takes frozen parameters out of
the param groups, purges their state and gives thawed ones back as a new group. ``functional.py`` is Composer's
``freeze_layers``; ``ddp.py`` rebuilds a DistributedDataParallel wrapper after the frozen set changed.
"""

from __future__ import annotations

from .apply import Freezable, FreezeChange, apply_freeze
from .base import Schedule, check_fraction
from .ddp import rebuild_ddp
from .decide import FreezeOut, GradientNorm, Linear, Unfreeze, linear_fraction
from .functional import (
    freeze_layers,
    freeze_layers_state_dict,
    load_freeze_layers_state_dict,
    record_forward_order,
)

__all__ = [
    "FreezeChange",
    "FreezeOut",
    "Freezable",
    "GradientNorm",
    "Linear",
    "Schedule",
    "Unfreeze",
    "apply_freeze",
    "check_fraction",
    "freeze_layers",
    "freeze_layers_state_dict",
    "linear_fraction",
    "load_freeze_layers_state_dict",
    "rebuild_ddp",
    "record_forward_order",
]
