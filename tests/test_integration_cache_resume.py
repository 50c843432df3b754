"""Trainer integrations keep their feature store beside the run's checkpoints and reopen it on resume: Lightning's
drop-ins and FreezertFinetuning (``<log_dir>/freezert_cache/<module>``, moved into a resumed fit's folder), the
Hugging Face callback (``<output_dir>/freezert_cache``); a store of another setup is refused. Ultralytics' is in
test_integration_ultralytics.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import freezert
from freezert import CacheError, Linear
from freezert.integrations.lightning import BackboneFinetuning, FreezertFinetuning

warnings.filterwarnings("ignore", module="lightning")
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu")


class Model(LightningModule):
    def __init__(self, seed: int = 3, blocks: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        if blocks:  # four blocks, for a schedule
            self.backbone = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)))
        else:
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)), batch_size=8)


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class Counts(Callback):
    """(epoch, lookups, hits, misses) of the wrapped backbone's cache at each epoch end."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        fm = pl_module.backbone
        if isinstance(fm, freezert.FrozenModel) and fm.cache is not None:
            st = fm.cache.stats()
            self.seen.append((trainer.current_epoch, st["lookups"], st["hits"], st["misses"]))


def _fit(root, callbacks, model, epochs=4, ckpt_path=None):
    Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=root, **QUIET).fit(model, ckpt_path=ckpt_path)


def test_lightning_backbone_store_lives_beside_the_checkpoints_and_moves_to_the_resumed_fit(tmp_path):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a" / "checkpoints", save_last=True)
    first = BackboneFinetuning(unfreeze_backbone_at_epoch=10, bn="frozen", cache="fp32")
    _fit(tmp_path / "a", [first, ckpt, StopAfter(1)], Model())
    store = tmp_path / "a" / "freezert_cache" / "backbone"
    assert (store / "header.json").exists() and (store / "index.pt").exists()
    saved = torch.load(ckpt.last_model_path, weights_only=False)["callbacks"]
    assert any(s.get("freezert", {}).get("stores") == {"backbone": str(store)} for s in saved.values())

    counts = Counts()
    second = BackboneFinetuning(unfreeze_backbone_at_epoch=10, bn="frozen", cache="fp32")
    _fit(tmp_path / "b", [second, counts], Model(seed=9), epochs=3, ckpt_path=ckpt.last_model_path)
    moved = tmp_path / "b" / "freezert_cache" / "backbone"
    assert (moved / "header.json").exists() and not store.exists()
    # epoch 2, the resumed one: step 0 shows the callback the backbone is called whole, steps 1-3 go through the
    # wrapper: all 24 rows served from the store the interrupted fit wrote (32 rows in its two epochs)
    assert counts.seen == [(2, 24, 24, 0)]

    # a fit of another backbone into that folder: the store is of another setup, refused as any store is
    seed_everything(0)
    third = BackboneFinetuning(unfreeze_backbone_at_epoch=10, bn="frozen", cache="fp32")
    with pytest.raises(CacheError, match="holds features of fingerprint"):
        _fit(tmp_path / "b", [third], Model(seed=11), epochs=1)


def test_freezert_finetuning_store_is_reopened_and_started_anew_when_the_schedule_moved(tmp_path):
    # Linear(0, 1) over 4 blocks and 8 epochs: block 0 frozen from epoch 3, blocks 0-1 from epoch 6
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a" / "checkpoints", save_last=True)
    model = Model(blocks=True)
    _fit(tmp_path / "a", [FreezertFinetuning(schedule=Linear(0.0, 1.0), cache="fp32"), ckpt, StopAfter(3)], model, 8)
    assert model.backbone.frozen_indices == [0]
    store = tmp_path / "a" / "freezert_cache" / "backbone"
    assert (store / "header.json").exists()
    model.backbone.cache.close()  # the interrupted process ends here

    counts = Counts()
    resumed = Model(seed=9, blocks=True)
    cb = FreezertFinetuning(schedule=Linear(0.0, 1.0), cache="fp32")
    _fit(tmp_path / "b", [cb, counts, StopAfter(4)], resumed, 8, ckpt_path=ckpt.last_model_path)
    assert (tmp_path / "b" / "freezert_cache" / "backbone" / "header.json").exists() and not store.exists()
    assert resumed.backbone.frozen_indices == [0]  # the same cut in epoch 4: every row served from the store
    assert counts.seen == [(4, 32, 32, 0)]
    resumed.backbone.cache.close()

    # the same checkpoint resumed into a fit of 5 epochs: the schedule freezes blocks 0-1 at once, so the store's
    # rows are of another cut; it starts anew instead of being refused
    counts = Counts()
    deeper = Model(seed=9, blocks=True)
    cb = FreezertFinetuning(schedule=Linear(0.0, 1.0), cache="fp32")
    _fit(tmp_path / "b", [cb, counts], deeper, 5, ckpt_path=ckpt.last_model_path)
    assert deeper.backbone.frozen_indices == [0, 1]
    assert counts.seen == [(4, 32, 0, 32)]


def test_hugging_face_store_under_output_dir_is_reopened_on_resume(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from freezert.integrations.transformers import FreezertCallback, feature_store

    from .test_integration_transformers import Data, tiny_bert

    def args(**kw):
        base = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            max_steps=8,
            learning_rate=1e-3,
            use_cpu=True,
            report_to=[],
            seed=0,
            save_strategy="steps",
            save_steps=4,
            disable_tqdm=True,
        )
        return transformers.TrainingArguments(**{**base, **kw})

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            control.should_training_stop = state.global_step == 4

    a = args()
    fm = freezert.wrap(tiny_bert(), freeze=2, cache=feature_store(a, "fp32"))
    transformers.Trainer(model=fm, args=a, train_dataset=Data(), callbacks=[FreezertCallback(), Stop()]).train()
    store = tmp_path / "out" / "freezert_cache"
    assert (store / "header.json").exists() and (tmp_path / "out" / "checkpoint-4").exists()
    assert fm.cache.stats()["misses"] == 32  # the first epoch (4 steps of 8) stored every sample
    fm.cache.close()  # the interrupted process ends here

    a = args()
    fm2 = freezert.wrap(tiny_bert(), freeze=2, cache=feature_store(a, "fp32"))
    trainer = transformers.Trainer(model=fm2, args=a, train_dataset=Data(), callbacks=[FreezertCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    st = fm2.cache.stats()
    # epoch 2 from the store: the first call records the plan (the prefix runs; its 8 rows were stored already, so
    # they count as neither hits nor misses), the other three steps are served
    assert trainer.state.global_step == 8 and st["hits"] == 24 and st["misses"] == 0
    fm2.cache.close()

    other = freezert.wrap(tiny_bert(), freeze=3, cache=feature_store(a, "fp32"))  # another frozen setup
    with pytest.raises(CacheError, match="holds features of fingerprint"):
        transformers.Trainer(model=other, args=args(max_steps=1), train_dataset=Data()).train()
