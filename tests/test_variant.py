"""The variant folder: load_variant round trip, TorchScript, no pickled modules, atomic writes."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from fleetprune import load_variant
from fleetprune.api import prune
from fleetprune.api.prune import load_variant as api_load_variant
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input, read_widths, write_variant

from prune_models import TinyConcat, randomise
from prune_tables import compute_bound_ms, fake_tables, write_table


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    torch.manual_seed(0)
    results = prune("resnet20", tables=fake_tables(), devices="fake-compute", budget="0.6", out=out, steps=2,
                    round_to=8)
    return results[0]


def test_load_variant_rebuilds_the_pruned_model(variant):
    model = load_variant(variant.folder)
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    state = torch.load(variant.folder / "weights.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    with torch.no_grad():
        assert torch.equal(model(x), variant.model.eval()(x)), "identical to the model that was written"
    meta = read_widths(variant.folder)
    assert meta["widths"] == variant.widths
    assert model.conv1.out_channels == variant.widths["conv1"]
    assert meta["model"] == "resnet20" and meta["input_shape"] == [3, 32, 32]
    assert (meta["batch"], meta["dtype"], meta["memory_format"]) == (1, "fp32", "nchw")


def test_weights_file_holds_tensors_only(variant):
    path = variant.folder / "weights.pt"
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with zipfile.ZipFile(path) as zf:
        pickled = b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    assert b"torch.nn.modules" not in pickled and b"fleetprune" not in pickled and b"CifarResNet" not in pickled


def test_torchscript_loads_and_matches(variant):
    model = load_variant(variant.folder)
    scripted = torch.jit.load(str(variant.folder / "model.ts"))
    x = torch.randn(2, 3, 32, 32)  # another batch size than the trace's
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_a_custom_model_round_trips_through_its_factory(tmp_path):
    def factory():
        torch.manual_seed(7)
        return randomise(TinyConcat())

    configs = build_plan(factory(), example_input((3, 16, 16), 1), round_to=8).configs()
    write_table(str(tmp_path / "t"), "fake-tiny", configs, compute_bound_ms)
    [res] = prune("tiny_concat", tables=str(tmp_path / "t"), devices="all", budget="0.5", out=tmp_path / "v",
                  steps=2, round_to=8, model_factory=factory, input_shape=(3, 16, 16))
    assert res.predicted_ms <= res.budget_ms
    model = api_load_variant(res.folder, model_factory=factory)
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 3, 16, 16)), res.model(torch.ones(1, 3, 16, 16)))
    scripted = torch.jit.load(str(res.folder / "model.ts"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
    assert model.mix[0].in_channels == res.widths["a.0"] + res.widths["b.0"]


def _write(root, model, **kw):
    plan = build_plan(model, example_input((3, 16, 16), 1), round_to=8)
    defaults = dict(model_name="tiny", model_kwargs={}, input_shape=(3, 16, 16), dtype="fp32", memory_format="nchw",
                    batch=1, plan_json=plan.to_dict(), widths=plan.dense_widths(), report={"predicted_ms": 1.0})
    defaults.update(kw)
    return write_variant(root, "dev", model, **defaults)


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = randomise(TinyConcat())
    folder = _write(tmp_path, model)
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, model, overwrite=True, report={"predicted_ms": 2.0})
    assert sorted(os.listdir(tmp_path)) == ["dev"], "no temporary folder left behind"
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before
    assert json.loads((folder / "report.json").read_text()) == {"predicted_ms": 1.0}


def test_an_existing_variant_is_not_replaced_without_overwrite(tmp_path):
    model = randomise(TinyConcat())
    _write(tmp_path, model)
    with pytest.raises(Exception, match="--overwrite"):
        _write(tmp_path, model)
