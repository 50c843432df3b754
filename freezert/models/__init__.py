"""Small built-in example models for the demo, the tests and the benchmarks."""

from __future__ import annotations

from ._calibrate import calibrate_batchnorm
from .cnn import CNNClassifier, cnn_classifier
from .encoder import EncoderBlock, TransformerEncoderClassifier, transformer_encoder
from .yolo import (
    YOLOv5,
    detection_loss,
    detection_targets_like,
    synthetic_images,
    yolov5,
)

__all__ = [
    "CNNClassifier",
    "EncoderBlock",
    "TransformerEncoderClassifier",
    "YOLOv5",
    "calibrate_batchnorm",
    "cnn_classifier",
    "detection_loss",
    "detection_targets_like",
    "synthetic_images",
    "transformer_encoder",
    "yolov5",
]
