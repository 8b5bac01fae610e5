"""Op kinds beside conv/linear (issue 13): each planned once from the graph, keyed stably, looked up, summed.

One tiny model per op kind, in the manner of test_plan.py; latencies come from the fake backend's
formula (never this machine's timings).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import tiny_models as tiny
from fleetprune.errors import ModelError
from fleetprune.profiler import FakeTimingBackend, fake_device
from fleetprune.pruner import Plan, build_plan
from fleetprune.pruner.latency import LatencyModel
from fleetprune.tables import LayerConfig

FAKE = FakeTimingBackend(fake_device("fake-ops", "fake ops"))


def cbr(cin: int, cout: int, act: nn.Module | None = None, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act or nn.ReLU())


class ResidualNet(nn.Module):
    """conv-bn-relu, conv-bn, + identity, ReLU: the ReLU after the add is fused into the add row."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.conv1 = cbr(32, 32)
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.conv2(self.conv1(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


class PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.maxpool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.body = cbr(32, 32)
        self.avgpool = nn.AvgPool2d(2, 2)
        self.head = cbr(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.body(self.maxpool(self.stem(x))))
        return self.fc(self.head(x).mean((2, 3)))


class ActNet(nn.Module):
    """Activations a conv row does not hold, and one after a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 32, nn.Hardswish())
        self.b = cbr(32, 32, nn.ReLU6())
        self.c = cbr(32, 32, nn.SiLU())
        self.d = cbr(32, 32, nn.GELU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 32)
        self.gate = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.d(self.c(self.b(self.a(x)))))
        return self.fc2(self.gate(self.fc1(torch.flatten(x, 1))))


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.se = SqueezeExcitation(32, 16, activation=nn.SiLU)
        self.body = cbr(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(self.se(self.stem(x)))), 1))


class UpsampleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.up = nn.Upsample(scale_factor=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.up(self.stem(x)).mean((2, 3)))


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.stem(x) * 0.5).mean((2, 3)))


def plan_of(model: nn.Module, hw: int = 16, **kw) -> Plan:
    torch.manual_seed(0)
    return build_plan(model, torch.randn(1, 3, hw, hw), round_to=8, **kw)


class FakeTable:
    """A table pricing every configuration with the fake backend's formula."""

    covers_ops = True

    def __init__(self, configs):
        self.ms = {c.key: FAKE.latency_ms(c) for c in configs}

    def lookup(self, c: LayerConfig) -> float:
        return self.ms[c.key]

    def lookup_many(self, configs):
        import numpy as np

        return np.array([self.ms[c.key] for c in configs])


def kinds(plan: Plan) -> list[tuple[str, str]]:
    return [(op.base.op, op.base.act) for op in plan.ops]


def test_residual_add_is_one_row_with_its_relu_fused():
    plan = plan_of(ResidualNet())
    assert kinds(plan) == [("add", "relu"), ("adaptive_avgpool", "none")]
    add = plan.ops[0]
    stage = plan.group("stem.0")
    assert stage.prunable and set(stage.members) == {"stem.0", "conv2.0"}
    assert add.in_group == add.out_group == "stem.0" and add.in_parts == (("stem.0", 1),)
    assert add.base.key == "add|b1|fp32|nchw|k1x1|s1x1|p0x0|d1|g1|h16w16|ci32|co32|relu"
    # every width of the stage gets its own row, with cin == cout
    assert {c.cin for c in plan.layer_configs(add)} == set(stage.choices)
    assert all(c.cin == c.cout for c in plan.layer_configs(add))


def test_pools_and_a_spatial_mean_are_rows():
    plan = plan_of(PoolNet(), hw=17)
    assert kinds(plan) == [("maxpool_ceil", "none"), ("avgpool", "none"), ("adaptive_avgpool", "none")]
    mp, ap, gap = plan.ops
    assert (mp.base.kh, mp.base.sh, mp.base.in_h) == (3, 2, 17) and mp.base.out_hw == (8, 8)
    assert (ap.base.in_h, ap.base.out_hw) == (8, (4, 4))
    assert (gap.base.kh, gap.base.kw, gap.base.in_h) == (1, 1, 4)
    assert mp.in_group == "stem.0" and ap.in_group == "body.0" and gap.in_group == "head.0"


def test_activations_a_conv_row_does_not_hold_are_rows():
    plan = plan_of(ActNet())
    acts = [(op.base.act, op.in_group) for op in plan.ops if op.base.op == "act"]
    assert acts == [("hardswish", "a.0"), ("relu6", "b.0"), ("silu", "c.0"), ("gelu", "d.0"), ("sigmoid", "fc1")]
    sig = next(op for op in plan.ops if op.base.act == "sigmoid")
    assert (sig.base.in_h, sig.base.in_w, sig.base.cin) == (1, 1, 32)  # the (N, C) output of a linear


def test_squeeze_excitation_is_one_row_that_absorbs_its_convs():
    plan = plan_of(SENet())
    assert kinds(plan) == [("se", "silu-sigmoid"), ("adaptive_avgpool", "none")]
    se = plan.ops[0]
    assert set(plan.absorbed) == {"se.fc1", "se.fc2"}
    assert se.in_parts == (("stem.0", 1),) and se.out_group == "se.fc1"
    assert (se.base.cin, se.base.cout) == (32, 16)
    priced = {layer.name for layer in plan.priced()}
    assert "se.fc1" not in priced and "se.fc2" not in priced and "se.fc1" in {l.name for l in plan.priced(False)}
    # both sides move: the block's input channels and its squeeze width
    pairs = {(c.cin, c.cout) for c in plan.layer_configs(se)}
    assert {p[0] for p in pairs} == set(plan.group("stem.0").choices)
    assert {p[1] for p in pairs} == set(plan.group("se.fc1").choices)


def test_concat_row_follows_every_part():
    plan = plan_of(tiny.ConcatNet())
    [cat] = [op for op in plan.ops if op.base.op == "concat"]
    assert cat.in_parts == (("a.0", 1), ("b.0", 1)) and cat.in_group is None and cat.base.groups == 2
    widths = {"a.0": plan.group("a.0").choices[0], "b.0": plan.group("b.0").choices[-1]}
    c = plan.layer_config(cat, widths)
    assert c.cin == c.cout == widths["a.0"] + widths["b.0"]


@pytest.mark.parametrize("model, match", [
    (UpsampleNet(), r"cannot price op 'Upsample' at 'up'"),
    (ScaleNet(), r"cannot price op 'mul' at 'mul'"),
])
def test_an_op_no_row_prices_is_named(model, match):
    with pytest.raises(ModelError, match=match) as err:
        plan_of(model)
    assert "replace the op" in str(err.value)


def test_planned_once_keyed_stably_and_round_tripped():
    a, b = plan_of(SENet()), plan_of(SENet())
    assert [c.key for c in a.configs()] == [c.key for c in b.configs()]
    back = Plan.from_json(a.to_json())
    assert back.ops == a.ops and back.absorbed == a.absorbed and back.configs() == a.configs()
    names = [op.name for op in a.ops]
    assert len(names) == len(set(names)) and not set(names) & {layer.name for layer in a.layers}
    # an op row is a config of the plan, once
    assert sum(1 for c in a.configs() if c == a.ops[0].base) == 1
    s = a.summary()
    assert s["ops"] == 2 and s["configs"] > s["layer_configs"]


@pytest.mark.parametrize("factory", [ResidualNet, PoolNet, ActNet, SENet, tiny.ConcatNet])
def test_the_latency_model_sums_layers_and_ops(factory):
    plan = plan_of(factory())
    table = FakeTable(plan.configs())
    lm = LatencyModel(plan, table)
    assert lm.ops_priced and lm.ops_note == ""
    widths = {g.name: g.choices[0] for g in plan.prunable_groups()}
    by_hand = sum(table.lookup(plan.layer_config(layer, widths)) for layer in plan.priced())
    assert lm.layer_sum(widths) == pytest.approx(by_hand)
    ops_only = sum(table.lookup(plan.layer_config(op, widths)) for op in plan.ops)
    assert ops_only > 0
    layers_only = LatencyModel(plan, table, ops=False)
    absorbed = sum(table.lookup(plan.layer_config(plan.layer(n), widths)) for n in plan.absorbed)
    assert lm.layer_sum(widths) == pytest.approx(layers_only.layer_sum(widths) - absorbed + ops_only)


def test_the_knapsack_sees_an_ops_cost_in_its_group():
    plan = plan_of(ResidualNet())
    lm = LatencyModel(plan, FakeTable(plan.configs()))
    g = plan.group("stem.0")
    current = lm.full_widths()
    weights, _ = lm.option_weights(current, {g.name: list(g.choices)})
    ops = [op for op in plan.ops if op.out_group == g.name]
    assert [op.base.op for op in ops] == ["add", "adaptive_avgpool"]
    add_ms = [sum(lm.layer_ms(op, {**current, g.name: w}) for op in ops) for w in g.choices]
    without = LatencyModel(plan, FakeTable(plan.configs()), ops=False)
    weights_without, _ = without.option_weights(current, {g.name: list(g.choices)})
    assert weights[g.name] - weights_without[g.name] == pytest.approx(add_ms)
    assert add_ms[0] < add_ms[-1]


@pytest.mark.parametrize("name, want", [
    ("mobilenet_v3_small", {("se", "relu-hardsigmoid"), ("act", "hardswish"), ("add", "none"),
                            ("adaptive_avgpool", "none")}),
    ("efficientnet_b0", {("se", "silu-sigmoid"), ("act", "silu"), ("add", "none"), ("adaptive_avgpool", "none")}),
    ("squeezenet1_1", {("maxpool_ceil", "none"), ("concat", "none"), ("adaptive_avgpool", "none")}),
])
def test_torchvision_models_plan_without_a_per_model_list(name, want):
    """Unnamed models are the real test: every op of these is priced or absorbed from the graph alone."""
    from fleetprune.models import create

    plan = plan_of(create(name), hw=32)
    assert set(kinds(plan)) == want
    se = [op for op in plan.ops if op.base.op == "se"]
    assert len(plan.absorbed) == 2 * len(se)
    assert all(plan.layer(n).base.kh == 1 and plan.layer(n).base.in_h == 1 for n in plan.absorbed)
    table = FakeTable(plan.configs())
    lm = LatencyModel(plan, table)
    assert lm.ops_priced and lm.dense_ms() > LatencyModel(plan, table, ops=False).dense_ms() - sum(
        table.lookup(plan.layer(n).base) for n in plan.absorbed)
