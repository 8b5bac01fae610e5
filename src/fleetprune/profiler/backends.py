"""Timing backends: what turns a layer configuration into a Measurement on one device.

``TorchTimingBackend`` builds the layer and times it for real. ``FakeTimingBackend`` computes a
deterministic latency from MACs so that cluster placement tests and benchmarks can run without
timing anything; its device fingerprint says ``fake`` so its tables never pass for real ones.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from typing import Any, Protocol, runtime_checkable

import torch

from fleetprune.errors import DeviceError, ProfileError
from fleetprune.profiler.device import DeviceInfo, cpu_device
from fleetprune.profiler.layers import build_layer
from fleetprune.profiler.timing import (
    Measurement,
    TimingProtocol,
    cold_copies,
    last_level_cache_bytes,
    time_callable,
    tune_allocator,
)
from fleetprune.tables.config import LayerConfig

log = logging.getLogger(__name__)


@runtime_checkable
class TimingBackend(Protocol):
    """Anything that measures layer configurations on one device."""

    device: DeviceInfo

    def measure(self, config: LayerConfig) -> Measurement:
        """Latency statistics of ``config`` on ``self.device``."""
        ...


class TorchTimingBackend:
    """Builds each configuration with torch and times it on a real local device.

    On the CPU it tunes the glibc allocator in this process and times with ``device.threads``
    threads; on CUDA it times with CUDA events and ``cudnn.benchmark`` on.
    """

    def __init__(self, device: DeviceInfo | None = None, protocol: TimingProtocol | None = None):
        device = device if device is not None else cpu_device()
        if device.is_fake:
            raise DeviceError(f"device {device.key} is fake: time it with FakeTimingBackend")
        if device.kind == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {device.key} is CUDA but this process sees no CUDA device")
        self.device = device
        self.protocol = protocol if protocol is not None else TimingProtocol()
        self._llc: int | None = None
        if device.kind == "cpu":
            tune_allocator()

    def measure(self, config: LayerConfig) -> Measurement:
        """Build ``config``, warm it up and time it under ``torch.inference_mode``.

        With the protocol's ``cache='cold'``: as many copies of the layer (weights and input) as
        :func:`~fleetprune.profiler.timing.cold_copies` says, called in rotation so each call finds its
        copy evicted by the others, and on CUDA L2 flushed before every call.

        Raises:
            ProfileError: the layer cannot be built or fails while being timed.
        """
        module, x = build_layer(config, self.device)
        copies = [(module, x)]
        cold = self.protocol.cache == "cold"
        if cold:
            n = cold_copies(footprint_bytes(module, x, config), self._cache_bytes())
            # copies of the built (and smoke-tested) layer: cheaper than building each again
            copies += [(copy.deepcopy(module), x.clone(memory_format=torch.preserve_format)) for _ in range(n - 1)]
        try:
            with torch.inference_mode():
                if len(copies) == 1:
                    return time_callable(lambda: module(x), self.device, self.protocol, flush=cold)
                ring = itertools.cycle(copies)

                def call() -> Any:
                    m, inp = next(ring)
                    return m(inp)

                return time_callable(call, self.device, self.protocol, flush=cold)
        except RuntimeError as exc:
            raise ProfileError(f"configuration {config.key}: failed while timing on {self.device.key}: {exc}") from exc
        finally:
            del module, x, copies

    def _cache_bytes(self) -> int:
        if self._llc is None:
            self._llc = last_level_cache_bytes(self.device.kind, self.device.index or 0)
        return self._llc

    def measure_networks(self, models: "list[torch.nn.Module]", input_shape: "tuple[int, ...]",
                         dtype: str = "fp32", memory_format: str = "nchw", rounds: int = 3) -> list[Measurement]:
        """Whole networks side by side, as deployed, with this backend's protocol
        (:func:`~fleetprune.profiler.endtoend.measure_networks`)."""
        from fleetprune.profiler.endtoend import measure_networks

        return measure_networks(models, input_shape, self.device, dtype, memory_format, self.protocol, rounds=rounds)

    def __repr__(self) -> str:
        return f"TorchTimingBackend({self.device.key!r}, {self.protocol})"


def footprint_bytes(module: torch.nn.Module, x: torch.Tensor, config: LayerConfig) -> int:
    """Bytes one call of a built layer touches: its weights and buffers, its input and its output."""
    held = [*module.parameters(), *module.buffers(), *getattr(module, "parts", ())]  # a concat's stored parts
    weights = sum(t.numel() * t.element_size() for t in held)
    oh, ow = config.out_hw
    out = config.batch * (config.cin if config.op == "se" else config.cout) * oh * ow * x.element_size()
    return int(weights + x.numel() * x.element_size() + out)


_DTYPE_FACTOR = {"fp32": 1.0, "bf16": 0.6, "fp16": 0.5}


class FakeTimingBackend:
    """A deterministic stand-in for timing: latency from MACs plus overhead, for tests and benchmarks only.

    Channel counts are rounded up to the next multiple of 16 first (cin and cout; a depthwise
    conv's per-group input stays 1), so latency is a staircase in channels like real CPU kernels.

    Args:
        device: the (usually :func:`~fleetprune.profiler.device.fake_device`) device it pretends to be.
        cost_s: seconds to sleep per measurement, to simulate how long profiling takes.
        speed: throughput multiplier, to give fake devices of a fleet different speeds.
    """

    STEP = 16
    OVERHEAD_MS = 0.01
    MACS_PER_MS = 2.0e7  # 20 GMAC/s
    ELEMENTS_PER_MS = 1.0e6  # memory traffic term

    def __init__(self, device: DeviceInfo, cost_s: float = 0.0, *, speed: float = 1.0):
        if cost_s < 0 or speed <= 0:
            raise ValueError("cost_s must be >= 0 and speed > 0")
        self.device = device
        self.cost_s = float(cost_s)
        self.speed = float(speed)
        self.protocol = None
        self.calls = 0

    def latency_ms(self, config: LayerConfig) -> float:
        """The fake latency of ``config`` (its minimum and median alike).

        An op without weights (residual add, pool, activation, ...) costs the overhead plus its memory
        traffic (elements in and out), a squeeze-excitation also its two 1x1 convs' MACs.
        """
        if not config.is_layer:
            oh, ow = config.out_hw
            c = math.ceil(config.cin / self.STEP) * self.STEP
            moved = config.elements * c / config.cin + config.batch * c * oh * ow
            macs = 2 * config.batch * c * math.ceil(config.cout / self.STEP) * self.STEP if config.op == "se" else 0
            factor = _DTYPE_FACTOR[config.dtype] * (0.9 if config.memory_format == "nhwc" else 1.0)
            return self.OVERHEAD_MS + (macs / self.MACS_PER_MS + moved / self.ELEMENTS_PER_MS) * factor / self.speed
        step = self.STEP
        cin = math.ceil(config.cin / step) * step
        cout = math.ceil(config.cout / step) * step
        oh, ow = config.out_hw
        per_group_in = 1.0 if config.op == "dwconv" else cin / config.groups
        macs = config.batch * oh * ow * config.kh * config.kw * cout * per_group_in
        elements = config.batch * (cin * config.in_h * config.in_w + cout * oh * ow)
        factor = _DTYPE_FACTOR[config.dtype] * (0.9 if config.memory_format == "nhwc" else 1.0)
        work_ms = (macs / self.MACS_PER_MS + elements / self.ELEMENTS_PER_MS) * factor / self.speed
        return self.OVERHEAD_MS + work_ms

    def measure(self, config: LayerConfig) -> Measurement:
        """The fake measurement of ``config`` (after sleeping ``cost_s``)."""
        self.calls += 1
        if self.cost_s:
            time.sleep(self.cost_s)
        lat = self.latency_ms(config)
        return Measurement(median_ms=lat, p10_ms=lat, p90_ms=lat * 1.01, n=15, min_ms=lat)

    # A network runs its layers slower than the sum of their fake rows, the more so the more weight a
    # layer streams (as real ones do, their weights cold in cache): a shape the table alone misses,
    # so that closed-loop verification has something to correct. Deterministic, like the rows.
    NETWORK_OVERHEAD_MS = 0.05
    NETWORK_STREAM_FACTOR = 0.6
    NETWORK_STREAM_WEIGHTS = 64 * 64 * 9

    def measure_networks(self, models: "list[torch.nn.Module]", input_shape: "tuple[int, ...]",
                         dtype: str = "fp32", memory_format: str = "nchw", rounds: int = 1) -> list[Measurement]:
        """Fake end-to-end measurements of whole networks (for placement tests only; sleeps ``cost_s`` each;
        ``rounds`` is ignored: the figures are the same every time).

        Every Conv2d and Linear that runs is priced with :meth:`latency_ms` at the shapes it sees
        (forward hooks, batch from ``input_shape``), scaled up by how much weight it holds, plus a
        fixed overhead.
        """
        shape = tuple(int(s) for s in input_shape)
        shape = (1, *shape) if len(shape) == 3 else shape
        out = []
        for model in models:
            self.calls += 1
            if self.cost_s:
                time.sleep(self.cost_s)
            total = self.NETWORK_OVERHEAD_MS
            for config in _network_configs(model, shape, dtype, memory_format):
                weights = config.cin * config.cout * config.kh * config.kw / max(1, config.groups)
                stream = self.NETWORK_STREAM_FACTOR * weights / (weights + self.NETWORK_STREAM_WEIGHTS)
                total += self.latency_ms(config) * (1.0 + stream)
            out.append(Measurement(median_ms=total, p10_ms=total, p90_ms=total * 1.01, n=15, min_ms=total))
        return out

    def __repr__(self) -> str:
        return f"FakeTimingBackend({self.device.key!r}, cost_s={self.cost_s}, speed={self.speed})"


def _network_configs(model: torch.nn.Module, shape: tuple[int, ...], dtype: str, memory_format: str) -> list[LayerConfig]:
    """The layer configuration of every Conv2d and Linear a forward pass at ``shape`` runs."""
    from torch import nn

    found: list[LayerConfig] = []

    def conv_hook(m: nn.Conv2d, inputs: tuple, _out: torch.Tensor) -> None:
        _, cin, h, w = inputs[0].shape
        depthwise = m.groups == cin and m.groups > 1 and m.out_channels % cin == 0
        found.append(LayerConfig("dwconv" if depthwise else "conv", cin=cin, cout=m.out_channels,
                                 kh=m.kernel_size[0], kw=m.kernel_size[1], sh=m.stride[0], sw=m.stride[1],
                                 ph=int(m.padding[0]), pw=int(m.padding[1]), dilation=m.dilation[0],
                                 groups=m.groups, in_h=h, in_w=w, batch=shape[0], dtype=dtype,
                                 memory_format=memory_format))

    def linear_hook(m: nn.Linear, inputs: tuple, _out: torch.Tensor) -> None:
        found.append(LayerConfig("linear", cin=m.in_features, cout=m.out_features, batch=shape[0], dtype=dtype,
                                 memory_format=memory_format, act="none"))

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
    return found
