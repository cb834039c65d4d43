"""A small CNN for training from scratch: any input size, 1 or 3 channels.

Stages of two 3x3 conv-BN-ReLU layers, each stage doubling the width and followed by 2x2 max-pooling
(the last by global average pooling), so the same network serves 28x28 greyscale and larger photos.
``tta_hflip`` makes evaluation average the logits of each image and its mirror (test-time augmentation
that travels with the weights, so serving, evaluation and ONNX export all do it); train with --hflip.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SimpleCNN(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 32,
        stages: int = 3,
        dropout: float = 0.3,
        tta_hflip: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        if width < 1 or stages < 1:
            raise ValueError("width and stages must be positive")
        layers: list[nn.Module] = []
        cin = in_channels
        for stage in range(stages):
            cout = width * 2**stage
            layers += _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout)
            if stage < stages - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.tta_hflip = bool(tta_hflip)

    def forward(self, x: Tensor) -> Tensor:
        if self.tta_hflip and not self.training:
            # One pass over image and mirror (batch 2n), then the mean of the two logits per image.
            return self._logits(torch.cat([x, x.flip(-1)])).unflatten(0, (2, -1)).mean(0)
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
