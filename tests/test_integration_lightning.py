"""freezert.integrations.lightning: the BaseFinetuning/BackboneFinetuning drop-ins run frozen modules as freezert's
segment and match Lightning's own callbacks (losses, weights, learning rates, BatchNorm statistics); resume is exact;
FreezertFinetuning drives a freezert schedule. Lightning's own tests, ported, are in test_lightning_finetuning_port.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

pytest.importorskip("lightning")

from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from lightning.pytorch.callbacks import BaseFinetuning as LightningBaseFinetuning
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import freezert
from freezert import Linear
from freezert._errors import FreezeError
from freezert.integrations.lightning import BackboneFinetuning, BaseFinetuning, FreezertFinetuning

warnings.filterwarnings("ignore", module="lightning")
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu")


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class _WeightUse(TorchFunctionMode):
    """Notes, for each ``F.linear`` call on ``weight`` (a forward of its layer), whether autograd was on."""

    def __init__(self, weight, out):
        super().__init__()
        self.weight, self.out = weight, out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear and any(a is self.weight for a in (*args, *kwargs.values())):
            self.out.append(torch.is_grad_enabled())
        return func(*args, **kwargs)


class GradModeSpy(Callback):
    """Records, for each training step, whether the backbone was a FrozenModel and, for each use of the first
    frozen layer's weight in the step, whether autograd was on (freezert's segment runs under no_grad)."""

    def __init__(self):
        self.grad_on, self.wrapped, self._mode = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        backbone = pl_module.backbone
        self.wrapped.append(isinstance(backbone, freezert.FrozenModel))
        first = (backbone.module if self.wrapped[-1] else backbone)[0]
        self._mode = _WeightUse(first.weight, self.grad_on)
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mode.__exit__(None, None, None)


class BNBackboneModel(LightningModule):
    """A backbone whose BatchNorm trains while the rest of it is frozen (Lightning's train_bn=True freeze), with
    dropout in the frozen blocks before it: the segment must draw the same random numbers."""

    def __init__(self, record, dropout=0.2):
        super().__init__()
        torch.manual_seed(3)
        self.backbone = nn.Sequential(
            nn.Linear(8, 16),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 2)
        self.record = record

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.record.append(loss.item())
        return loss

    def configure_optimizers(self):  # Lightning's idiom: only what trains now
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g))
        return DataLoader(ds, batch_size=8)


def fit(callback, model, tmp_path, epochs=5, spy=None, callbacks=(), ckpt_path=None):
    callbacks = [callback] + ([spy] if spy is not None else []) + list(callbacks)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------------------------------------------
# side by side with Lightning's own BackboneFinetuning


@pytest.mark.parametrize("train_bn", [True, False])
def test_same_training_as_lightnings_backbone_finetuning_with_the_segment_running(tmp_path, train_bn):
    runs = {}
    for name, cls in (("lightning", LightningBackboneFinetuning), ("freezert", BackboneFinetuning)):
        seed_everything(0)
        record, spy = [], GradModeSpy()
        model = BNBackboneModel(record)
        cb = cls(unfreeze_backbone_at_epoch=2, train_bn=train_bn, backbone_initial_ratio_lr=0.5)
        trainer = fit(cb, model, tmp_path, spy=spy)
        runs[name] = (record, model, trainer.optimizers[0], spy)
    (la, ma, oa, sa), (lb, mb, ob, sb) = runs["lightning"], runs["freezert"]
    assert la == lb and len(la) == 20  # loss for loss, bit for bit
    for (n, a), b in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(a, b), n  # weights and BatchNorm statistics
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
    # Lightning runs the frozen blocks with autograd on; freezert's segment runs them under no_grad, from the
    # end of the first step (which shows the callback the backbone is called whole) until the unfreeze epoch
    assert all(sa.grad_on) and not any(sa.wrapped)
    assert sb.wrapped == [False, True, True, True, True, True, True, True] + [False] * 12
    assert sb.grad_on == [True] + [False] * 7 + [True] * 12
    assert isinstance(mb.backbone, nn.Sequential)  # the plain module is back after the fit


class PlainBackboneModel(BNBackboneModel):
    def __init__(self, record):
        super().__init__(record)
        torch.manual_seed(5)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())


def test_the_cache_skips_the_frozen_backbone_and_keeps_lightnings_losses(tmp_path):
    ours = BackboneFinetuning(unfreeze_backbone_at_epoch=3, bn="frozen", cache="fp32")
    counts = []

    class CacheStats(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            fm = ours.segments.get("backbone")
            counts.append(None if fm is None else (fm.cache.stats()["lookups"], fm.cache.stats()["hits"]))

    runs = {}
    for name, cb in (("lightning", LightningBackboneFinetuning(unfreeze_backbone_at_epoch=3)), ("freezert", ours)):
        seed_everything(0)
        record = []
        model = PlainBackboneModel(record)
        fit(cb, model, tmp_path, callbacks=[CacheStats()] if cb is ours else [])
        runs[name] = (record, model)
    (la, ma), (lb, mb) = runs["lightning"], runs["freezert"]
    assert la == lb
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    # 32 samples, 8 a step. Epoch 0: step 0 runs plainly (it shows the callback the backbone is called whole),
    # steps 1-3 store their rows; epoch 1 hits those 24 and stores step 0's; epoch 2 never runs the backbone;
    # epochs 3 and 4 train it, plainly
    assert counts == [(24, 0), (56, 24), (88, 56), None, None]


def test_bn_frozen_holds_the_backbones_batchnorm_statistics_until_it_unfreezes(tmp_path):
    seed_everything(0)
    model = BNBackboneModel([], dropout=0.0)
    bn = model.backbone[4]
    before = bn.running_mean.clone()
    cb = BackboneFinetuning(unfreeze_backbone_at_epoch=2, bn="frozen")
    seen = []

    class Stats(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(torch.equal(bn.running_mean, before))

    fit(cb, model, tmp_path, epochs=3, callbacks=[Stats()])
    assert seen == [True, True, False]  # fixed while frozen (eval mode from the first step), moving after
    assert bn.training and bn.track_running_stats


def test_cache_needs_bn_frozen():
    with pytest.raises(FreezeError, match="bn='frozen'"):
        BackboneFinetuning(cache=True)
    with pytest.raises(FreezeError, match="unknown option"):
        BackboneFinetuning(chache=True)


# ---------------------------------------------------------------------------------------------------------
# BaseFinetuning subclasses: what self.freeze() froze runs as the segment


class FeatureModel(BNBackboneModel):
    def __init__(self, record, indexed=False):
        super().__init__(record, dropout=0.0)
        self.feature_extractor = self.backbone
        del self.backbone
        self.indexed = indexed

    def forward(self, x):
        if self.indexed:  # layer by layer: the extractor is never called as a whole
            for layer in self.feature_extractor:
                x = layer(x)
            return self.head(x)
        return self.head(self.feature_extractor(x))


class FeatureExtractorFreezeUnfreeze(BaseFinetuning):
    """Lightning's BaseFinetuning docstring example."""

    def __init__(self, unfreeze_at_epoch=10, static=False):
        super().__init__()
        self._unfreeze_at_epoch = unfreeze_at_epoch
        self.static = static

    def freeze_before_training(self, pl_module):
        if self.static:
            BaseFinetuning.freeze(pl_module.feature_extractor)  # Lightning's static call: nothing noted
        else:
            self.freeze(pl_module.feature_extractor)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == self._unfreeze_at_epoch:
            self.unfreeze_and_add_param_group(modules=pl_module.feature_extractor, optimizer=optimizer, train_bn=True)


@pytest.mark.parametrize("case", ["noted", "static", "indexed"])
def test_what_self_freeze_froze_runs_as_the_segment_when_called_whole(tmp_path, case):
    seed_everything(0)
    model = FeatureModel([], indexed=case == "indexed")
    cb = FeatureExtractorFreezeUnfreeze(unfreeze_at_epoch=1, static=case == "static")
    seen = []

    class Look(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sorted(cb.segments))

    fit(cb, model, tmp_path, epochs=2, callbacks=[Look()])
    if case == "noted":
        assert seen == [[]] + [["feature_extractor"]] * 3 + [[]] * 4
    else:
        assert seen == [[]] * 8
    if case == "indexed":
        assert cb.not_wrapped == {"feature_extractor": "the training step does not call it as a whole"}


class Stemmed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.blocks(self.stem(x)))


class StemmedModel(BNBackboneModel):
    def __init__(self, record):
        super().__init__(record, dropout=0.0)
        torch.manual_seed(6)
        self.backbone = Stemmed()


def freeze_all_but_the_stem(base):
    class FreezeAllButTheStem(base):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.backbone)
            self.make_trainable(pl_module.backbone.stem)

        def finetune_function(self, pl_module, epoch, optimizer):
            pass

    return FreezeAllButTheStem()


def test_a_module_whose_stem_trains_runs_plainly_and_trains_as_in_lightning(tmp_path):
    runs = {}
    for name, base in (("lightning", LightningBaseFinetuning), ("freezert", BaseFinetuning)):
        seed_everything(0)
        record = []
        cb = freeze_all_but_the_stem(base)
        model = StemmedModel(record)
        stem = model.backbone.stem.weight.detach().clone()
        fit(cb, model, tmp_path, epochs=2)
        runs[name] = (record, model, cb)
    (la, ma, _), (lb, mb, cb) = runs["lightning"], runs["freezert"]
    assert la == lb and not torch.equal(mb.backbone.stem.weight, stem)  # the stem trained, as in Lightning
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    # the blocks are frozen, but the record found the stem running before block 0: freezing block 0 would
    # freeze the stem with it, so the module is left to run as Lightning runs it
    assert cb.not_wrapped == {"backbone": "modules that run before its first block still train"}


def test_a_module_thawed_mid_epoch_leaves_the_segment_at_the_next_step(tmp_path):
    class ThawAtStep(Callback):  # user code thawing the backbone's first layer in the middle of epoch 0
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 2:
                bb = (
                    pl_module.backbone.module
                    if isinstance(pl_module.backbone, freezert.FrozenModel)
                    else pl_module.backbone
                )
                bb[0].weight.requires_grad_(True)

    runs = {}
    for name, cls in (("lightning", LightningBackboneFinetuning), ("freezert", BackboneFinetuning)):
        seed_everything(0)
        record, spy = [], GradModeSpy()
        model = BNBackboneModel(record)
        fit(cls(unfreeze_backbone_at_epoch=5), model, tmp_path, epochs=2, spy=spy, callbacks=[ThawAtStep()])
        runs[name] = (record, model, spy)
    (la, ma, _), (lb, mb, sb) = runs["lightning"], runs["freezert"]
    assert la == lb
    for a, b in zip(ma.state_dict().values(), mb.state_dict().values()):
        assert torch.equal(a, b)
    # the thaw comes after the callback's check at step 2 (callback order), so step 3 runs plainly again
    assert sb.wrapped == [False, True, True] + [False] * 5 and sb.grad_on == [True, False, False] + [True] * 5


def test_the_plain_module_is_back_after_an_exception(tmp_path):
    class Boom(BNBackboneModel):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom([])
    cb = BackboneFinetuning(unfreeze_backbone_at_epoch=5)
    with pytest.raises(RuntimeError, match="boom"):
        fit(cb, model, tmp_path, epochs=1)
    assert isinstance(model.backbone, nn.Sequential) and cb.segments == {}


# ---------------------------------------------------------------------------------------------------------
# checkpoints: plain keys, exact resume, Lightning's checkpoints


class ResumeModel(BNBackboneModel):
    def __init__(self, record, seed=3):
        super().__init__(record, dropout=0.0)  # Lightning does not checkpoint the RNG: no dropout in a resume
        torch.manual_seed(seed)
        for p in self.parameters():
            p.data.normal_(0, 0.3)


@pytest.mark.parametrize("stop", [0, 3])
@pytest.mark.parametrize("saved_by", ["freezert", "lightning"])
def test_resume_in_the_frozen_phase_or_after_the_unfreeze_is_exact(tmp_path, stop, saved_by):
    seed_everything(0)
    ref = ResumeModel([])
    fit(BackboneFinetuning(unfreeze_backbone_at_epoch=2), ref, tmp_path / "ref")
    seed_everything(0)
    model = ResumeModel([])
    first = (BackboneFinetuning if saved_by == "freezert" else LightningBackboneFinetuning)(
        unfreeze_backbone_at_epoch=2
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    fit(first, model, tmp_path / "a", callbacks=[ckpt, StopAfter(stop)])
    sd = torch.load(ckpt.last_model_path, weights_only=False)
    assert list(sd["state_dict"]) == list(ResumeModel([]).state_dict())  # plain keys, saved while wrapped
    resumed = ResumeModel([], seed=9)  # another init: everything must come from the checkpoint
    fit(BackboneFinetuning(unfreeze_backbone_at_epoch=2), resumed, tmp_path / "b", ckpt_path=ckpt.last_model_path)
    if saved_by == "lightning" and stop == 3:
        # Lightning's checkpoint does not hold the flags: its setup froze the backbone again and nothing thaws it
        assert not resumed.backbone[0].weight.requires_grad
        return
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert [p.requires_grad for p in ref.parameters()] == [p.requires_grad for p in resumed.parameters()]


def test_lightnings_own_callback_resumes_from_a_freezert_checkpoint(tmp_path):
    seed_everything(0)
    model = ResumeModel([])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    fit(BackboneFinetuning(unfreeze_backbone_at_epoch=2), model, tmp_path, epochs=5, callbacks=[ckpt, StopAfter(0)])
    resumed = ResumeModel([], seed=9)
    fit(LightningBackboneFinetuning(unfreeze_backbone_at_epoch=2), resumed, tmp_path, ckpt_path=ckpt.last_model_path)
    assert resumed.backbone[0].weight.requires_grad


def test_missing_backbone_names_the_attribute(tmp_path):
    class NoBackbone(BNBackboneModel):
        def __init__(self):
            super().__init__([])
            self.features = self.backbone
            del self.backbone

        def forward(self, x):
            return self.head(self.features(x))

    with pytest.raises(FreezeError, match="'backbone'"):
        fit(BackboneFinetuning(), NoBackbone(), tmp_path, epochs=1)


# ---------------------------------------------------------------------------------------------------------
# a freezert schedule over a wrapped backbone


class SeqBackboneModel(BNBackboneModel):
    def __init__(self, record):
        super().__init__(record)
        torch.manual_seed(4)
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
            nn.Linear(16, 16),
        )


class NaiveLinear(LightningBaseFinetuning):
    """The reference: the same Linear schedule applied by requires_grad on the plain backbone (Lightning's own)."""

    def freeze_before_training(self, pl_module):
        self.sched = Linear(0.2, 1.0)

    def finetune_function(self, pl_module, epoch, optimizer):
        depth = len(self.sched.frozen_blocks(epoch / 5, 4))
        for i, blk in enumerate(pl_module.backbone):
            if i < depth:
                self.freeze(blk)


def test_schedule_over_a_wrapped_backbone_matches_naive_freezing(tmp_path):
    runs = {}
    for name, cb in (("naive", NaiveLinear()), ("freezert", FreezertFinetuning(schedule=Linear(0.2, 1.0)))):
        seed_everything(0)
        record = []
        model = SeqBackboneModel(record)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        trainer = Trainer(max_epochs=5, callbacks=[cb, ckpt], default_root_dir=tmp_path, **QUIET)
        trainer.fit(model)
        runs[name] = (record, model)
    (la, ma), (lb, mb) = runs["naive"], runs["freezert"]
    assert isinstance(mb.backbone, freezert.FrozenModel) and mb.backbone.frozen_indices == [0, 1]
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # the Lightning checkpoint holds plain keys and loads into the plain model
    sd = torch.load(tmp_path / "freezert" / "last.ckpt", weights_only=False)["state_dict"]
    plain = SeqBackboneModel([])
    plain.load_state_dict(sd)
    mb.load_state_dict(sd)  # and back into the wrapped one


@pytest.mark.parametrize("same_callback", [False, True])
def test_schedule_resumes_mid_run_exactly(tmp_path, same_callback):
    seed_everything(0)
    ref = SeqBackboneModel([])
    Trainer(
        max_epochs=5, callbacks=[FreezertFinetuning(schedule=Linear(0.2, 1.0))], default_root_dir=tmp_path, **QUIET
    ).fit(ref)
    seed_everything(0)
    model = SeqBackboneModel([])
    cb = FreezertFinetuning(schedule=Linear(0.2, 1.0))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    Trainer(max_epochs=5, callbacks=[cb, ckpt, StopAfter(3)], default_root_dir=tmp_path, **QUIET).fit(model)
    assert model.backbone.frozen_indices == [0]  # stopped after epoch 3 (block 0 froze at its start)
    seed_everything(1)  # a different model init: everything must come from the checkpoint
    resumed = SeqBackboneModel([])
    cb2 = cb if same_callback else FreezertFinetuning(schedule=Linear(0.2, 1.0))
    Trainer(max_epochs=5, callbacks=[cb2], default_root_dir=tmp_path, **QUIET).fit(
        resumed, ckpt_path=ckpt.last_model_path
    )
    assert resumed.backbone.frozen_indices == ref.backbone.frozen_indices == [0, 1]
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) and a.requires_grad == b.requires_grad
