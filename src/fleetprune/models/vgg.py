"""A small CIFAR-sized VGG-style chain: conv-BN-ReLU stacks with max pools, no residuals.

It is the structural opposite of a ResNet: every conv is its own channel group, so pruning is
free per layer and each layer's c_in is its producer's width.
"""

from __future__ import annotations

import torch
from torch import nn

# About 43 M multiply-accumulates at 32x32, like a CIFAR ResNet-20, so it trains on two cores.
DEFAULT_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, "M")


class VGGChain(nn.Module):
    """``features`` (conv-BN-ReLU / MaxPool stack), global average pool, one linear classifier."""

    def __init__(self, cfg: tuple[int | str, ...] = DEFAULT_CFG, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                c = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)
