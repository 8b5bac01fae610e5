"""The model registry: names, building, input shapes, local checkpoints, and the errors users hit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fleetprune.errors import ModelError
from fleetprune.models import create, input_shape, names


def test_names_cover_cifar_vgg_and_torchvision():
    known = names()
    assert known == sorted(known)
    for name in ("resnet20", "resnet32", "resnet56", "vgg_chain", "resnet18", "resnet50", "mobilenet_v2"):
        assert name in known


@pytest.mark.parametrize("name,depth", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56)])
def test_cifar_resnet_is_he_et_al_with_option_b_shortcut(name, depth):
    model = create(name)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    three = [m for m in convs.values() if m.kernel_size == (3, 3)]
    downsample = {n: m for n, m in convs.items() if "downsample" in n}
    # 6n+2 weighted layers: 6n+1 3x3 convs plus the fc; the 1x1 shortcuts are extra (option B).
    assert len(three) + 1 == depth
    assert sorted(downsample) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert all(m.kernel_size == (1, 1) and m.stride == (2, 2) for m in downsample.values())
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels, model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model.fc.out_features == 10
    model.eval()
    out = model(torch.randn(2, *input_shape(name)))
    assert out.shape == (2, 10)


def test_vgg_chain_is_a_plain_chain():
    model = create("vgg_chain", num_classes=7).eval()
    assert not any("downsample" in n for n, _ in model.named_modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) >= 3
    assert model(torch.randn(2, *input_shape("vgg_chain"))).shape == (2, 7)


def test_torchvision_model_random_init_without_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("create() tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = create("resnet18", num_classes=10)
    assert isinstance(model, nn.Module)
    assert model.fc.out_features == 10
    assert create("mobilenet_v2").classifier[-1].out_features == 1000


def test_input_shapes():
    assert input_shape("resnet20") == (3, 32, 32)
    assert input_shape("vgg_chain") == (3, 32, 32)
    assert input_shape("resnet50") == (3, 224, 224)
    assert input_shape("inception_v3") == (3, 299, 299)


@pytest.mark.parametrize("call", [lambda: create("resnet21"), lambda: input_shape("nonet")])
def test_unknown_name_lists_known_names(call):
    with pytest.raises(ModelError) as err:
        call()
    assert "unknown model" in str(err.value)
    assert "resnet20" in str(err.value) and "vgg_chain" in str(err.value) and "mobilenet_v2" in str(err.value)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["bare", "nested", "dataparallel"])
def test_local_checkpoint_loads(tmp_path, wrap):
    source = create("resnet20")
    state = source.state_dict()
    if wrap == "nested":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = create("resnet20", weights=str(path))
    assert _same_weights(loaded, source)
    assert not _same_weights(create("resnet20"), source)  # random init differs, so the load did the work


def test_mismatched_weights_name_the_keys(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(create("resnet20").state_dict(), path)
    with pytest.raises(ModelError) as err:
        create("resnet32", weights=str(path))
    assert "missing" in str(err.value) and "layer1.3." in str(err.value)

    with pytest.raises(ModelError) as err:
        create("resnet20", weights=str(path), num_classes=100)
    assert "fc.weight" in str(err.value) and "shape mismatch" in str(err.value)


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create("resnet20", weights=str(tmp_path / "absent.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        create("resnet20", weights=str(bad))
