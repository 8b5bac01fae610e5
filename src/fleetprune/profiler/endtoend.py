"""End-to-end latency of whole networks (a pruned variant, the dense model) with the layer protocol."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fleetprune.deploy import fold_batchnorm
from fleetprune.errors import ProfileError
from fleetprune.profiler.device import DeviceInfo
from fleetprune.profiler.layers import MEMORY_FORMATS, TORCH_DTYPES, check_supported
from fleetprune.profiler.timing import Measurement, TimingProtocol, time_callable, tune_allocator

log = logging.getLogger(__name__)


def _full_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    return (1, *shape) if len(shape) == 3 else shape


def deployed_forward(
    model: nn.Module,
    input_shape: Sequence[int],
    device: DeviceInfo,
    dtype: str = "fp32",
    memory_format: str = "nchw",
    fold_bn: bool = True,
) -> Callable[[], Any]:
    """A ready-to-time forward pass of a copy of ``model`` as deployed: eval mode, BN folded (``fold_bn``),
    on the device in ``dtype`` and ``memory_format``, run once so that it fails here with a clear
    error rather than inside a timer. Call it under ``torch.inference_mode()``.

    Prepare once and time the callable many times (interleaved with other networks, say): every
    preparation makes new weight tensors, and the first calls on new tensors are slow.

    Raises:
        ProfileError: the model cannot run with that input, dtype or memory format on the device.
    """
    shape = _full_shape(input_shape)
    what = f"model {type(model).__name__} with input {shape}"
    check_supported(dtype, memory_format, device, what)
    if device.is_fake:
        raise ProfileError(f"{what}: device {device.key} is fake; measure on a real device")
    if device.kind == "cpu":
        tune_allocator()
    torch_dtype = TORCH_DTYPES[dtype]
    dev = device.torch_device
    try:
        net = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - some scripted modules refuse deepcopy
        raise ProfileError(f"{what}: cannot copy the model to measure it: {exc}") from exc
    try:
        net = net.eval().requires_grad_(False)
        if fold_bn:
            net, _ = fold_batchnorm(net, inplace=True)
        net = net.to(device=dev, dtype=torch_dtype)
        x = torch.randn(*shape, device=dev, dtype=torch_dtype)
        if len(shape) == 4:
            fmt = MEMORY_FORMATS[memory_format]
            net = net.to(memory_format=fmt)
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            net(x)
    except torch.cuda.OutOfMemoryError as exc:
        raise ProfileError(f"{what}: does not fit the memory of {device.key}: {exc}") from exc
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        raise ProfileError(f"{what}: cannot run on {device.key} in {dtype}/{memory_format}: {exc}") from exc
    return lambda: net(x)


def measure_networks(
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    device: DeviceInfo,
    dtype: str = "fp32",
    memory_format: str = "nchw",
    protocol: TimingProtocol | None = None,
    fold_bn: bool = True,
    rounds: int = 3,
) -> list[Measurement]:
    """Time several networks side by side: prepared once each, then ``rounds`` interleaved rounds
    (network 1, 2, ..., n, then again), keeping each network's best round (the protocol's statistic).

    Whole-network latency on a shared machine drifts by 10-30% within a minute, so figures that are
    compared (a variant against its dense model, as a budget "0.5 of dense" means) must come from
    the same rounds; interference only ever adds time, so the lowest round is the least disturbed.

    Args:
        models: the networks; none is changed (each is copied, see :func:`deployed_forward`).
        input_shape: ``(N, C, H, W)``; a 3-tuple ``(C, H, W)`` means batch 1.
        device, dtype, memory_format, protocol, fold_bn: as :func:`measure_model`.
        rounds: interleaved rounds (at least 1).

    Raises:
        ProfileError: a network cannot run with that input, dtype or memory format on the device.
    """
    protocol = protocol if protocol is not None else TimingProtocol()
    forwards = [deployed_forward(m, input_shape, device, dtype, memory_format, fold_bn) for m in models]
    best: list[Measurement | None] = [None] * len(forwards)
    try:
        with torch.inference_mode():
            for _ in range(max(1, int(rounds))):
                for i, forward in enumerate(forwards):
                    m = time_callable(forward, device, protocol)
                    if best[i] is None or protocol.latency(m) < protocol.latency(best[i]):
                        best[i] = m
    except torch.cuda.OutOfMemoryError as exc:
        raise ProfileError(f"networks do not fit the memory of {device.key}: {exc}") from exc
    return [m for m in best if m is not None]


def measure_model(
    model: nn.Module,
    input_shape: Sequence[int],
    device: DeviceInfo,
    dtype: str = "fp32",
    memory_format: str = "nchw",
    protocol: TimingProtocol | None = None,
    fold_bn: bool = True,
    rounds: int = 3,
) -> Measurement:
    """Time one forward pass of ``model`` on ``device`` as deployed: eval mode, inference mode.

    Batch norm is folded as deployment does (``fold_bn``); nothing else is fused. The caller's model is
    not changed (a copy is moved to the device, dtype and memory format: :func:`deployed_forward`).

    Args:
        input_shape: the full input shape ``(N, C, H, W)``; a 3-tuple ``(C, H, W)`` means batch 1.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (fp16 only on CUDA).
        memory_format: ``nchw`` or ``nhwc`` (channels_last, for 4-d inputs).
        protocol: defaults to ``TimingProtocol()``.
        fold_bn: fold every conv/linear + BatchNorm pair into the conv first, as deployment engines
            do and as the layer tables are measured; a model torch.fx cannot trace runs unfolded
            (logged).
        rounds: time the network this many times and keep the round with the lowest latency (the
            protocol's statistic). Interference from other work on a shared machine only ever adds
            time, so the lowest is the least disturbed one.

    Raises:
        ProfileError: the model cannot run with that input, dtype or memory format on the device.
    """
    return measure_networks([model], input_shape, device, dtype, memory_format, protocol, fold_bn, rounds)[0]
