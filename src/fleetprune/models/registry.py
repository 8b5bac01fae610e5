"""Named networks users can ask for, their input shapes, and loading of local checkpoints.

torchvision classification models are built with random weights or from a local checkpoint file;
fleetprune never downloads weights (the GPU machines have no internet, and a silent download
would make runs depend on a network).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from fleetprune.errors import ModelError
from fleetprune.models.cifar_resnet import DEPTHS, cifar_resnet
from fleetprune.models.vgg import VGGChain

log = logging.getLogger(__name__)

CIFAR_SHAPE = (3, 32, 32)
IMAGENET_SHAPE = (3, 224, 224)
# torchvision models whose stem or pooling needs a larger input than 224.
_TV_SHAPES = {"inception_v3": (3, 299, 299)}

# name -> (builder(num_classes), default number of classes, input shape)
_LOCAL: dict[str, tuple[Callable[[int], nn.Module], int, tuple[int, int, int]]] = {
    **{f"resnet{d}": ((lambda nc, d=d: cifar_resnet(d, nc)), 10, CIFAR_SHAPE) for d in DEPTHS},
    "vgg_chain": ((lambda nc: VGGChain(num_classes=nc)), 10, CIFAR_SHAPE),
}

# Checkpoint containers whose state dict sits under one of these keys.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_SHOW = 8  # keys named in a mismatch message


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def names() -> list[str]:
    """Every model name :func:`create` accepts, sorted."""
    return sorted(set(_LOCAL) | set(_torchvision_names()))


def _unknown(name: str) -> ModelError:
    return ModelError(f"unknown model {name!r}; known models: {', '.join(names())}")


def input_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) input a model expects: 32x32 for the CIFAR models, 224 (299) for torchvision."""
    if name in _LOCAL:
        return _LOCAL[name][2]
    if name in _torchvision_names():
        return _TV_SHAPES.get(name, IMAGENET_SHAPE)
    raise _unknown(name)


def create(name: str, *, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a named model with random init, or with weights from a local checkpoint path.

    Args:
        name: one of :func:`names` (torchvision classification names, ``resnet20/32/56``,
            ``vgg_chain``).
        weights: path of a local ``.pt``/``.pth`` file holding a state dict (bare, or under a
            ``state_dict``/``model`` key; a DataParallel ``module.`` prefix is stripped). Never a
            download.
        num_classes: classifier outputs; defaults to 10 for the CIFAR models, 1000 for torchvision.

    Raises:
        ModelError: unknown name, unreadable checkpoint, or weights that do not fit the model.
    """
    if name in _LOCAL:
        builder, default_classes, _ = _LOCAL[name]
        model = builder(num_classes or default_classes)
    elif name in _torchvision_names():
        import torchvision

        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    else:
        raise _unknown(name)
    if weights is not None:
        load_weights(model, weights, name=name)
    return model


def _extract_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _STATE_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _extract_state_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{path} holds no state dict (found {type(obj).__name__}); save one with torch.save(model.state_dict(), path)")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, *, name: str | None = None) -> nn.Module:
    """Load a local checkpoint into ``model`` strictly, naming every mismatch before touching it.

    Raises:
        ModelError: the file is missing, unreadable or not a state dict (one line saying what it is
            instead), keys/shapes do not match the model, or tensors hold NaN or infinite values.
    """
    label = name or type(model).__name__
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} not found; pass a local checkpoint path (fleetprune never downloads weights)")
    try:
        with warnings.catch_warnings():  # torch warns before refusing some files: the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a non-state-dict file: say what it is, not torch's multi-line advice
        raise ModelError(
            f"cannot read weights file {path!r}: {_what_file(path, exc)}; expected {_EXPECTED}"
        ) from None
    state = _extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", wrong)):
            if keys:
                parts.append(f"{title}: {_listed(keys)}")
        raise ModelError(
            f"weights in {path!r} do not fit model {label!r} ({'; '.join(parts)}); "
            "check the model name and --num-classes match the checkpoint"
        )
    bad = non_finite(state)
    if bad:
        raise ModelError(
            f"weights in {path!r} hold NaN or infinite values in {len(bad)} of {len(state)} tensors "
            f"({_listed(bad)}); pruning them would write a broken variant: pass a checkpoint from before "
            "training diverged, or no --weights for random initial weights"
        )
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), path, label)
    return model


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity, in order."""
    return [k for k, v in state.items()
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


_EXPECTED = "a state_dict saved with torch.save(model.state_dict(), path)"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _what_file(path: str, exc: Exception) -> str:
    """What a file torch cannot load as weights is, in a few words (from its first bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"it cannot be opened ({err.strerror or err})"
    if not head:
        return "it is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError):
            members = []
        if any(m.endswith(".npy") for m in members) and not any(m.endswith("data.pkl") for m in members):
            return "it is a NumPy .npz archive"
        if any(m.endswith("constants.pkl") or "/code/" in m for m in members):
            return "it is a TorchScript archive (torch.jit.save), which holds a program, not weights"
        if isinstance(exc, pickle.UnpicklingError):
            return ("it holds pickled Python objects other than tensors (e.g. a whole model saved with "
                    "torch.save(model, path)), which are not loaded because unpickling can run code")
        return f"it is a damaged PyTorch file ({_first_line(exc)})"
    if head[:1] == b"\x80":  # a pickle stream: legacy torch.save or plain pickle
        if isinstance(exc, pickle.UnpicklingError):
            return ("it holds pickled Python objects other than tensors (e.g. a whole model), which are "
                    "not loaded because unpickling can run code")
        return f"it is a damaged pickle ({_first_line(exc)})"
    return "it is not a PyTorch checkpoint (text or another format)"


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:160]
