"""Tiny networks, one per structural edge case of physical pruning, and helpers for the prune tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyConcat(nn.Module):
    """Two branches concatenated along channels, read by one conv: a concat consumer."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.a = conv_bn(32, 32, 1)
        self.b = conv_bn(32, 48, 3)
        self.mix = conv_bn(80, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(self.mix(x).mean((2, 3)))


class TinyLinearHead(nn.Module):
    """Convs, a flatten and a two-layer MLP head whose hidden layer is prunable."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 32), conv_bn(32, 48, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(48 * 4, 64)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.out(self.act(self.hidden(x)))


class TinyGrouped(nn.Module):
    """A chain with a grouped (groups=2, not depthwise) conv: its input and output widths stay fixed."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 32)
        self.grouped = conv_bn(32, 32, 3, groups=2)
        self.c3 = conv_bn(32, 48)
        self.c4 = conv_bn(48, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.grouped(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class WithLayerNormScale(nn.Module):
    """A conv net with a module that owns a bare parameter the pruner cannot handle."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 32)
        self.scale = Scale(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.scale(self.c1(x)).mean((2, 3)))


class Scale(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics so masking and folding are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model.eval()
