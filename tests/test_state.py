"""The user's model is not edited beyond requires_grad and BN modes; state, copies and pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import freezert
from freezert.models import cnn_classifier, yolov5

from ._ref import assert_outputs_close, pretrained_like


@pytest.fixture()
def model():
    return pretrained_like(yolov5("n", nc=3))


def test_identity_keys_and_values_kept(model):
    tensors = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    values = {n: t.detach().clone() for n, t in tensors.items()}
    fm = freezert.wrap(model, freeze=10, dtype=torch.float16, channels_last=True)
    fm(torch.randn(2, 3, 64, 64))
    fm(torch.randn(2, 3, 64, 64))
    now = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert now.keys() == tensors.keys()
    for n, t in now.items():
        assert t is tensors[n], n
        assert t.dtype == values[n].dtype and t.is_contiguous(), n
        if "running" not in n and "num_batches" not in n:
            assert torch.equal(t, values[n]), n
    sd = fm.state_dict()
    assert list(sd.keys()) == list(model.state_dict().keys())
    plain = yolov5("n", nc=3)
    plain.load_state_dict(sd, strict=True)
    fm.eval()
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_outputs_close(plain(x)[0], model(x)[0], 1e-6)


def test_unwrap_restores_flags_and_modes(model):
    flags = [p.requires_grad for p in model.parameters()]
    model.model[3].conv.weight.requires_grad_(False)  # a user's own choice survives the round trip
    flags[[id(p) for p in model.parameters()].index(id(model.model[3].conv.weight))] = False
    fm = freezert.wrap(model, freeze=5)
    fm.train()
    assert not model.model[3].bn.training
    back = fm.unwrap()
    assert back is model
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(freezert.FreezeError, match="unwrapped"):
        fm(torch.randn(1, 3, 64, 64))


def test_load_state_dict_rebuilds_segment(model):
    fm = freezert.wrap(model, freeze=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fm(x)
        other = pretrained_like(yolov5("n", nc=3), seed=7)
        fm.load_state_dict(other.state_dict())
        fm(x)
        assert_outputs_close(fm(x), other.eval()(x), 1e-4)
        # an in-place edit of a frozen weight is noticed too (the folded copy must not go stale)
        model.model[0].conv.conv.weight.mul_(0.5)
        other.model[0].conv.conv.weight.mul_(0.5)
        assert_outputs_close(fm(x), other(x), 1e-4)


def test_deepcopy_and_pickle(model):
    fm = freezert.wrap(model, freeze=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fm(x)
        fm2 = copy.deepcopy(fm)
        buf = io.BytesIO()
        torch.save(fm, buf)
        buf.seek(0)
        fm3 = torch.load(buf, weights_only=False)
        fm4 = pickle.loads(pickle.dumps(fm))
        for other in (fm2, fm3, fm4):
            assert other.frozen_indices == fm.frozen_indices
            assert_outputs_close(other(x), expected, 1e-5)
            assert all(not p.requires_grad for p in other.frozen_parameters())
            assert other.model is not model
    # the copy trains independently
    assert fm2.trainable_parameters()[0] is not fm.trainable_parameters()[0]


def test_set_freeze_keeps_parameter_identity():
    model = pretrained_like(cnn_classifier(num_classes=3, width=16))
    fm = freezert.wrap(model, freeze=2)
    params = list(model.parameters())
    fm(torch.randn(2, 3, 32, 32))
    fm.set_freeze(4)
    assert fm.frozen_indices == [0, 1, 2, 3] and fm.segment is None
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
    fm.set_freeze(0)
    assert all(p.requires_grad for p in model.parameters())
    out = fm(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)


def test_to_rebuilds_on_new_dtype():
    model = pretrained_like(cnn_classifier(num_classes=3, width=16))
    ref = copy.deepcopy(model).double().eval()
    fm = freezert.wrap(model, freeze=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fm(x)
        fm.double()
        fm(x.double())
        assert_outputs_close(fm(x.double()), ref(x.double()), 1e-10)
    assert fm.segment.folded > 0


def test_a_nested_frozen_model_loads_the_plain_keys_its_parent_saved():
    class Parent(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(3, 2)

    src = yolov5("n", nc=3)
    parent = Parent(freezert.wrap(src, freeze=3))
    state = parent.state_dict()
    assert "backbone.model.0.conv.conv.weight" in state  # the plain YOLO key (its container is called model)
    other = Parent(freezert.wrap(yolov5("n", nc=3), freeze=3))
    other.load_state_dict(state)  # strict: every plain key lands where it belongs
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_the_wrapper_indexes_iterates_and_sets_attributes_as_the_model_does():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    model.has_been_used = False
    fm = freezert.wrap(model, freeze=2)
    assert len(fm) == 4 and fm[1] is model[1] and list(fm) == list(model) and bool(fm)
    fm.has_been_used = True  # an attribute the model has: set on the model (Lightning's tests read it there)
    assert model.has_been_used is True
    fm.note = "wrapper's own"  # one it has not: the wrapper's
    assert not hasattr(model, "note") and fm.note == "wrapper's own"
    fm.eval()
    assert not fm.training and not model.training
    fm.unwrap()
