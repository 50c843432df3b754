"""``freeze=`` and the other options: what they select, and the message each bad value gets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import freezert
from freezert import FreezeError
from freezert.models import cnn_classifier, transformer_encoder, yolov5


@pytest.fixture(scope="module")
def yolo():
    return yolov5("n", nc=3)


def _err(model, **kw) -> str:
    with pytest.raises(FreezeError) as e:
        freezert.wrap(model, **kw)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_int_list_str_selections(yolo):
    assert freezert.wrap(yolo, freeze=0).frozen_indices == []
    assert freezert.wrap(yolo, freeze=None).frozen_indices == []
    assert freezert.wrap(yolo, freeze=[7]).frozen_indices == [7]  # a one-item list is that block, not a count
    assert freezert.wrap(yolo, freeze=["model.2", "model.0."]).frozen_indices == [0, 2]
    assert freezert.wrap(yolo, freeze="_orig_mod.model.12").frozen_indices == [12]
    assert freezert.wrap(yolo, freeze=0.4).frozen_indices == list(range(10))


def test_depth_past_the_end_names_what_exists(yolo):
    msg = _err(yolo, freeze=30)
    assert "freeze=30" in msg and "25 blocks" in msg and "model.0" in msg and "at most 24" in msg


def test_freezing_every_block_with_nothing_outside_is_refused_unless_named(yolo):
    # YOLO's blocks hold every parameter (Detect is block 24): freezing all of them trains nothing
    msg = _err(yolo, freeze=25)
    assert "every one of the 25 blocks" in msg and "at most 24" in msg and "freeze='all'" in msg
    assert "every one" in _err(yolo, freeze=1.0)
    assert "every one" in _err(yolo, freeze=list(range(25)))
    fm = freezert.wrap(yolo, freeze="all")  # a frozen feature extractor, asked for by name
    try:
        assert fm.frozen_indices == list(range(25)) and not fm.trainable_parameters()
    finally:
        fm.unwrap()


def test_a_linear_probe_freezes_every_block_while_the_head_trains():
    from freezert.models import cnn_classifier

    cnn = cnn_classifier(num_classes=3)
    table = freezert.find_blocks(cnn)
    fm = freezert.wrap(cnn, freeze=len(table))
    try:
        x = torch.randn(2, 3, 32, 32)
        fm(x)
        trainable = [n for n, p in cnn.named_parameters() if p.requires_grad]
        assert trainable and all(not n.startswith(tuple(name + "." for name, _ in table)) for n in trainable)
    finally:
        fm.unwrap()


@pytest.mark.parametrize(
    "freeze, words",
    [
        (-1, ["negative", "between 0 and 24"]),
        (1.5, ["not a fraction in (0, 1]"]),
        (0.0, ["not a fraction"]),
        (True, ["ambiguous"]),
        ([0, 40], ["index 40", "outside 0..24"]),
        ([0, "model.1"], ["mixes types"]),
        ({"a": 1}, ["not understood"]),
    ],
)
def test_bad_freeze_values(yolo, freeze, words):
    msg = _err(yolo, freeze=freeze)
    for w in words:
        assert w in msg, msg


def test_unknown_name_lists_blocks(yolo):
    msg = _err(yolo, freeze="backbone.3")
    assert "'backbone.3' matches no block" in msg and "25 blocks" in msg
    # a name inside a block: freezing is per whole block
    msg = _err(yolo, freeze="model.2.cv1")
    assert "inside block 'model.2'" in msg


def test_components_never_match_partially(yolo):
    assert freezert.wrap(yolo, freeze="model.1").frozen_indices == [1]  # not 10..19
    assert "matches no block" in _err(yolo, freeze="model.1x")


def test_stem_names_point_to_block_zero():
    enc = transformer_encoder(vocab_size=30, d_model=16, nhead=2, num_layers=3, dim_ff=16, num_classes=2, max_len=32)
    msg = _err(enc, freeze="embed")
    assert "stem" in msg and "layers.0" in msg


def test_bad_options(yolo):
    assert "bn='frozen'" in _err(yolo, freeze=3, bn="eval")
    assert "torch.float16" in _err(yolo, freeze=3, dtype=torch.int8)
    assert "bn='train'" in _err(yolo, freeze=3, dtype=torch.float16, bn="train")
    assert "True or False" in _err(yolo, freeze=3, graphs="yes")


def test_unknown_blocks_path_lists_containers(yolo):
    msg = _err(cnn_classifier(), freeze=2, blocks="encoder.layer")
    assert "blocks='encoder.layer'" in msg and "features" in msg


def test_too_few_blocks():
    msg = _err(nn.Linear(3, 3), freeze=0)
    assert "at least two blocks" in msg


def test_not_a_module():
    assert "torch.nn.Module" in _err(lambda x: x, freeze=1)


def test_double_wrap_refused(yolo):
    fm = freezert.wrap(yolo, freeze=2)
    assert "already a FrozenModel" in _err(fm, freeze=2)
    fm.unwrap()


def test_block_detection_and_stem():
    enc = transformer_encoder(vocab_size=30, d_model=16, nhead=2, num_layers=3, dim_ff=16, num_classes=2, max_len=32)
    t = freezert.blocks.block_table(enc)
    assert t.path == "layers" and t.stem == []  # the stem is what the record sees run before block 0
    fm = freezert.wrap(enc, freeze=1).plan(torch.randint(0, 30, (2, 5)))
    assert [n for n, _ in fm._plan.table.stem] == ["embed"]
    assert all(not p.requires_grad for p in enc.embed.parameters()) and enc.head.weight.requires_grad
    fm.unwrap()
    assert freezert.blocks.block_table(cnn_classifier()).path == "features"
    assert freezert.blocks.block_table(yolov5("n", nc=2)).kind == "yolo"
    explicit = freezert.find_blocks(yolov5("n", nc=2), blocks="model.2")  # a C3's children
    assert [n for n, _ in explicit] == ["model.2.cv1", "model.2.cv2", "model.2.cv3", "model.2.m"]


def test_inspect_table(yolo):
    text = freezert.inspect(yolo, freeze=10)
    assert "25 blocks at 'model' (yolo)" in text
    assert "cut: blocks 0..9 run as the inference segment; boundary: 4, 6, 9" in text
    rows = [ln for ln in text.splitlines() if ln.strip().startswith(("9 ", "10 "))]
    assert "frozen" in rows[0] and "train" in rows[1]
    assert "frozen (eager" in freezert.inspect(yolo, freeze=[0, 2])


def test_blocks_must_be_a_dotted_path(yolo):
    msg = _err(yolo, freeze=2, blocks=5)
    assert "blocks=5" in msg and "string" in msg


def test_ddp_and_data_parallel_are_refused_up_front():
    model = cnn_classifier(num_classes=3, width=8)
    msg = _err(nn.DataParallel(model), freeze=2)
    assert "DataParallel(freezert.wrap(model" in msg


def test_the_same_model_twice_is_refused_until_unwrapped():
    yolo = yolov5("n", nc=3)
    first = freezert.wrap(yolo, freeze=2)
    msg = _err(yolo, freeze=3)
    assert "already wrapped by a live FrozenModel" in msg and "unwrap()" in msg
    assert not any(p.requires_grad for p in yolo.model[0].parameters())  # the first wrap still holds
    first.unwrap()
    second = freezert.wrap(yolo, freeze=3)  # allowed once the first let go
    second.unwrap()
    assert all(p.requires_grad for p in yolo.parameters())


def test_a_predicate_that_matches_nothing_is_an_error_like_a_name(yolo):
    msg = _err(yolo, freeze=lambda name, m: name.startswith("nothing"))
    assert "predicate matches no block" in msg and "model.0" in msg


def test_also_freeze_names_parameters_outside_the_blocks():
    enc = transformer_encoder(vocab_size=30, d_model=16, nhead=2, num_layers=3, dim_ff=16, num_classes=2, max_len=32)
    fm = freezert.wrap(enc, freeze=1, also_freeze=["head.bias"])
    assert not enc.head.bias.requires_grad and enc.head.weight.requires_grad
    assert any(p is enc.head.bias for p in fm.frozen_parameters())
    fm.unwrap()
    assert enc.head.bias.requires_grad
    assert "matches no parameter" in _err(enc, freeze=1, also_freeze=["nope"])
