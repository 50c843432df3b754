"""freezert.integrations.lightning: Lightning's own finetuning-callback tests ported onto freezert's callback
(tests/tests_pytorch/callbacks/test_finetuning_callback.py), each difference a documented choice, and a
loss-for-loss comparison with Lightning's BackboneFinetuning."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.optim import SGD

pytest.importorskip("lightning")

from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

import freezert
from freezert import Linear
from freezert._errors import FreezeError
from freezert.integrations.lightning import BackboneFinetuning, FreezertFinetuning

warnings.filterwarnings("ignore", module="lightning")
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu")


def groups_of(opt):
    return [[id(p) for p in g["params"]] for g in opt.param_groups]


class TestBackboneFinetuningCallback(BackboneFinetuning):
    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        epoch = trainer.current_epoch
        if self.unfreeze_backbone_at_epoch <= epoch:
            optimizer = trainer.optimizers[0]
            current_lr = optimizer.param_groups[0]["lr"]
            backbone_lr = self.previous_backbone_lr
            if epoch < 6:
                assert backbone_lr <= current_lr
            else:
                assert backbone_lr == current_lr


def test_finetuning_callback(tmp_path):
    """Lightning's test_finetuning_callback, unchanged but for the callback's import."""
    seed_everything(42)

    class FinetuningBoringModel(BoringModel):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU())
            self.layer = torch.nn.Linear(32, 2)
            self.backbone.has_been_used = False

        def forward(self, x):
            self.backbone.has_been_used = True
            x = self.backbone(x)
            return self.layer(x)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.1)
            lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
            return [optimizer], [lr_scheduler]

        def train_dataloader(self):
            return DataLoader(RandomDataset(32, 64), batch_size=2)

    model = FinetuningBoringModel()
    callback = TestBackboneFinetuningCallback(unfreeze_backbone_at_epoch=3, verbose=False)
    trainer = Trainer(limit_train_batches=4, default_root_dir=tmp_path, callbacks=[callback], max_epochs=8, **QUIET)
    trainer.fit(model)
    assert model.backbone.has_been_used


class TestBackboneFinetuningWarningCallback(BackboneFinetuning):
    def finetune_function(self, pl_module, epoch: int, optimizer):
        if epoch == 0:
            self.unfreeze_and_add_param_group(
                pl_module.backbone, optimizer, 0.1, train_bn=self.train_bn, initial_denom_lr=self.initial_denom_lr
            )


def test_finetuning_callback_warning(tmp_path):
    """Lightning expects a "Did you init your optimizer" warning here: the optimizer was built over the frozen
    backbone too, so re-adding it duplicates. freezert takes frozen parameters out of the optimizer at fit start
    (deliberate: no momentum or weight decay on frozen weights), so the backbone returns in one group, no warning."""
    seed_everything(42)

    class FinetuningBoringModel(BoringModel):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(32, 2, bias=False)
            self.layer = None
            self.backbone.has_been_used = False

        def forward(self, x):
            self.backbone.has_been_used = True
            return self.backbone(x)

        def train_dataloader(self):
            return DataLoader(RandomDataset(32, 64), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    chk = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = FinetuningBoringModel()
    model.validation_step = None
    callback = TestBackboneFinetuningWarningCallback(unfreeze_backbone_at_epoch=3, verbose=False)
    trainer = Trainer(
        limit_train_batches=1, default_root_dir=tmp_path, callbacks=[callback, chk], max_epochs=2, **QUIET
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The provided params")
        trainer.fit(model)
    assert model.backbone.has_been_used
    assert groups_of(trainer.optimizers[0]) == [[], [id(model.backbone.weight)]]
    # Lightning resumes without the callback: its optimizer never grew a group. Here the checkpoint's optimizer
    # has the backbone's group, so the resumed fit needs the callback to lay the new optimizer out the same way.
    callback = TestBackboneFinetuningWarningCallback(unfreeze_backbone_at_epoch=3, verbose=False)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=3, callbacks=[callback], **QUIET)
    trainer.fit(model, ckpt_path=chk.last_model_path)


def test_freeze_unfreeze_function():
    """Lightning's test_freeze_unfreeze_function on the callback's methods. Difference (deliberate): a BatchNorm
    frozen with train_bn=False runs in eval mode (fixed statistics, like wrap's bn="frozen") where Lightning sets
    track_running_stats=False (batch statistics, never stored)."""
    seed_everything(42)

    class FreezeModel(LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))

    cb = FreezertFinetuning()
    model = FreezeModel()
    bn = model.backbone[1]
    cb.freeze(model, train_bn=True)
    assert not model.backbone[0].weight.requires_grad
    assert bn.weight.requires_grad and bn.track_running_stats and model.training == bn.training
    assert not model.backbone[3].weight.requires_grad

    cb.freeze(model, train_bn=False)
    assert not model.backbone[0].weight.requires_grad
    assert not bn.weight.requires_grad
    model.train()
    stats = bn.running_mean.clone()
    model.backbone(torch.randn(4, 32))
    assert not bn.training and torch.equal(bn.running_mean, stats)  # eval, not track_running_stats=False
    assert not model.backbone[3].weight.requires_grad

    cb.make_trainable(model)
    assert model.backbone[0].weight.requires_grad
    assert bn.weight.requires_grad and bn.training
    assert model.backbone[3].weight.requires_grad

    cb.freeze(model.backbone[0], train_bn=False)
    assert not model.backbone[0].weight.requires_grad

    cb.freeze(([(model.backbone[1]), [model.backbone[3]]]), train_bn=True)
    assert bn.weight.requires_grad and bn.track_running_stats
    assert not model.backbone[3].weight.requires_grad


def test_unfreeze_and_add_param_group_function():
    """Lightning's test, unchanged in substance: default lr = group 0's / initial_denom_lr, explicit lr as given,
    parameters already in the optimizer skipped with a warning."""
    seed_everything(42)

    class FreezeModel(LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(5)], nn.BatchNorm1d(32))

    cb = FreezertFinetuning()
    model = FreezeModel()
    optimizer = SGD(model.backbone[0].parameters(), lr=0.01)

    with pytest.warns(UserWarning, match="The provided params to be frozen already"):
        cb.unfreeze_and_add_param_group(model.backbone[0], optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.01

    model.backbone[1].weight.requires_grad = False
    cb.unfreeze_and_add_param_group(model.backbone[1], optimizer=optimizer)
    assert len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["lr"] == 0.001
    assert optimizer.param_groups[1]["params"][0] is model.backbone[1].weight
    assert model.backbone[1].weight.requires_grad

    with pytest.warns(UserWarning, match="The provided params to be frozen already"):
        cb.unfreeze_and_add_param_group(model, optimizer=optimizer, lr=100, train_bn=False)
    assert len(optimizer.param_groups) == 3
    assert optimizer.param_groups[2]["lr"] == 100
    assert optimizer.param_groups[2]["params"] == [model.backbone[i].weight for i in (2, 3, 4)]


class OnEpochLayerFinetuning(FreezertFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.layer)

    def finetune_function(self, pl_module, epoch, optimizer):
        self.unfreeze_and_add_param_group(pl_module.layer[epoch + 1], optimizer)


def test_base_finetuning_internal_optimizer_metadata(tmp_path):
    """Lightning's test; the per-group parameter names live in state_dict()["optimizers"] (freezert's layout).
    Difference (deliberate): group 0 is empty, because layer.0 is frozen (freeze(pl_module.layer)) and never
    thawed; Lightning keeps the frozen layer.0 in group 0, where it never trains."""
    seed_everything(42)

    class FreezeModel(BoringModel):
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(
                nn.Linear(32, 32, bias=False),
                nn.Linear(32, 32, bias=True),
                nn.Linear(32, 32, bias=False),
                nn.Linear(32, 32, bias=True),
                nn.Linear(32, 32, bias=False),
                nn.Linear(32, 2, bias=True),
            )

        def forward(self, x):
            return self.layer(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.layer[0].parameters(), lr=0.1)

    cb = OnEpochLayerFinetuning()
    chk = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = FreezeModel()
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=5, limit_train_batches=1, callbacks=[cb, chk], **QUIET)
    trainer.fit(model)
    groups = cb.state_dict()["optimizers"][0]["groups"]
    assert [g["params"] for g in groups] == [
        [],
        ["layer.1.weight", "layer.1.bias"],
        ["layer.2.weight"],
        ["layer.3.weight", "layer.3.bias"],
        ["layer.4.weight"],
        ["layer.5.weight", "layer.5.bias"],
    ]

    model = FreezeModel()
    cb = OnEpochLayerFinetuning()
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=10, callbacks=[cb], **QUIET)
    with pytest.raises(IndexError, match="index 6 is out of range"):
        trainer.fit(model, ckpt_path=chk.last_model_path)


class ConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


class ConvBlockParam(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.module_dict = nn.ModuleDict({"conv": nn.Conv2d(in_channels, out_channels, 3), "act": nn.ReLU()})
        self.parent_param = nn.Parameter(torch.zeros((1), dtype=torch.float))
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.module_dict["act"](self.module_dict["conv"](x)))


def test_complex_nested_model():
    """Lightning's test: parameters owned directly by a parent module freeze too. (Its flatten_modules and
    filter_params are Lightning's static helpers, not part of this callback: not ported.)"""
    model = nn.Sequential(
        OrderedDict(
            [("encoder", nn.Sequential(ConvBlockParam(3, 64), ConvBlock(64, 128))), ("decoder", ConvBlock(128, 10))]
        )
    )
    cb = FreezertFinetuning()
    cb.freeze(model.encoder, train_bn=True)
    assert not model.encoder[0].module_dict["conv"].weight.requires_grad
    assert not model.encoder[0].parent_param.requires_grad
    assert model.encoder[0].bn.weight.requires_grad
    cb.make_trainable(model)
    assert sum(p.requires_grad for p in model.encoder.parameters()) == 9


class TestCallbacksRestoreCallback(FreezertFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.layer[:3])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch >= 1:
            self.unfreeze_and_add_param_group(pl_module.layer[epoch - 1], optimizer)


class FinetuningBoringModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2))

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda x: x.requires_grad, self.parameters()), lr=0.1)


@pytest.mark.parametrize("same_callback", [False, True])
def test_callbacks_restore(tmp_path, same_callback):
    """Lightning's test (the callback's state is restored after the optimizers are created and before their
    state loads), plus the same callback object re-bound to the resumed fit's optimizer."""
    chk = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = FinetuningBoringModel()
    callback = TestCallbacksRestoreCallback()
    kw = dict(
        default_root_dir=tmp_path, limit_train_batches=1, limit_val_batches=1, callbacks=[callback, chk], max_epochs=2
    )
    trainer = Trainer(**kw, **QUIET)
    trainer.fit(model)
    layouts = callback.state_dict()["optimizers"]
    assert len(layouts) == 1 and len(layouts[0]["groups"]) == 2
    expected = {
        "lr": 0.1,
        "momentum": 0,
        "dampening": 0,
        "weight_decay": 0,
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": None,
    }
    assert layouts[0]["groups"][0] == {"params": ["layer.3.weight", "layer.3.bias"], "hparams": expected}
    assert layouts[0]["groups"][1] == {
        "params": ["layer.0.weight", "layer.0.bias"],
        "hparams": {**expected, "lr": 0.01},
    }
    assert callback.state_dict()["frozen"] == ["layer.1.bias", "layer.1.weight", "layer.2.bias", "layer.2.weight"]

    if not same_callback:
        callback = TestCallbacksRestoreCallback()
    kw.update(max_epochs=3, callbacks=[callback, chk])
    trainer = Trainer(**kw, **QUIET)
    trainer.fit(model, ckpt_path=chk.last_model_path)
    # resumed with the saved flags and groups, then epoch 2 thawed layer 1 into a third group
    assert [p.requires_grad for p in model.layer.parameters()] == [True, True, True, True, False, False, True, True]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[i] for i in g] for g in groups_of(trainer.optimizers[0])] == [
        ["layer.3.weight", "layer.3.bias"],
        ["layer.0.weight", "layer.0.bias"],
        ["layer.1.weight", "layer.1.bias"],
    ]


class BackboneBoringModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(32, 2)
        self.backbone = nn.Linear(32, 32)

    def forward(self, x):
        return self.layer(self.backbone(x))


def test_callbacks_restore_backbone(tmp_path):
    """Lightning's test: resume a BackboneFinetuning run past its unfreezing epoch with a new callback."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kw = dict(default_root_dir=tmp_path, limit_train_batches=1, limit_val_batches=1, **QUIET)
    trainer = Trainer(max_epochs=2, callbacks=[ckpt, BackboneFinetuning(unfreeze_backbone_at_epoch=1)], **kw)
    trainer.fit(BackboneBoringModel())
    model = BackboneBoringModel()
    trainer = Trainer(max_epochs=3, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)], **kw)
    trainer.fit(model, ckpt_path=ckpt.last_model_path)
    # Lightning leaves the resumed backbone with requires_grad=False inside its param group; freezert restores it
    assert model.backbone.weight.requires_grad and len(trainer.optimizers[0].param_groups) == 2


def test_missing_backbone_names_the_attribute(tmp_path):
    trainer = Trainer(max_epochs=1, limit_train_batches=1, callbacks=[BackboneFinetuning()], **QUIET)
    with pytest.raises(FreezeError, match="'backbone'"):
        trainer.fit(FinetuningBoringModel())


# ---------------------------------------------------------------------------------------------------------
# parity with Lightning's own BackboneFinetuning, loss for loss


class BNBackboneModel(LightningModule):
    def __init__(self, record):
        super().__init__()
        torch.manual_seed(3)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
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


@pytest.mark.parametrize("train_bn", [True, False])
def test_same_losses_and_weights_as_lightnings_backbone_finetuning(tmp_path, train_bn):
    runs = {}
    for name, cls in (("lightning", LightningBackboneFinetuning), ("freezert", BackboneFinetuning)):
        seed_everything(0)
        record = []
        model = BNBackboneModel(record)
        cb = cls(unfreeze_backbone_at_epoch=2, train_bn=train_bn, backbone_initial_ratio_lr=0.5)
        trainer = Trainer(max_epochs=5, callbacks=[cb], default_root_dir=tmp_path, **QUIET)
        trainer.fit(model)
        runs[name] = (record, model, trainer.optimizers[0])
    (la, ma, oa), (lb, mb, ob) = runs["lightning"], runs["freezert"]
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    for (n, a), b in zip(ma.named_parameters(), mb.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), n
    assert [g["lr"] for g in oa.param_groups] == pytest.approx([g["lr"] for g in ob.param_groups])


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


class NaiveLinear(FreezertFinetuning):
    """The reference: the same Linear schedule applied by requires_grad on the plain backbone."""

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


class StopAfter(__import__("lightning").pytorch.callbacks.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


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
