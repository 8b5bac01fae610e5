"""Channel groups, width choices and layer configurations of the plan, per structural edge case."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tiny_models as tiny
from fleetprune.errors import ModelError
from fleetprune.models import create
from fleetprune.pruner import Plan, build_plan, unit_and_choices


def _plan(model: nn.Module, hw: int, batch: int = 1, **kwargs) -> Plan:
    torch.manual_seed(0)
    return build_plan(model, torch.randn(batch, 3, hw, hw), **kwargs)


# Spatial sizes do not matter for grouping, so ImageNet models are traced at 64x64 to stay fast.
@pytest.fixture(scope="module")
def resnet18() -> Plan:
    return _plan(create("resnet18"), 64, batch=2)


@pytest.fixture(scope="module")
def resnet50() -> Plan:
    return _plan(create("resnet50"), 64, round_to=32, memory_format="nhwc")


@pytest.fixture(scope="module")
def mobilenet_v2() -> Plan:
    return _plan(create("mobilenet_v2"), 64, round_to=8, dtype="fp16")


@pytest.fixture(scope="module")
def resnet56() -> Plan:
    return _plan(create("resnet56"), 32, round_to=8)


def _group_of(plan: Plan, member: str):
    (group,) = [g for g in plan.groups if member in g.members]
    return group


# -- coupled groups ------------------------------------------------------------------------------


def test_resnet18_stage_groups_couple_downsample_and_every_conv2(resnet18):
    stem = resnet18.group("conv1")
    assert set(stem.members) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    for stage in (2, 3, 4):
        g = resnet18.group(f"layer{stage}.0.conv2")
        assert set(g.members) == {f"layer{stage}.0.conv2", f"layer{stage}.0.downsample.0", f"layer{stage}.1.conv2"}
        assert g.prunable and g.width == 64 * 2 ** (stage - 1)
    assert set(resnet18.group("layer2.0.conv2").consumers) == {"layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"}
    for block in ("layer1.0", "layer2.1", "layer4.0"):
        assert resnet18.group(f"{block}.conv1").members == (f"{block}.conv1",)
    # 4 stage groups + 8 block-inner groups + the fixed classifier.
    assert len(resnet18.groups) == 13 and len(resnet18.prunable_groups()) == 12


def test_resnet18_layers_link_groups_and_batch_norms(resnet18):
    conv2 = resnet18.layer("layer2.1.conv2")
    assert (conv2.in_group, conv2.out_group, conv2.bn) == ("layer2.1.conv1", "layer2.0.conv2", "layer2.1.bn2")
    ds = resnet18.layer("layer3.0.downsample.0")
    assert (ds.in_group, ds.out_group, ds.bn) == ("layer2.0.conv2", "layer3.0.conv2", "layer3.0.downsample.1")
    assert resnet18.layer("fc").bn is None


def test_resnet56_each_stage_is_one_group(resnet56):
    for stage, first in ((1, "conv1"), (2, "layer2.0.conv2"), (3, "layer3.0.conv2")):
        g = resnet56.group(first)
        conv2s = {f"layer{stage}.{b}.conv2" for b in range(9)}
        extra = {"conv1"} if stage == 1 else {f"layer{stage}.0.downsample.0"}
        assert set(g.members) == conv2s | extra
        assert g.width == 16 * 2 ** (stage - 1) and g.prunable
    assert len(resnet56.groups) == 3 + 27 + 1


def test_resnet50_stages(resnet50):
    g = resnet50.group("layer3.0.conv3")
    assert set(g.members) == {"layer3.0.conv3", "layer3.0.downsample.0"} | {f"layer3.{b}.conv3" for b in range(1, 6)}
    assert g.width == 1024


def test_vgg_every_conv_is_its_own_group():
    plan = _plan(create("vgg_chain"), 32)
    convs = [layer for layer in plan.layers if layer.base.op == "conv"]
    assert len(convs) == 7
    for prev, layer in zip(convs, convs[1:]):
        assert plan.group(layer.name).members == (layer.name,)
        assert layer.in_group == prev.name and layer.out_group == layer.name
    assert plan.layer("classifier").in_group == convs[-1].name


def test_mobilenet_v2_expansion_and_depthwise_are_coupled(mobilenet_v2):
    g = mobilenet_v2.group("features.2.conv.0.0")
    assert set(g.members) == {"features.2.conv.0.0", "features.2.conv.1.0"}
    assert set(g.consumers) == {"features.2.conv.1.0", "features.2.conv.2"}
    dws = [layer for layer in mobilenet_v2.layers if layer.base.op == "dwconv"]
    assert len(dws) == 17
    for dw in dws:
        assert dw.in_group == dw.out_group
        configs = mobilenet_v2.layer_configs(dw)
        assert len(configs) == len(mobilenet_v2.group(dw.out_group).choices) if dw.out_group else len(configs) == 1
        assert all(c.cin == c.cout == c.groups for c in configs)
    # the first block has no expansion: its dwconv joins the stem's group
    assert set(mobilenet_v2.group("features.0.0").members) == {"features.0.0", "features.1.conv.0.0"}
    assert mobilenet_v2.layer("features.1.conv.0.0").base.dtype == "fp16"


def test_concat_consumer_reads_both_branches():
    plan = _plan(tiny.ConcatNet(), 16)
    fuse = plan.layer("fuse.0")
    assert fuse.in_group is None and fuse.in_fixed == 0
    assert fuse.in_parts == (("a.0", 1), ("b.0", 1))
    assert set(plan.group("a.0").consumers) == {"fuse.0"} and set(plan.group("b.0").consumers) == {"fuse.0"}
    assert plan.layer_config(fuse, {"a.0": 16, "b.0": 32}).cin == 48
    assert plan.layer_config(fuse, {}).cin == 80
    # a in {16, 32}, b in {16, 32, 48}: every sum is a reachable c_in
    assert {c.cin for c in plan.layer_configs(fuse)} == {32, 48, 64, 80}
    assert [layer.name for layer in plan.layers_reading("b.0")] == ["fuse.0"]


def test_flatten_into_linear_multiplies_by_spatial_size():
    plan = _plan(tiny.FlattenNet(), 16)
    fc = plan.layer("fc")
    assert fc.in_parts == (("body.0", 16),) and fc.in_group is None
    assert plan.layer_config(fc, {"body.0": 16}).cin == 256
    assert {c.cin for c in plan.layer_configs(fc)} == {256, 512}


def test_grouped_conv_fixes_the_groups_it_touches():
    plan = _plan(tiny.GroupedConvNet(), 16)
    for name in ("expand.0", "grouped.0"):
        g = plan.group(name)
        assert not g.prunable and g.choices == (64,) and "grouped conv" in g.reason
    grouped = plan.layer("grouped.0")
    assert (grouped.in_group, grouped.out_group, grouped.base.groups) == (None, None, 4)
    assert plan.group("project.0").prunable and plan.group("stem.0").prunable


def test_split_output_is_unprunable():
    plan = _plan(tiny.SplitNet(), 16)
    wide = plan.group("wide.0")
    assert not wide.prunable and "split" in wide.reason
    assert plan.layer("left.0").in_group is None and plan.layer("left.0").in_fixed == 32


def test_feature_output_and_classifier_are_fixed(resnet18):
    plan = _plan(tiny.TwoOutputNet(), 16)
    assert not plan.group("feat").prunable and "output" in plan.group("feat").reason
    assert plan.group("head.0").prunable
    fc = resnet18.group("fc")
    assert not fc.prunable and fc.choices == (1000,)
    assert resnet18.layer("fc").out_group is None
    assert {c.cout for c in resnet18.layer_configs("fc")} == {1000}


def test_stem_keeps_three_input_channels(resnet18, mobilenet_v2):
    for plan, stem in ((resnet18, "conv1"), (mobilenet_v2, "features.0.0")):
        layer = plan.layer(stem)
        assert layer.in_group is None and layer.in_fixed == 3
        assert {c.cin for c in plan.layer_configs(layer)} == {3}
        assert len(plan.layer_configs(layer)) > 1  # while its output width does vary


def test_depthwise_on_input_is_fixed():
    plan = _plan(tiny.DepthwiseStemNet(), 16)
    assert not plan.group("dw").prunable
    assert plan.layer("dw").base.op == "dwconv"


@pytest.mark.parametrize(
    "model,match",
    [(tiny.Conv1dNet, "'seq' is a Conv1d"), (tiny.CustomLayerNet, "'scale' \\(Scale\\)"), (tiny.SharedConvNet, "'shared' runs 2 times")],
)
def test_unsupported_layers_raise_model_error(model, match):
    with pytest.raises(ModelError, match=match):
        _plan(model(), 16)


# -- layer configurations ----------------------------------------------------------------------


def test_resnet18_layer_configs(resnet18):
    expect = {  # name: (in_h, stride, kernel, padding)
        "conv1": (64, 2, 7, 3),
        "layer1.0.conv1": (16, 1, 3, 1),
        "layer2.0.conv1": (16, 2, 3, 1),
        "layer2.0.downsample.0": (16, 2, 1, 0),
        "layer2.0.conv2": (8, 1, 3, 1),
        "layer4.1.conv2": (2, 1, 3, 1),
    }
    for name, (hw, s, k, p) in expect.items():
        c = resnet18.layer(name).base
        assert (c.in_h, c.in_w, c.sh, c.sw, c.kh, c.kw, c.ph, c.pw) == (hw, hw, s, s, k, k, p, p), name
        assert (c.op, c.act, c.batch, c.dtype, c.memory_format) == ("conv", "relu", 2, "fp32", "nchw")
    fc = resnet18.layer("fc").base
    assert (fc.op, fc.act, fc.cin, fc.cout, fc.in_h, fc.batch) == ("linear", "none", 512, 1000, 1, 2)


def test_layer_config_follows_widths(resnet18):
    widths = {"layer2.0.conv2": 64, "layer3.0.conv1": 32}
    c = resnet18.layer_config("layer3.0.conv1", widths)
    assert (c.cin, c.cout) == (64, 32)
    assert resnet18.layer_config("layer3.0.conv1", {}).cin == 128  # missing groups stay dense
    with pytest.raises(ValueError):
        resnet18.layer_config("layer3.0.conv1", {"layer3.0.conv1": 512})


def test_configs_are_the_deduplicated_cross_product(resnet50):
    s = resnet50.summary()
    configs = resnet50.configs()
    assert len(configs) == s["configs"] == len({c.key for c in configs})
    assert s["configs"] < s["configs_without_dedup"]
    layer = resnet50.layer("layer2.1.conv2")
    cins, couts = resnet50.group(layer.in_group).choices, resnet50.group(layer.out_group).choices
    own = resnet50.layer_configs(layer)
    assert {(c.cin, c.cout) for c in own} == {(i, o) for i in cins for o in couts}
    assert set(own) <= set(configs)
    assert all(c.memory_format == "nhwc" for c in configs)


def test_choices_are_bounded_units_of_round_to(resnet50):
    for g in resnet50.prunable_groups():
        assert 1 < len(g.choices) <= 32
        assert g.unit % 32 == 0 and g.choices[-1] == g.width and g.choices[0] >= g.unit
        assert all(b - a == g.unit for a, b in zip(g.choices, g.choices[1:]))
    assert resnet50.group("layer4.0.conv3").unit == 64  # 2048 wide: 64 units of 32 would be too many


def test_unit_and_choices_rule():
    assert unit_and_choices(64, 16, 32) == (16, (16, 32, 48, 64))
    # the top unit absorbs the remainder: 100 = 6*16 + 4
    assert unit_and_choices(100, 16, 32) == (16, (20, 36, 52, 68, 84, 100))
    assert unit_and_choices(24, 16, 32) == (24, (24,))
    assert unit_and_choices(8, 16, 32) == (8, (8,))
    unit, choices = unit_and_choices(2048, 16, 32)
    assert unit == 64 and len(choices) == 32 and choices[0] == 64
    assert unit_and_choices(256, 16, 4) == (64, (64, 128, 192, 256))


def test_json_round_trip(mobilenet_v2):
    text = mobilenet_v2.to_json()
    assert isinstance(json.loads(text), dict)
    back = Plan.from_json(text)
    assert back == mobilenet_v2
    assert back.configs() == mobilenet_v2.configs()
    assert back.layer("features.3.conv.1.0").base.op == "dwconv"
    concat = _plan(tiny.ConcatNet(), 16)
    assert Plan.from_json(concat.to_json()).layer("fuse.0").in_parts == (("a.0", 1), ("b.0", 1))


def test_plan_leaves_the_model_as_it_was():
    model = create("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(model, 32)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("num_batches_tracked"))
    assert plan.dense_widths()["layer3.0.conv2"] == 64
    with pytest.raises(KeyError, match="no channel group"):
        plan.group("nope")


@pytest.mark.slow
def test_resnet50_config_count_for_the_readme():
    # The README's figure: ResNet-50 at 224x224, batch 1, fp32, NHWC, round_to 32.
    plan = _plan(create("resnet50"), 224, round_to=32, memory_format="nhwc")
    # Issue 13 added the op rows: 16 residual adds, the stem's max pool and the global pool (18 ops, 122
    # configurations: 88 adds, 32 global pools, 2 max pools); the convs and linears still need 4174.
    assert plan.summary() == {
        "layers": 54, "ops": 18, "groups": 38, "prunable_groups": 37, "configs": 4296, "configs_without_dedup": 9932,
        "layer_configs": 4174,
    }
    assert plan.layer("conv1").base.in_h == 224 and plan.layer("layer4.0.conv2").base.in_h == 14
