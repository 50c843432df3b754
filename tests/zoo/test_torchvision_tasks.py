"""torchvision beyond classification heads on one container: a ``features``/``classifier`` model whose classifier
outweighs its features (VGG), DenseNet, detection (Faster R-CNN, RetinaNet: the blocks are ``backbone.body``'s
stages, the loss dict is the output in train mode, the detections in eval mode) and segmentation (LR-ASPP,
DeepLabV3: the blocks are ``backbone``'s stages), from every start of a run (``SCENARIOS``), with and without the
cache. Built from torchvision's own builders and classes with random weights and tiny sizes (nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch

from ._conformance import DTYPE, Bases, Case, images, need, prepare, scenarios, under

tv = need("torchvision")
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.vgg import VGG, make_layers  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

X32 = images(size=32)
X64 = images(size=64)


def boxes(n: int = 2, size: int = 64, classes: int = 3, seed: int = 5) -> list[dict]:
    """Detection targets as torchvision takes them: per image, three boxes inside it and their labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g, dtype=DTYPE) * size * 0.5
        wh = torch.rand(3, 2, generator=g, dtype=DTYPE) * size * 0.4 + 8
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, classes, (3,), generator=g)})
    return out


# A detector takes a list of images (and, in train mode, their targets): the loss dict in train mode and the
# detections in eval mode (every box kept, score threshold 0) are the outputs compared.
DETECT = ([X64[0], X64[1]], boxes())
IDS = torch.arange(2)  # RetinaNet's cache keys its list of images by these; Faster R-CNN's by the images' content
SMALL_RCNN = dict(
    min_size=64,
    max_size=64,
    rpn_pre_nms_top_n_train=32,
    rpn_post_nms_top_n_train=16,
    rpn_pre_nms_top_n_test=32,
    rpn_post_nms_top_n_test=16,
    rpn_batch_size_per_image=16,
    box_batch_size_per_image=8,
    box_detections_per_img=8,
    box_score_thresh=0.0,
)


def vgg11_bn_layout():
    """vgg11_bn's layout (convolutions, BatchNorm, ReLU, max-pools in ``features``; a three-layer ``classifier``)
    with narrow layers; as in the stock model the classifier holds most parameters (here 2x the features'),
    which made it "the blocks"."""
    cfg = [8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"]
    model = VGG(make_layers(cfg, batch_norm=True), num_classes=10, dropout=0.0)
    model.classifier[0] = torch.nn.Linear(32 * 7 * 7, 64)
    model.classifier[3] = torch.nn.Linear(64, 64)
    model.classifier[6] = torch.nn.Linear(64, 10)
    return model


def faster_rcnn():
    """``fasterrcnn_mobilenet_v3_large_fpn``'s recipe on MobileNetV3-small with a narrow box head."""
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6)
    anchors = AnchorGenerator(((16, 32, 64),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return tv.models.detection.FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, 3),
        **SMALL_RCNN,
    )


def retinanet():
    """RetinaNet on a ResNet-18 FPN of 16 channels (P3-P7, as ``retinanet_resnet50_fpn`` builds it)."""
    body = tv.models.resnet18()
    fpn = BackboneWithFPN(
        body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 16, extra_blocks=LastLevelP6P7(16, 16)
    )
    return tv.models.detection.RetinaNet(
        fpn, num_classes=3, min_size=64, max_size=64, detections_per_img=8, score_thresh=0.0, topk_candidates=32
    )


def blocks(prefix: str, n: int, *stem: str):
    return under(*stem, *(f"{prefix}.{i}" for i in range(n)))


NO_WEIGHTS = dict(weights=None, weights_backbone=None, num_classes=3)
COST = "CI time: a one-sample plan is checked on Faster R-CNN, VGG and the transformers models"
CASES = {
    "vgg11_bn": Case(vgg11_bn_layout, (X32,), freeze=8, expect=blocks("features", 8)),
    "densenet": Case(
        lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2),
        (X32,),
        freeze=6,  # conv0, norm0, relu0, pool0, denseblock1, transition1
        expect=under(*(f"features.{n}" for n in ("conv0", "norm0", "denseblock1", "transition1"))),
        skip={"plan-one": "its last train-mode BatchNorm sees one value per channel on one 32 px image"},
    ),
    "fasterrcnn": Case(faster_rcnn, DETECT, freeze=4, expect=blocks("backbone.body", 4)),
    "retinanet": Case(
        retinanet,
        DETECT,
        freeze=2,  # the stem (conv1, bn1) and layer1
        expect=under("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"),
        cached=dict(cache_ids=IDS),
        skip={"plan-one": COST},
    ),
    "lraspp": Case(
        lambda: tv.models.segmentation.lraspp_mobilenet_v3_large(**NO_WEIGHTS),
        (images(size=32, seed=1),),
        freeze=6,  # past block 4, whose output the head reads as "low"
        expect=blocks("backbone", 6),
        skip={"plan-one": COST},
    ),
}
base = Bases(lambda name: (CASES[name].build(), CASES[name].args, CASES[name].kwargs))


@pytest.mark.parametrize("name,scenario,cache", scenarios(CASES))
def test_same_function_as_naive_freezing_from_every_start(name, scenario, cache):
    CASES[name].check(base(name), scenario, cache)


def test_deeplabv3_validation_first_then_cached_training():
    """DeepLabV3 (MobileNetV3 backbone; its ASPP head makes a step 1-2 s, so one scenario, the one that exercises
    most): the blocks are the backbone's stages, a validation pass fills the cache, training is served from it."""
    model = prepare(tv.models.segmentation.deeplabv3_mobilenet_v3_large(**NO_WEIGHTS, aux_loss=False), (X64,))
    res = Case(lambda: model, (X64,), freeze=4, expect=blocks("backbone", 4)).check(model, "eval-first", "fp32")
    assert res.hits == 2


def test_googlenet_aux_heads_read_cached_rows_after_a_validation_pass():
    """GoogLeNet's auxiliary heads run in train mode only: a validation pass first (eval mode) never sees them read
    inception4a/4d's outputs, and cache hits must still hand them real rows (issue 16: zero placeholders)."""
    model = tv.models.googlenet(aux_logits=True, init_weights=True, dropout=0.0, dropout_aux=0.0)
    model = prepare(model, (X64,))
    res = Case(lambda: model, (X64,), freeze=12).check(model, "eval-first", "fp32")  # through inception4d
    assert res.hits == 2
