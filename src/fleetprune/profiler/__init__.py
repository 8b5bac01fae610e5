"""fleetprune.profiler: measures layer configurations (and whole models) on the device this process runs on.

Knows no Ray and no model zoo, only :class:`~fleetprune.tables.config.LayerConfig`; it needs only
torch, pandas and pyarrow, so it runs on accelerator machines without Ray.
"""

from fleetprune.profiler.backends import FakeTimingBackend, TimingBackend, TorchTimingBackend
from fleetprune.profiler.device import (
    DeviceInfo,
    cpu_device,
    cuda_device,
    fake_device,
    local_devices,
    provenance,
)
from fleetprune.profiler.endtoend import deployed_forward, measure_model
from fleetprune.profiler.layers import build_layer
from fleetprune.profiler.run import profile_configs
from fleetprune.profiler.timing import (
    ALLOCATOR_ENV,
    Measurement,
    TimingProtocol,
    time_callable,
    tune_allocator,
)

__all__ = [
    "ALLOCATOR_ENV",
    "DeviceInfo",
    "FakeTimingBackend",
    "Measurement",
    "TimingBackend",
    "TimingProtocol",
    "TorchTimingBackend",
    "build_layer",
    "cpu_device",
    "cuda_device",
    "fake_device",
    "local_devices",
    "deployed_forward",
    "measure_model",
    "profile_configs",
    "provenance",
    "time_callable",
    "tune_allocator",
]
