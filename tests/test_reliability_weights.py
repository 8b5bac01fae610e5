"""--weights that would give a broken variant, or torch's multi-line text, get one clear line (issue 12, item 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleetprune.cli import main
from fleetprune.errors import ModelError
from fleetprune.models import create, load_weights

MODEL = "vgg_chain"


def _state() -> dict[str, torch.Tensor]:
    return create(MODEL).state_dict()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_one_non_finite_tensor_is_refused_by_name(tmp_path, value):
    state = _state()
    name = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    state[name].view(-1)[3] = value
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        create(MODEL, weights=str(path))
    text = str(info.value)
    assert "NaN or infinite" in text and f"1 of {len(state)} tensors ({name})" in text
    model = create(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError):
        load_weights(model, str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched


def test_all_tensors_nan_names_them_and_counts_the_rest(tmp_path):
    state = {k: (torch.full_like(v, math.nan) if v.is_floating_point() else v) for k, v in _state().items()}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        create(MODEL, weights=str(path))
    floats = [k for k, v in state.items() if v.is_floating_point()]
    assert f"in {len(floats)} of {len(state)} tensors" in str(info.value)
    assert floats[0] in str(info.value) and "more" in str(info.value)


def test_finite_weights_still_load(tmp_path):
    state = _state()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    model = create(MODEL, weights=str(path))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _module(path):
    torch.save(create(MODEL), path)


def _npy(path):
    with open(path, "wb") as f:  # np.save on a name would append .npy
        np.save(f, np.zeros(3))


def _torchscript(path):
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))


def _text(path):
    path.write_text("this is not a checkpoint\n")


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("make,what", [
    (_module, "pickled Python objects other than tensors"),
    (_npy, "NumPy .npy array"),
    (_torchscript, "TorchScript archive"),
    (_text, "not a PyTorch checkpoint"),
    (_empty, "it is empty"),
])
def test_a_file_that_is_not_a_state_dict_gets_one_line(tmp_path, make, what):
    path = tmp_path / "w.pt"
    make(path)
    with pytest.raises(ModelError) as info:
        create(MODEL, weights=str(path))
    text = str(info.value)
    assert what in text and "torch.save(model.state_dict(), path)" in text
    assert "\n" not in text and "\x1b" not in text and "pop from empty list" not in text


def test_the_prune_cli_prints_one_line_for_nan_weights(tmp_path, capsys):
    state = {k: (torch.full_like(v, math.nan) if v.is_floating_point() else v) for k, v in _state().items()}
    torch.save(state, tmp_path / "w.pt")
    table = ["--tables", str(tmp_path / "t")]
    assert main(["profile", MODEL, "--ray-address", "none", "--backend", "fake", "--threads", "1", *table]) == 0
    capsys.readouterr()
    argv = ["prune", MODEL, *table, "--device", "all", "--budget", "0.5",
            "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: weights in") and "NaN or infinite" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
