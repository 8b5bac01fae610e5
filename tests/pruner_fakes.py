"""Synthetic plans and latency tables for the pruner algorithm tests (no plan.py, no profiler).

``FakePlan`` has the attributes of ``pruner.plan.Plan`` the algorithms use; ``DictLatencyTable``
is a minimal table with ``lookup``/``lookup_many`` over a dict from config key to ms.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fleetprune.errors import MissingConfigsError
from fleetprune.tables.config import LayerConfig


@dataclass(frozen=True)
class FakeGroup:
    name: str
    width: int
    unit: int
    choices: tuple[int, ...]
    members: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    prunable: bool = True


@dataclass(frozen=True)
class FakeLayer:
    name: str
    base: LayerConfig
    in_group: str | None
    out_group: str | None
    bn: str | None = None


class FakePlan:
    """Groups and layers, with the Plan methods the pruner algorithms call."""

    def __init__(self, groups: list[FakeGroup], layers: list[FakeLayer]):
        self.groups = groups
        self.layers = layers

    def group(self, name: str) -> FakeGroup:
        return next(g for g in self.groups if g.name == name)

    def dense_widths(self) -> dict[str, int]:
        return {g.name: g.width for g in self.groups}

    def layer_config(self, layer: FakeLayer, widths: Mapping[str, int]) -> LayerConfig:
        cin = widths[layer.in_group] if layer.in_group else layer.base.cin
        cout = widths[layer.out_group] if layer.out_group else layer.base.cout
        return layer.base.with_channels(cin, cout)

    def configs(self) -> list[LayerConfig]:
        out = []
        for layer in self.layers:
            ins = self.group(layer.in_group).choices if layer.in_group else [layer.base.cin]
            outs = self.group(layer.out_group).choices if layer.out_group else [layer.base.cout]
            if layer.in_group is not None and layer.in_group == layer.out_group:
                pairs = [(w, w) for w in ins]
            else:
                pairs = list(itertools.product(ins, outs))
            out += [layer.base.with_channels(a, b) for a, b in pairs]
        return list(dict.fromkeys(out))


class DictLatencyTable:
    """A latency table held in a dict from config key to ms (tests only)."""

    def __init__(self, ms_by_key: Mapping[str, float]):
        self.ms = dict(ms_by_key)
        self.calls = 0

    @classmethod
    def from_function(cls, configs: Iterable[LayerConfig], fn: Callable[[LayerConfig], float]) -> "DictLatencyTable":
        return cls({c.key: float(fn(c)) for c in configs})

    def lookup(self, config: LayerConfig) -> float:
        self.calls += 1
        try:
            return self.ms[config.key]
        except KeyError:
            raise MissingConfigsError(f"no row for {config.key}", [config.key]) from None

    def lookup_many(self, configs: Iterable[LayerConfig]) -> np.ndarray:
        configs = list(configs)
        missing = [c.key for c in configs if c.key not in self.ms]
        if missing:
            raise MissingConfigsError(f"no rows for {len(missing)} configs", missing)
        self.calls += len(configs)
        return np.array([self.ms[c.key] for c in configs])


def macs_staircase_ms(config: LayerConfig, step: int = 16) -> float:
    """Latency from MACs with the output channels rounded up to a staircase step."""
    if config.op == "dwconv":
        return 1e-6 + config.macs * 1e-9
    cout = -(-config.cout // step) * step
    return 1e-6 + config.with_channels(config.cin, cout).macs * 1e-9


class TinyResNet(nn.Module):
    """conv1 -> (conv2 -> conv3) + conv1 -> pool -> fc: a residual group {conv1, conv3}."""

    def __init__(self, width: int = 32, inner: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, inner, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        c = torch.relu(self.bn3(self.conv3(b)) + a)
        return self.fc(c.mean((2, 3)))


def tiny_resnet_plan(width: int = 32, inner: int = 32, step: int = 8, hw: int = 8) -> FakePlan:
    def choices(n: int) -> tuple[int, ...]:
        return tuple(range(step, n + 1, step))

    conv = lambda cin, cout, k: LayerConfig("conv", cin, cout, kh=k, kw=k, ph=k // 2, pw=k // 2, in_h=hw, in_w=hw)
    groups = [
        FakeGroup("res", width, step, choices(width), ("conv1", "conv3"), ("conv2", "fc")),
        FakeGroup("inner", inner, step, choices(inner), ("conv2",), ("conv3",)),
    ]
    layers = [
        FakeLayer("conv1", conv(3, width, 3), None, "res", "bn1"),
        FakeLayer("conv2", conv(width, inner, 3), "res", "inner", "bn2"),
        FakeLayer("conv3", conv(inner, width, 1), "inner", "res", "bn3"),
        FakeLayer("fc", LayerConfig("linear", width, 10, act="none"), "res", None, None),
    ]
    return FakePlan(groups, layers)


def random_chain_plan(rng: np.random.Generator, n_groups: int = 3, max_choices: int = 4,
                      depthwise: bool = True) -> FakePlan:
    """A random chain of convs (and optionally a depthwise conv) with small choice sets."""
    groups, layers = [], []
    prev = None
    for i in range(n_groups):
        k = int(rng.integers(2, max_choices + 1))
        unit = 4
        groups.append(FakeGroup(f"g{i}", unit * k, unit, tuple(unit * j for j in range(1, k + 1)), (f"c{i}",)))
        cin = 3 if prev is None else groups[-2].width
        layers.append(FakeLayer(f"c{i}", LayerConfig("conv", cin, unit * k, kh=3, kw=3, ph=1, pw=1, in_h=8, in_w=8),
                                prev, f"g{i}"))
        if depthwise and i == 1:
            w = unit * k
            layers.append(FakeLayer(f"dw{i}", LayerConfig("dwconv", w, w, kh=3, kw=3, ph=1, pw=1, groups=w,
                                                          in_h=8, in_w=8), f"g{i}", f"g{i}"))
        prev = f"g{i}"
    layers.append(FakeLayer("head", LayerConfig("linear", groups[-1].width, 10, act="none"), prev, None))
    return FakePlan(groups, layers)


def random_table(plan: FakePlan, rng: np.random.Generator, monotone: bool = False) -> DictLatencyTable:
    """Random positive latencies for every config of the plan (monotone in MACs if asked)."""
    def fn(c: LayerConfig) -> float:
        if monotone:  # MACs plus a little noise: non-monotone only within the noise
            return c.macs * 1e-6 + float(rng.uniform(0.0, 0.05))
        return float(rng.uniform(0.01, 1.0))
    return DictLatencyTable.from_function(plan.configs(), fn)
