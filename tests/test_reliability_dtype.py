"""fp16 asked of a CPU is refused once, up front, naming what works (issue 12, item 3)."""

from __future__ import annotations

import pytest

from fleetprune.cli import main
from fleetprune.cluster.devices import DeviceType, NodeInfo
from fleetprune.cluster.work import refuse_fp16_on_cpu
from fleetprune.errors import ProfileError
from fleetprune.tables import LayerConfig


@pytest.mark.parametrize("backend", ["fake", "torch"])
def test_profile_fp16_on_this_cpu_is_one_line_before_any_measurement(tmp_path, capsys, backend):
    root = tmp_path / "t"
    argv = ["profile", "resnet20", "--ray-address", "none", "--backend", backend, "--dtype", "fp16",
            "--threads", "1", "--tables", str(root)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: fp16 is not profiled on a CPU") and "bf16" in err and "fp32" in err
    assert len(err.splitlines()) == 1 and "rerun" not in err
    assert captured.out == ""  # no per-configuration failure lines, no summary
    assert not root.exists()  # nothing measured, nothing written


def test_the_embedded_ray_default_refuses_before_ray_starts(tmp_path, capsys, monkeypatch):
    from fleetprune.cluster import connect

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a refused dtype")

    monkeypatch.setattr(connect, "connect", no_ray)
    argv = ["profile", "resnet20", "--backend", "fake", "--dtype", "fp16", "--tables", str(tmp_path / "t")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: fp16 is not profiled on a CPU")


def test_the_runners_refuse_cpu_types_only():
    node = NodeInfo("n", "host", cpus=2, gpus=1)
    cpu = DeviceType(name="cpu-x", kind="cpu", nodes=(node,), key="cpu-x", label="x", threads=2)
    gpu = DeviceType(name="H100", kind="cuda", nodes=(node,), key="h100", label="H100")
    fp16 = lambda kind: [LayerConfig("conv", 8, 8, kh=1, kw=1, in_h=4, in_w=4, dtype="fp16")]  # noqa: E731
    refuse_fp16_on_cpu([gpu], fp16)  # fp16 on a GPU is what GPUs deploy with
    with pytest.raises(ProfileError, match=r"\(cpu-x\)"):
        refuse_fp16_on_cpu([cpu, gpu], fp16)
    bf16 = lambda kind: [LayerConfig("conv", 8, 8, kh=1, kw=1, in_h=4, in_w=4, dtype="bf16")]  # noqa: E731
    refuse_fp16_on_cpu([cpu], bf16)
