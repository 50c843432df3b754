"""Hugging Face: train a ``freezert.wrap``-ped model with ``transformers.Trainer``; ``FreezertCallback`` steps
its schedule and checkpoints it.

    fm = freezert.wrap(model, freeze=4)                      # or freeze=freezert.Linear(0.5, 1.0)
    trainer = Trainer(model=fm, args=TrainingArguments(...), train_dataset=ds, eval_dataset=ev,
                      compute_metrics=metrics, callbacks=[FreezertCallback()])
    trainer.train(); trainer.evaluate()                      # eval_loss and metrics, as for the plain model
    trainer.save_model(out)                                  # config.json + weights, plain keys: from_pretrained

The wrapped model's class carries the model's ``forward`` signature and, for a ``PreTrainedModel``, is a subclass
of the model's class: the Trainer finds the label names, keeps the batch columns the model takes and drops the
rest itself (default ``TrainingArguments``), and ``trainer.save_model`` and its checkpoints write ``config.json``
through ``save_pretrained``, so they load with ``from_pretrained``. See docs/INTEGRATIONS.md for gradient
checkpointing and PEFT. ``cache=feature_store(args)`` keeps the frozen part's outputs in
``<output_dir>/freezert_cache``, its index written with each checkpoint: a run resumed in that output_dir is served
its rows.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import require

require("transformers", "hf", "transformers")

from transformers import TrainerCallback  # noqa: E402

from .._errors import FreezeError  # noqa: E402
from ..cache import FeatureCache  # noqa: E402

__all__ = ["STATE_FILE", "FreezertCallback", "feature_store"]

#: The schedule's state, written into each ``checkpoint-N`` folder the Trainer saves.
STATE_FILE = "freezert_schedule.pt"


def feature_store(args: Any, codec: str = "fp16"):
    """A disk ``FeatureCache`` at ``<args.output_dir>/freezert_cache`` for ``freezert.wrap(model, cache=...)``: with
    ``FreezertCallback`` its index is written with each checkpoint, and a run resumed in that output_dir reopens it
    (a store of another frozen setup is refused)."""
    from ._stores import STORE_DIR, disk_store

    return disk_store(codec, os.path.join(args.output_dir, STORE_DIR))


class FreezertCallback(TrainerCallback):
    """Binds a ``FrozenModel``'s schedule to the Trainer's optimizer and LR scheduler and steps it.

    Progress is ``global_step / max_steps``; ``GradientNorm`` reads gradients before each optimizer step. The
    schedule's state goes into every checkpoint folder; call ``load(checkpoint_dir)`` before
    ``trainer.train(resume_from_checkpoint=checkpoint_dir)`` so the Trainer builds its optimizer over the
    parameters that were trainable when it saved.
    """

    def __init__(self) -> None:
        self.model: Any = None
        self._pending: dict | None = None

    def _schedule(self, model: Any):
        sched = getattr(model, "schedule", None) if model is not None else None
        return sched if hasattr(sched, "step") and hasattr(sched, "attach") else None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.model = model
        sched = self._schedule(model)
        if sched is not None and optimizer is not None:
            # accelerate may wrap the scheduler (AcceleratedScheduler.scheduler); the LambdaLR inside needs to learn
            # about groups added by unfreezing
            sched.attach(optimizer=optimizer, lr_schedulers=getattr(lr_scheduler, "scheduler", lr_scheduler))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        sched = self._schedule(model or self.model)
        if sched is not None and sched.needs_grad_norms:
            sched.after_backward()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sched = self._schedule(model or self.model)
        if sched is not None and state.max_steps:
            sched.step(min(state.global_step / state.max_steps, 1.0))

    def on_save(self, args, state, control, model=None, **kwargs):
        cache = getattr(model or self.model, "cache", None)
        if isinstance(cache, FeatureCache):
            cache.flush()  # a disk store's index as of this checkpoint (feature_store)
        sched = self._schedule(model or self.model)
        if sched is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(sched.state_dict(), os.path.join(folder, STATE_FILE))

    def load(self, model: Any, checkpoint_dir: str) -> None:
        """Re-applies the frozen set saved in ``checkpoint_dir`` to ``model`` (a FrozenModel with a schedule)."""
        sched = self._schedule(model)
        if sched is None:
            raise FreezeError(
                f"load() got a {type(model).__name__} without a schedule; pass the FrozenModel made by "
                "freezert.wrap(model, freeze=<schedule>)"
            )
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            raise FreezeError(f"{path} does not exist; pass a checkpoint-N folder saved with FreezertCallback")
        sched._optimizers = []  # the layout waits for the resumed fit's optimizer (on_train_begin)
        sched.load_state_dict(torch.load(path, weights_only=False))
