"""Device fingerprint, device key and provenance of the profiler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fleetprune.errors import DeviceError
from fleetprune.profiler import (
    FakeTimingBackend,
    TimingProtocol,
    TorchTimingBackend,
    cpu_device,
    cuda_device,
    fake_device,
    local_devices,
    provenance,
)
from fleetprune.profiler.device import DeviceInfo, _cpu_key_name, slugify
from fleetprune.tables.schema import DEVICE_KEY_RE, PROVENANCE_FIELDS, SCHEMA_VERSION

_CHILD = """
import json, sys
import fleetprune.profiler as p
bad = sorted(m for m in sys.modules
             if m == "ray" or m.startswith(("ray.", "fleetprune.pruner", "fleetprune.models", "fleetprune.cluster")))
print(json.dumps({"key": p.cpu_device(2).key, "key1": p.cpu_device(1).key, "forbidden": bad}))
"""


def test_cpu_key_is_a_stable_slug_with_threads():
    dev = cpu_device(2)
    assert DEVICE_KEY_RE.match(dev.key)
    assert dev.key.startswith("cpu-") and dev.key.endswith("-t2")
    assert cpu_device(2).key == dev.key
    assert cpu_device(1).key == dev.key[: -len("-t2")] + "-t1"
    assert dev.threads == 2 and dev.kind == "cpu"
    assert dev.fingerprint["torch"] == torch.__version__
    assert dev.fingerprint["threads"] == 2


def test_key_equal_in_another_process_and_profiler_imports_no_ray_or_pruner():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=120)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["key"] == cpu_device(2).key
    assert child["key1"] == cpu_device(1).key
    assert child["forbidden"] == []


@pytest.mark.parametrize(
    "model, expected",
    [
        ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13"),
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "intel-xeon-platinum-8375c"),
        ("AMD EPYC", "amd-epyc"),
        ("Apple M2 Pro", "apple-m2-pro"),
    ],
)
def test_cpu_key_name_drops_marks_and_clock(model, expected):
    assert _cpu_key_name(model) == expected


def test_slugify_cuda_names():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    assert DEVICE_KEY_RE.match(slugify("  Weird/Name (x) ++ "))


def test_invalid_key_and_kind_are_refused():
    with pytest.raises(DeviceError):
        DeviceInfo(key="CPU Foo", name="x", kind="cpu")
    with pytest.raises(DeviceError):
        DeviceInfo(key="tpu-v5", name="x", kind="tpu")
    with pytest.raises(DeviceError):
        cpu_device(0)


def test_provenance_has_every_table_field_and_is_json():
    dev = cpu_device(1)
    proto = TimingProtocol.quick()
    prov = provenance(dev, proto)
    assert set(PROVENANCE_FIELDS) <= set(prov)
    assert prov["device_key"] == dev.key and prov["device_name"] == dev.name
    assert prov["threads"] == 1
    assert prov["schema_version"] == SCHEMA_VERSION
    assert prov["timing_protocol"] == proto.to_dict()
    assert prov["timing_method"] == "torch.utils.benchmark"
    assert prov["cuda"] is None and prov["driver"] is None  # a CPU table carries no GPU versions
    assert json.loads(json.dumps(prov)) == prov


def test_fake_device_is_marked_and_refused_by_the_torch_backend():
    dev = fake_device("fake-a100", "Fake A100", kind="cuda")
    assert dev.is_fake and dev.kind == "cuda" and dev.threads is None
    assert provenance(dev, None)["timing_method"] == "fake"
    with pytest.raises(DeviceError, match="fake"):
        TorchTimingBackend(dev)
    assert FakeTimingBackend(dev).device is dev
    with pytest.raises(DeviceError):
        fake_device("Bad Key", "x")


def test_local_devices_start_with_the_cpu():
    devs = local_devices(threads=1)
    assert devs[0].key == cpu_device(1).key
    assert len(devs) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_gpu_raises_device_error():
    with pytest.raises(DeviceError, match="no CUDA device"):
        cuda_device(0)


@pytest.mark.gpu
def test_cuda_device_fingerprint():
    dev = cuda_device(0)
    assert dev.key.startswith("cuda-") and DEVICE_KEY_RE.match(dev.key)
    assert dev.key == cuda_device(0).key
    fp = dev.fingerprint
    for field in ("name", "total_memory_mib", "compute_capability", "driver", "cuda", "cudnn", "torch"):
        assert field in fp
    prov = provenance(dev, TimingProtocol())
    assert prov["timing_method"] == "cuda_event" and prov["cuda"] == torch.version.cuda
    with pytest.raises(DeviceError):
        cuda_device(torch.cuda.device_count())
