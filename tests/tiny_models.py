"""Tiny networks, one per structural edge case of channel planning (in the manner of Torch-Pruning's tests)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConcatNet(nn.Module):
    """Two branches concatenated on channels (32 + 48) and read by one 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.a = conv_bn(32, 32)
        self.b = conv_bn(32, 48, stride=1)
        self.fuse = conv_bn(80, 64, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(torch.flatten(self.pool(x), 1))


class GroupedConvNet(nn.Module):
    """A grouped (ResNeXt-style, groups=4) conv between two plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.expand = conv_bn(32, 64, k=1)
        self.grouped = conv_bn(64, 64, groups=4)
        self.project = conv_bn(64, 48, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.grouped(self.expand(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SplitNet(nn.Module):
    """A conv whose output is split in two halves, each read by its own conv: width cannot change."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.wide = conv_bn(32, 64)
        self.left = conv_bn(32, 32)
        self.right = conv_bn(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.wide(self.stem(x)), 2, dim=1)
        x = torch.cat([self.left(a), self.right(b)], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenNet(nn.Module):
    """A conv flattened straight into a linear: the linear reads each channel H*W times."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, stride=2)
        self.body = conv_bn(32, 32, stride=2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(self.stem(x)), 1))


class TwoOutputNet(nn.Module):
    """Returns a feature map as well as logits: the feature conv's width is an output (unprunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.feat = nn.Conv2d(32, 32, 3, padding=1)
        self.head = conv_bn(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.feat(self.stem(x))
        return self.fc(torch.flatten(self.pool(self.head(f)), 1)), f


class DepthwiseStemNet(nn.Module):
    """A depthwise conv straight on the RGB input: its channels are the input's, so fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.pw = conv_bn(3, 32, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.pw(self.dw(x))), 1))


class Conv1dNet(nn.Module):
    """Contains a Conv1d, which no layer configuration can express."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.seq = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2)
        return self.fc(self.seq(x).mean(-1))


class Scale(nn.Module):
    """A custom layer with its own per-channel weight, which Torch-Pruning does not know."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class CustomLayerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.scale = Scale(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.scale(self.stem(x))), 1))


class SharedConvNet(nn.Module):
    """Applies the same conv twice: its channels cannot be planned per use."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.shared(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
