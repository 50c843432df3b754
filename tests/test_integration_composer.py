"""freezert.integrations.composer against Composer's documented Algorithm protocol (Composer itself cannot be
installed beside our torch: it pins an older one). The trainer below drives events as Composer's Engine does."""

from __future__ import annotations

import enum
import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from freezert._errors import FreezeError
from freezert.integrations.composer import LayerFreezing

from .test_schedule import composer_layers, composer_schedule


class Event(enum.StrEnum):  # composer.core.Event is a StringEnum with these values
    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"


@dataclass
class State:
    model: nn.Module
    optimizers: list
    max_epochs: int
    epoch: int = 0

    def get_elapsed_duration(self) -> float:
        return self.epoch / self.max_epochs


@dataclass
class Logger:
    metrics: list = field(default_factory=list)

    def log_metrics(self, m):
        self.metrics.append(dict(m))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))


def run(algo, model, opt, epochs, start=0, steps=3, fire_init=True, total=5):
    state, logger = State(model, [opt], total, start), Logger()
    events = ([Event.INIT] if fire_init else []) + [Event.FIT_START]
    for ev in events:
        if algo.match(ev, state):
            algo.apply(ev, state, logger)
    for epoch in range(start, epochs):
        for s in range(steps):
            g = torch.Generator().manual_seed(100 * epoch + s)
            x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state.epoch = epoch + 1
        assert algo.match(Event.EPOCH_END, state) and not algo.match(Event.BATCH_END, state)
        algo.apply(Event.EPOCH_END, state, logger)
    return logger


def test_layer_freezing_matches_composers_schedule_and_logs_its_metrics():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    log = run(LayerFreezing(freeze_start=0.2, freeze_level=0.9), model, opt, epochs=5)
    assert log.metrics[-1]["layer_freezing/layers_frozen"] > 0
    layers = composer_layers(model, [])
    for e, m in enumerate(log.metrics, start=1):
        pct = composer_schedule(e / 5, 0.2, 0.9)
        assert m == {
            "layer_freezing/layers_frozen": int(pct * (len(layers) - 1)),
            "layer_freezing/percentage_frozen": pct,
        }
    depth = log.metrics[-1]["layer_freezing/layers_frozen"]
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            assert p.requires_grad == (i >= depth)
            assert any(p is q for g in opt.param_groups for q in g["params"]) == (i >= depth)
            assert (p in opt.state) == (i >= depth)  # composer#1002: no stale state
    opt.state_dict()


@pytest.mark.parametrize("stop", [2, 3])
def test_resume_into_new_objects_continues_exactly(stop):
    ref_model = make_model()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    run(LayerFreezing(0.2, 1.0), ref_model, ref_opt, epochs=5)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = LayerFreezing(0.2, 1.0)
    run(algo, model, opt, epochs=stop)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict()}
    # Composer's resume: new model, optimizer and algorithm objects; INIT, then the checkpoint loads.
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    algo2 = LayerFreezing(0.2, 1.0)
    state = State(model2, [opt2], 5, stop)
    algo2.apply(Event.INIT, state, Logger())
    algo2.load_state_dict(ckpt["algo"])
    opt2.load_state_dict(ckpt["opt"])  # group sizes match: the frozen layers already left opt2
    run(algo2, model2, opt2, epochs=5, start=stop, fire_init=False)
    for a, b in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad


def test_state_loaded_before_binding_is_applied_at_fit_start():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = LayerFreezing(0.0, 1.0)
    run(algo, model, opt, epochs=2, total=2)
    state = algo.state_dict()
    model2, algo2 = make_model(), LayerFreezing(0.0, 1.0)
    algo2.load_state_dict(state)
    assert algo2.state_dict() == state
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    algo2.apply(Event.FIT_START, State(model2, [opt2], 2, 2), Logger())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in model2.parameters()]


def test_bad_arguments_name_the_value():
    with pytest.raises(FreezeError, match="freeze_start"):
        LayerFreezing(freeze_start=1.5)
    assert LayerFreezing().find_unused_parameters


# ---------------------------------------------------------------------------------------------------------
# side by side with Composer itself, where it imports (it pins an older torch: CI does not install it; these ran
# in a separate environment with mosaicml 0.32.1 installed without its torch pin, see docs/INTEGRATIONS.md)


def _composer():
    if importlib.util.find_spec("composer") is None:
        return None
    try:
        import composer.algorithms  # noqa: F401
    except Exception:  # a composer that does not import beside this torch
        return None
    return importlib.import_module("composer")


needs_composer = pytest.mark.skipif(_composer() is None, reason="composer (mosaicml) is not importable here")


def composer_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def composer_fit(algo, *, save_folder=None, load_path=None):
    """A real composer.Trainer on a tiny classifier for 6 epochs; returns per-step losses, per-epoch-end
    requires_grad flags, the model, and the flags right after the Trainer was built (after load_path)."""
    from composer import Callback, Trainer
    from composer.models import ComposerClassifier

    class Record(Callback):
        def __init__(self):
            self.losses, self.flags = [], []

        def after_loss(self, state, logger):
            self.losses.append(float(state.loss))

        def epoch_end(self, state, logger):
            self.flags.append([p.requires_grad for p in state.model.parameters()])

    torch.manual_seed(1)
    model = ComposerClassifier(composer_net(), num_classes=3)
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    rec = Record()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=model,
            train_dataloader=torch.utils.data.DataLoader(ds, batch_size=8),
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            max_duration="6ep",
            algorithms=[algo],
            callbacks=[rec],
            device="cpu",
            progress_bar=False,
            log_to_console=False,
            save_folder=save_folder,
            save_interval="1ep",
            load_path=load_path,
            seed=7,
        )
        first = [p.requires_grad for p in model.parameters()]
        trainer.fit()
    return rec, model, first


@needs_composer
def test_real_trainer_matches_composers_layer_freezing_and_saves_where_it_crashes(tmp_path):
    from composer.algorithms import LayerFreezing as ComposersLayerFreezing

    theirs, m_theirs, _ = composer_fit(ComposersLayerFreezing(0.2, 1.0))
    ours, m_ours, _ = composer_fit(LayerFreezing(0.2, 1.0), save_folder=str(tmp_path / "ours"))
    assert ours.losses == theirs.losses and len(ours.losses) == 24
    assert ours.flags == theirs.flags
    assert [sum(not f for f in flags) for flags in ours.flags] == [0, 0, 2, 2, 4, 6]  # 0, 0, 1, 1, 2, 3 layers
    for a, b in zip(m_theirs.parameters(), m_ours.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError):  # composer#1002: stale optimizer state of removed parameters breaks the save
        composer_fit(ComposersLayerFreezing(0.2, 1.0), save_folder=str(tmp_path / "theirs"))


@needs_composer
def test_real_trainer_resumes_through_load_path_exactly(tmp_path):
    ref, m_ref, _ = composer_fit(LayerFreezing(0.2, 1.0), save_folder=str(tmp_path))
    resumed, m_res, first = composer_fit(LayerFreezing(0.2, 1.0), load_path=str(tmp_path / "ep3-ba12-rank0.pt"))
    assert first == ref.flags[2]  # the saved frozen layers, before the first step of the resumed run
    assert resumed.losses == ref.losses[12:]
    for a, b in zip(m_ref.parameters(), m_res.parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad


@needs_composer
def test_functional_form_matches_composers_at_every_call_forward_seen_or_not():
    from composer.algorithms.layer_freezing import freeze_layers as composers_freeze_layers

    from freezert.schedule import freeze_layers

    def fresh():
        m = composer_net()
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    x = torch.randn(2, 4)
    for resumed_at in [0.3, 0.6, 0.9]:  # a fresh process: the first call comes before any forward
        (a, opt_a), (b, opt_b) = fresh(), fresh()
        for t in [resumed_at, resumed_at + 0.05, 1.0]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = freeze_layers(b, opt_b, t, freeze_start=0.2, freeze_level=1.0)
            assert got == composers_freeze_layers(a, opt_a, t, freeze_start=0.2, freeze_level=1.0)
            assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
            assert [len(g["params"]) for g in opt_a.param_groups] == [len(g["params"]) for g in opt_b.param_groups]
            a(x), b(x)  # from the second call on, freezert has seen a forward
