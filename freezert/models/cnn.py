"""A small CNN classifier: six Conv-BN-ReLU stages, global average pooling, a linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["CNNClassifier", "cnn_classifier"]


def _stage(c1: int, c2: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c1, c2, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(inplace=True),
    )


class CNNClassifier(nn.Module):
    """``features`` (Sequential of stages ``0``..``5``) -> ``pool`` -> flatten -> ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 32, ch: int = 3):
        super().__init__()
        w = width
        # (out channels, stride) per stage: resolution halves at stages 1, 3 and 5
        plan = [(w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (8 * w, 2)]
        stages, c1 = [], ch
        for c2, s in plan:
            stages.append(_stage(c1, c2, s))
            c1 = c2
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c1, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


def cnn_classifier(num_classes: int = 10, width: int = 32, ch: int = 3) -> CNNClassifier:
    """A randomly initialised ``CNNClassifier``."""
    return CNNClassifier(num_classes=num_classes, width=width, ch=ch)
