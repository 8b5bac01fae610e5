"""Which device this process measures on: a fingerprint and a stable, slug-safe device key.

The key names a partition of the latency tables (``device_key=<KEY>``), so it must be the same for
every machine of one device type and every process on it: it is built from the CPU model and the
thread count, or from the CUDA device name. Everything else that could change a measurement
(memory, compute capability, driver, CUDA, cuDNN, torch, ISA flags) goes into the fingerprint,
which is stored as table provenance rather than in the key.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fleetprune.errors import DeviceError

log = logging.getLogger(__name__)

KINDS = ("cpu", "cuda")

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

# CPU flags that decide which kernels oneDNN/MKL pick (and so the latency staircase).
_ISA_FLAGS = (
    "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2",
)


@dataclass(frozen=True)
class DeviceInfo:
    """One device this process can time layers on.

    Attributes:
        key: slug ``[a-z0-9._-]`` naming the device type, e.g. ``cpu-amd-epyc-7b13-t2``.
        name: human-readable name (CPU model or CUDA device name).
        kind: ``'cpu'`` or ``'cuda'``.
        index: CUDA device index (0 for the CPU).
        threads: intra-op threads used for CPU timing; None for CUDA devices.
        fingerprint: everything about the device and software that may change a latency.
    """

    key: str
    name: str
    kind: str
    index: int = 0
    threads: int | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeviceError(f"device kind must be one of {KINDS}, got {self.kind!r}")
        if not _KEY_RE.match(self.key):
            raise DeviceError(
                f"invalid device key {self.key!r}: use lower-case letters, digits, '.', '_' and '-'"
            )

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` to build tensors on."""
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)

    @property
    def is_fake(self) -> bool:
        """True for a device made by :func:`fake_device` (nothing real can be timed on it)."""
        return bool(self.fingerprint.get("fake", False))

    def to_dict(self) -> dict[str, Any]:
        """The device as a JSON-ready dict."""
        return asdict(self)


def slugify(text: str) -> str:
    """Lower-case ``text`` and reduce it to ``[a-z0-9._-]`` with single dashes."""
    slug = re.sub(r"[^a-z0-9._]+", "-", text.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-._")
    return slug or "unknown"


def _cpu_model_name() -> str:
    """The CPU model as the OS reports it (``/proc/cpuinfo``, ``sysctl``, then ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                # x86 says "model name"; some ARM kernels say "Model" or "Hardware".
                if name.strip().lower() in ("model name", "model", "hardware", "cpu model") and value.strip():
                    if not value.strip().isdigit():
                        return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _cpu_key_name(model: str) -> str:
    """The part of a CPU model name that identifies the type (marketing marks and clock dropped)."""
    text = re.sub(r"\((r|tm|c)\)", " ", model, flags=re.IGNORECASE)
    text = re.sub(r"@.*$", " ", text)  # the nominal clock is not the type
    text = re.sub(r"\b\d+-core\b", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(cpu|processor)\b", " ", text, flags=re.IGNORECASE)
    return slugify(text)


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip().lower() in ("flags", "features"):
                    have = set(value.split())
                    return [f for f in _ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def _libc() -> str:
    lib, version = platform.libc_ver()
    return f"{lib} {version}".strip() or "unknown"


def cpu_device(threads: int | None = None) -> DeviceInfo:
    """The CPU of this machine, timed with ``threads`` intra-op threads.

    Args:
        threads: threads to time with; None takes torch's current intra-op thread count. Workers
            (e.g. Ray actors, which set ``OMP_NUM_THREADS``) should pass it explicitly so that every
            process of a device type gets the same key.
    """
    if threads is None:
        threads = torch.get_num_threads()
    threads = int(threads)
    if threads < 1:
        raise DeviceError(f"threads must be >= 1, got {threads}")
    model = _cpu_model_name()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    fingerprint = {
        "kind": "cpu",
        "cpu_model": model,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_flags": _cpu_flags(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "torch": torch.__version__,
        "libc": _libc(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    return DeviceInfo(
        key=f"cpu-{_cpu_key_name(model)}-t{threads}",
        name=model,
        kind="cpu",
        index=0,
        threads=threads,
        fingerprint=fingerprint,
    )


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version (e.g. ``550.54.15``), or None if it cannot be read."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", fh.read())
            if match:
                return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        # The CUDA driver API version (e.g. 12040) is better than nothing.
        api = int(torch._C._cuda_getDriverVersion())  # noqa: SLF001
        return f"cuda-api-{api // 1000}.{(api % 1000) // 10}"
    except Exception:  # noqa: BLE001 - private API, absent in some builds
        return None


def cuda_device(index: int = 0) -> DeviceInfo:
    """CUDA device ``index`` of this process.

    Raises:
        DeviceError: no CUDA device is visible, or ``index`` is out of range.
    """
    if not torch.cuda.is_available():
        raise DeviceError(
            "no CUDA device is visible to this process; profile the CPU instead, or run on a GPU "
            "machine (check CUDA_VISIBLE_DEVICES and the torch build)"
        )
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"CUDA device index {index} is out of range: this process sees {count} device(s)")
    props = torch.cuda.get_device_properties(index)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    fingerprint = {
        "kind": "cuda",
        "name": props.name,
        "total_memory_mib": int(props.total_memory // (1 << 20)),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": int(props.multi_processor_count),
        "uuid": str(getattr(props, "uuid", "")) or None,
        "driver": _nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return DeviceInfo(
        key=f"cuda-{slugify(props.name)}",
        name=props.name,
        kind="cuda",
        index=index,
        threads=None,
        fingerprint=fingerprint,
    )


def local_devices(threads: int | None = None) -> list[DeviceInfo]:
    """The CPU (timed with ``threads``) followed by every CUDA device this process sees."""
    devices = [cpu_device(threads)]
    if torch.cuda.is_available():
        devices.extend(cuda_device(i) for i in range(torch.cuda.device_count()))
    return devices


def fake_device(key: str, name: str, kind: str = "cpu", threads: int | None = 1) -> DeviceInfo:
    """A made-up device for :class:`~fleetprune.profiler.backends.FakeTimingBackend` (tests, benchmarks).

    Its fingerprint says ``fake: true`` so its tables can never pass for real measurements, and
    :class:`~fleetprune.profiler.backends.TorchTimingBackend` refuses it.
    """
    return DeviceInfo(
        key=key,
        name=name,
        kind=kind,
        index=0,
        threads=threads if kind == "cpu" else None,
        fingerprint={"kind": kind, "fake": True, "name": name, "torch": torch.__version__},
    )


def provenance(device: DeviceInfo, protocol: Any = None) -> dict[str, Any]:
    """The table-wide provenance of measurements taken on ``device`` with ``protocol``.

    Returns a JSON-ready dict with the fields of ``tables.schema.PROVENANCE_FIELDS`` (device_key,
    device_name, fingerprint, torch, cuda, cudnn, driver, threads, timing_protocol,
    schema_version) plus ``timing_method`` and ``allocator``. ``protocol`` is a
    :class:`~fleetprune.profiler.timing.TimingProtocol` or None (fake backends).
    """
    from fleetprune.profiler.timing import allocator_state

    try:
        from fleetprune.tables.schema import SCHEMA_VERSION as schema_version
    except ImportError:  # the tables schema is optional for the profiler alone
        schema_version = None
    fp = device.fingerprint
    is_cuda = device.kind == "cuda"
    if device.is_fake:
        method = "fake"
    else:
        method = "cuda_event" if is_cuda else "torch.utils.benchmark"
    return {
        "device_key": device.key,
        "device_name": device.name,
        "fingerprint": dict(fp),
        "torch": fp.get("torch", torch.__version__),
        "cuda": fp.get("cuda") if is_cuda else None,
        "cudnn": fp.get("cudnn") if is_cuda else None,
        "driver": fp.get("driver") if is_cuda else None,
        "threads": device.threads,
        "timing_protocol": protocol.to_dict() if protocol is not None else None,
        "timing_method": method,
        "allocator": allocator_state() if device.kind == "cpu" and not device.is_fake else None,
        "schema_version": schema_version,
    }
