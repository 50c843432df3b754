"""The block tables of the models people fine-tune: which modules ``freeze=N`` counts, in what order, and what
``freeze=1``/``freeze=2`` freezes. Stock builders run on the meta device (no memory, no compute); the tables that
need a forward (the stem is what the record sees run before block 0) use tiny configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import freezert
from freezert import spec
from freezert.blocks import block_table


def meta(build):
    with torch.device("meta"):
        return build()


def names(model) -> list[str]:
    return [n for n, _ in freezert.find_blocks(model)]


def freezes(model, n: int) -> list[str]:
    """The modules ``freeze=n`` freezes from the table alone (the record adds the stem at the first call)."""
    t = block_table(model)
    return [name for i in spec.resolve(n, t) for name, _ in t.members[i]]


def candidates(model) -> list[str]:
    return [n for n, _ in block_table(model).candidates]


# -- torchvision classification: `features` are the blocks, `classifier` the head ----------------------------


@pytest.mark.parametrize(
    "builder,n_blocks",
    [("vgg11_bn", 29), ("alexnet", 13), ("densenet121", 12), ("mobilenet_v3_large", 17), ("efficientnet_b0", 9)],
)
def test_features_are_the_blocks_and_the_classifier_is_the_head(builder, n_blocks):
    """vgg11_bn's and alexnet's classifiers hold most of their parameters (84%, 96%): the largest container was
    the classifier, and freeze=1 froze most of the model."""
    tv = pytest.importorskip("torchvision")
    model = meta(getattr(tv.models, builder))
    got = names(model)
    assert len(got) == n_blocks and all(n.startswith("features.") for n in got)
    assert "classifier" in candidates(model)
    first = got[0]
    assert freezes(model, 1) == [first] and freezes(model, 2) == got[:2]


def test_vgg11_bn_freeze1_freezes_the_first_convolution_only():
    tv = pytest.importorskip("torchvision")
    model = meta(tv.models.vgg11_bn)
    t = block_table(model)
    frozen = sum(p.numel() for i in spec.resolve(1, t) for p in t.modules[i].parameters())
    assert frozen == 3 * 64 * 9 + 64  # features.0: Conv2d(3, 64, 3)


def test_resnets_keep_stem_and_four_stages():
    tv = pytest.importorskip("torchvision")
    for build in (tv.models.resnet50, tv.models.resnet18):
        model = meta(build)
        assert names(model) == ["stem", "layer1", "layer2", "layer3", "layer4"]
        assert freezes(model, 1) == ["conv1", "bn1", "relu", "maxpool"]
        assert freezes(model, 2) == ["conv1", "bn1", "relu", "maxpool", "layer1"]
        assert candidates(model) == ["avgpool", "fc"]


def test_other_torchvision_classifiers_keep_their_tables():
    tv = pytest.importorskip("torchvision")
    assert names(meta(lambda: tv.models.vit_b_16(image_size=32)))[0] == "encoder.layers.encoder_layer_0"
    assert names(meta(tv.models.convnext_tiny))[:2] == ["features.0", "features.1"]
    assert names(meta(tv.models.mnasnet0_5))[0] == "layers.0"
    shufflenet = meta(tv.models.shufflenet_v2_x0_5)  # no container holds a quarter: the root's children
    assert names(shufflenet) == ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"]
    assert candidates(shufflenet) == ["fc"]


@pytest.mark.parametrize(
    "builder,last,heads",
    [
        ("googlenet", "inception5b", ["aux1", "aux2", "avgpool", "dropout", "fc"]),
        ("inception_v3", "Mixed_7c", ["AuxLogits", "avgpool", "dropout", "fc"]),
    ],
)
def test_root_children_leave_auxiliary_classifiers_and_the_head_out(builder, last, heads):
    """GoogLeNet's aux1/aux2 were blocks: they run in train mode only, right after inception4a/4d, so a record in
    train mode moved them among the blocks and freeze=12 froze aux1 instead of inception4d."""
    tv = pytest.importorskip("torchvision")
    model = meta(lambda: getattr(tv.models, builder)(aux_logits=True, init_weights=False))
    got = names(model)
    assert got[-1] == last and not any(n in got for n in heads)
    assert candidates(model) == heads


# -- detection: the backbone's stages (`backbone.body`), not the root's children --------------------------------


RESNET_BODY = ["backbone.body.stem", *(f"backbone.body.layer{i}" for i in range(1, 5))]


@pytest.mark.parametrize(
    "builder", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"]
)
def test_detectors_on_a_resnet_get_its_stem_and_stages(builder):
    """Faster R-CNN's blocks were the root's children (transform, backbone, rpn, roi_heads): freeze=1 froze
    nothing, freeze=2 the whole backbone and FPN."""
    tv = pytest.importorskip("torchvision")
    model = meta(lambda: getattr(tv.models.detection, builder)(weights=None, weights_backbone=None))
    assert names(model) == RESNET_BODY
    assert freezes(model, 1) == [f"backbone.body.{m}" for m in ("conv1", "bn1", "relu", "maxpool")]
    assert freezes(model, 2)[-1] == "backbone.body.layer1"
    assert {"transform", "backbone.fpn"} <= set(candidates(model))


def test_detectors_on_a_mobilenet_and_ssd_get_the_feature_layers():
    tv = pytest.importorskip("torchvision")
    det = tv.models.detection
    no = dict(weights=None, weights_backbone=None)
    frcnn = meta(lambda: det.fasterrcnn_mobilenet_v3_large_fpn(**no))
    assert names(frcnn) == [f"backbone.body.{i}" for i in range(17)]
    assert {"transform", "rpn", "roi_heads", "backbone.fpn"} == set(candidates(frcnn))
    ssd = meta(lambda: det.ssd300_vgg16(**no))  # its `extra` layers hold more parameters than the VGG features
    assert names(ssd) == [f"backbone.features.{i}" for i in range(23)]
    assert {"backbone.extra.0", "backbone.extra.4"} <= set(candidates(ssd))  # a ModuleList: its layers run
    lite = names(meta(lambda: det.ssdlite320_mobilenet_v3_large(**no)))  # MobileNetV3 cut in two Sequentials
    assert lite[0] == "backbone.features.0.0" and lite[-1].startswith("backbone.features.1.") and len(lite) == 18


# -- segmentation: the backbone's stages, not the classifier ------------------------------------------------------


def test_segmentation_models_get_the_backbone_stages():
    """deeplabv3's largest container was its classifier (ASPP): freeze=1 froze 95% of deeplabv3_mobilenet_v3."""
    tv = pytest.importorskip("torchvision")
    seg = tv.models.segmentation
    no = dict(weights=None, weights_backbone=None)
    for build in (seg.deeplabv3_resnet50, seg.fcn_resnet50):
        model = meta(lambda build=build: build(**no))
        assert names(model) == ["backbone.stem", *(f"backbone.layer{i}" for i in range(1, 5))]
        assert "classifier" in candidates(model)
    for build in (seg.deeplabv3_mobilenet_v3_large, seg.lraspp_mobilenet_v3_large):
        model = meta(lambda build=build: build(**no))
        assert names(model) == [f"backbone.{i}" for i in range(17)]
        assert freezes(model, 2) == ["backbone.0", "backbone.1"]


def test_a_resnet_nested_as_a_backbone_keeps_its_stages():
    """A user's model around a torchvision ResNet: its blocks were layer4's three bottlenecks."""
    tv = pytest.importorskip("torchvision")

    class Finetune(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tv.models.resnet50()
            self.head = nn.Linear(1000, 3)

    model = meta(Finetune)
    assert names(model) == ["backbone.stem", *(f"backbone.layer{i}" for i in range(1, 5))]
    assert "head" in candidates(model) and "backbone.fc" in candidates(model)


# -- encoder-decoders: the encoder's layers first --------------------------------------------------------------


def test_nn_transformer_encoder_layers_then_decoder_layers():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=16)
    assert names(model) == [*(f"encoder.layers.{i}" for i in range(2)), *(f"decoder.layers.{i}" for i in range(3))]
    assert freezes(model, 1) == ["encoder.layers.0"]
    assert freezes(model, 3) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0"]
    assert {"encoder.norm", "decoder.norm"} <= set(candidates(model))


SEQ2SEQ = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=16,
    decoder_ffn_dim=16,
    vocab_size=50,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)


def _seq2seq(kind: str):
    tf = pytest.importorskip("transformers")
    if kind == "t5":
        small = dict(d_model=16, d_kv=8, d_ff=16, num_layers=2, num_heads=2)
        cfg = tf.T5Config(vocab_size=50, decoder_start_token_id=0, **small)
        return tf.T5ForConditionalGeneration(cfg), "encoder.block", "decoder.block"
    if kind == "whisper":
        cfg = tf.WhisperConfig(num_mel_bins=8, max_source_positions=8, max_target_positions=16, **SEQ2SEQ)
        return tf.WhisperForConditionalGeneration(cfg), "model.encoder.layers", "model.decoder.layers"
    build = {"bart": (tf.BartForConditionalGeneration, tf.BartConfig), "marian": (tf.MarianMTModel, tf.MarianConfig)}
    model_cls, cfg_cls = build[kind]
    return model_cls(cfg_cls(max_position_embeddings=32, **SEQ2SEQ)), "model.encoder.layers", "model.decoder.layers"


@pytest.mark.parametrize("kind", ["t5", "bart", "marian", "whisper"])
def test_encoder_decoders_count_the_encoder_layers_first(kind):
    """T5 and Whisper defaulted to the decoder's blocks: freeze=1 froze the whole encoder."""
    model, enc, dec = meta(lambda: _seq2seq(kind))
    assert names(model) == [f"{enc}.0", f"{enc}.1", f"{dec}.0", f"{dec}.1"]
    assert freezes(model, 1) == [f"{enc}.0"]
    assert freezes(model, 2) == [f"{enc}.0", f"{enc}.1"]


def test_t5_freeze1_freezes_the_first_encoder_layer_and_its_embedding_not_the_decoder():
    tf = pytest.importorskip("transformers")
    model, _, _ = _seq2seq("t5")
    fm = freezert.wrap(model, 1)
    ids = torch.randint(3, 50, (2, 6))
    fm.plan(input_ids=ids, decoder_input_ids=ids[:, :4])
    frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.block", "shared.weight"}  # block 0 and the input embedding (its stem)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("encoder.block.1", "decoder.")))
    fm.unwrap()
    assert isinstance(model, tf.T5ForConditionalGeneration)


# -- transformers 5 backbones and single stacks keep their tables ---------------------------------------------


def test_transformers_backbones_and_encoders():
    tf = pytest.importorskip("transformers")
    small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=16)
    dinov2 = meta(lambda: tf.Dinov2Backbone(tf.Dinov2Config(num_hidden_layers=3, image_size=32, patch_size=8, **small)))
    assert names(dinov2) == [f"encoder.layer.{i}" for i in range(3)]
    assert {"embeddings", "layernorm"} <= set(candidates(dinov2))
    segformer = meta(lambda: tf.SegformerForSemanticSegmentation(tf.SegformerConfig()))  # stock b0 sizes
    assert names(segformer) == [f"segformer.stages.{i}" for i in range(4)]
    assert candidates(segformer) == ["decode_head"]
    bert = meta(lambda: tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=3, vocab_size=50, **small)))
    assert names(bert) == [f"bert.encoder.layer.{i}" for i in range(3)]
    rel = dict(relative_attention=True, position_buckets=8, max_position_embeddings=32)
    deb = tf.DebertaV2Config(num_hidden_layers=3, vocab_size=50, **rel, **small)
    deberta = meta(lambda: tf.DebertaV2Model(deb))
    assert names(deberta) == [f"encoder.layer.{i}" for i in range(3)]
    assert "encoder.rel_embeddings" in candidates(deberta)
    conv = dict(conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3))
    w2v = tf.Wav2Vec2Config(vocab_size=20, num_hidden_layers=2, **conv, **small)
    wav2vec2 = meta(lambda: tf.Wav2Vec2ForCTC(w2v))
    assert names(wav2vec2) == ["wav2vec2.encoder.layers.0", "wav2vec2.encoder.layers.1"]
    assert "wav2vec2.feature_extractor" in candidates(wav2vec2)


def test_timm_tables():
    timm = pytest.importorskip("timm")
    assert names(meta(lambda: timm.create_model("resnet18")))[:2] == ["stem", "layer1"]
    levit = meta(lambda: timm.create_model("levit_128s"))
    assert names(levit) == ["stages.0", "stages.1", "stages.2"]
    assert {"stem", "head", "head_dist"} <= set(candidates(levit))
    vit = meta(lambda: timm.create_model("vit_tiny_patch16_224"))
    assert names(vit)[0] == "blocks.0" and len(names(vit)) == 12
    # HRNet names its group "block_types", not "blocks" (timm reads every group of the matcher in order): without
    # it the table was downsamp_modules, the last three modules of the forward, and freeze=1 froze one of them
    # features_only: a ModuleDict root running its children in order (FeatureListNet); the largest container inside
    # (layer3, two BasicBlocks) was the table, so freeze=1 froze layer3.0 and everything before it as the stem
    feats = meta(lambda: timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3)))
    assert names(feats) == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"]
    hrnet = meta(lambda: timm.create_model("hrnet_w18_small"))
    assert names(hrnet) == ["stem", "layer1", "transition1", "stage2", "transition2", "stage3", "transition3", "stage4"]
    t = block_table(hrnet)
    assert [n for n, _ in t.members[2]] == ["transition1.0", "transition1.1"]  # a ModuleList: its layers run
    assert {"incre_modules.0", "downsamp_modules.2", "final_layer", "classifier"} <= set(candidates(hrnet))


def test_yolo_and_explicit_paths_are_unchanged():
    from freezert.models import yolov5

    yolo = yolov5("n", nc=2)
    t = block_table(yolo)
    assert t.kind == "yolo" and names(yolo)[:2] == ["model.0", "model.1"]
    assert names(yolo) == [n for n, _ in freezert.find_blocks(yolo, blocks="model")]


def test_a_module_list_block_contributes_its_layers_as_members():
    """A ModuleList is never called itself: a block that is one (a stage of layers) has the layers as members."""

    class Staged(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]) for _ in range(3)])
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            for stage in self.stages:
                for layer in stage:
                    x = layer(x)
            return self.head(x)

    model = Staged()
    t = block_table(model)
    assert t.names == ["stages.0", "stages.1", "stages.2"]
    assert [n for n, _ in t.members[0]] == ["stages.0.0", "stages.0.1"]
    fm = freezert.wrap(model, 1)
    x = torch.randn(2, 4)
    fm(x).sum().backward()
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert model.stages[1][0].weight.grad is not None
    fm.unwrap()


def test_an_encoder_decoder_with_a_resnet_encoder_gets_its_stages_then_the_decoder_layers():
    """A U-Net-style model (segmentation_models_pytorch's shape): the encoder's stem and stages, then the decoder's
    blocks; the encoder's largest container alone would be its layer4."""
    tv = pytest.importorskip("torchvision")

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tv.models.resnet18()
            self.decoder = nn.ModuleDict({"blocks": nn.ModuleList([nn.Conv2d(512, 64, 3), nn.Conv2d(64, 16, 3)])})
            self.segmentation_head = nn.Conv2d(16, 2, 1)

    model = meta(UNet)
    stages = ["encoder.stem", *(f"encoder.layer{i}" for i in range(1, 5))]
    assert names(model) == [*stages, "decoder.blocks.0", "decoder.blocks.1"]
    assert freezes(model, 1) == [f"encoder.{m}" for m in ("conv1", "bn1", "relu", "maxpool")]


def test_a_model_that_is_all_head_still_has_blocks():
    """Head names are searched last, not never: an MLP kept in ``fc`` has its layers as blocks."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    assert names(MLP()) == [f"fc.{i}" for i in range(5)]


def test_freezing_by_name_covers_a_whole_side_or_backbone():
    """Names match whole dotted components of block names: ``freeze="encoder"`` is T5's whole encoder,
    ``freeze="backbone.body"`` a detector's whole ResNet."""
    model, _, _ = meta(lambda: _seq2seq("t5"))
    assert spec.resolve("encoder", block_table(model)) == [0, 1]
    tv = pytest.importorskip("torchvision")
    det = meta(lambda: tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    table = block_table(det)
    assert spec.resolve("backbone.body", table) == [0, 1, 2, 3, 4]
    assert spec.resolve("backbone.body.layer1", table) == [1]


def test_a_module_list_outside_the_blocks_has_its_layers_sorted_into_stem_and_head():
    """A ModuleList outside the blocks is never called, its layers are: each is stem or head by when it runs. As one
    candidate it never ran, so it stayed trainable while what it fed before block 0 froze as the stem."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
            self.post = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)])

        def forward(self, x):
            for layer in self.pre:
                x = layer(x)
            x = self.blocks(x)
            return self.post[1](self.post[0](x))

    model = Branchy()
    assert candidates(model) == ["pre.0", "pre.1", "post.0", "post.1"]
    fm = freezert.wrap(model, 2, cache="fp32")
    x = torch.randn(3, 4)
    for _ in range(2):
        fm(x).sum().backward()
    assert not any(p.requires_grad for p in [*model.pre.parameters(), *model.blocks[:2].parameters()])
    assert all(
        p.requires_grad and p.grad is not None for p in [*model.blocks[2:].parameters(), *model.post.parameters()]
    )
    assert fm.cache.stats()["hits"] == 3  # the second call skipped pre and blocks 0-1
    fm.unwrap()
