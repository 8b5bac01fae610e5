"""Latency tables for the prune tests: fake devices with different cost shapes, and this CPU.

Tables are built once per test session (cached here by their arguments) in a temporary folder.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Callable

from fleetprune import models
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import LayerConfig, TableStore, make_row

_CACHE: dict[tuple, str] = {}
CPU_THREADS = 1


def _tmpdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def plan_configs(model: str, batch: int = 1, round_to: int = 8, input_size: int | None = None,
                 max_choices: int = 32) -> list[LayerConfig]:
    """Every configuration the plan of ``model`` (10 classes) can reach."""
    shape = models.input_shape(model)
    if input_size:
        shape = (shape[0], input_size, input_size)
    net = models.create(model, num_classes=10)
    plan = build_plan(net, example_input(shape, batch), round_to=round_to, max_choices=max_choices)
    return plan.configs()


def compute_bound_ms(c: LayerConfig) -> float:
    """A device whose cost is MACs on a 16-channel staircase (like a CPU)."""
    cin = -(-c.cin // 16) * 16 if c.op != "dwconv" else c.cin
    cout = -(-c.cout // 16) * 16
    return 0.01 + c.with_channels(cin, cout).macs / 2e7 if c.op != "dwconv" else 0.01 + c.macs / 2e7


def memory_bound_ms(c: LayerConfig) -> float:
    """A device whose cost is activation traffic plus a large per-layer launch cost (like a small GPU)."""
    oh, ow = c.out_hw
    return 0.005 + c.batch * (c.cin * c.in_h * c.in_w + 4 * c.cout * oh * ow) / 1e6


def write_table(root: str, device_key: str, configs: list[LayerConfig], fn: Callable[[LayerConfig], float]) -> None:
    rows = [make_row(c, device_key, fn(c), fn(c) * 0.99, fn(c) * 1.01, 15) for c in configs]
    TableStore(root).write(device_key, rows, {"device_key": device_key, "device_name": device_key,
                                             "fingerprint": {"fake": True}, "threads": 1})


def fake_tables(model: str = "resnet20", batch: int = 1) -> str:
    """A root with two fake devices of different cost shapes, for ``model`` at round_to 8."""
    key = ("fake", model, batch)
    if key not in _CACHE:
        root = _tmpdir("fp-fake-tables-")
        configs = plan_configs(model, batch)
        write_table(root, "fake-compute", configs, compute_bound_ms)
        write_table(root, "fake-memory", configs, memory_bound_ms)
        _CACHE[key] = root
    return _CACHE[key]


def cpu_tables(model_names: tuple[str, ...] = ("resnet20",), batch: int = 1, round_to: int = 8,
               input_size: int | None = None, max_choices: int = 32) -> str:
    """A root with this CPU's table (one thread) for the models' configurations, quick protocol.

    One thread: on the shared 2-core test machines two OpenMP threads contend with other processes
    and a 0.2 ms conv can take 30 ms; one thread keeps the rough numbers rough, not absurd.
    """
    from fleetprune.profiler import TimingProtocol, TorchTimingBackend, cpu_device, profile_configs, provenance

    key = ("cpu", model_names, batch, round_to, input_size, max_choices)
    if key not in _CACHE:
        root = _tmpdir("fp-cpu-tables-")
        configs = list(dict.fromkeys(c for m in model_names
                                     for c in plan_configs(m, batch, round_to, input_size, max_choices)))
        device, protocol = cpu_device(CPU_THREADS), TimingProtocol.quick()
        rows = list(profile_configs(configs, TorchTimingBackend(device, protocol)))
        TableStore(root).write(device.key, rows, provenance(device, protocol))
        _CACHE[key] = root
    return _CACHE[key]
