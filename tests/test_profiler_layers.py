"""The layer a configuration stands for: shapes, dtypes, memory formats, and what cannot be built."""

from __future__ import annotations

import pytest
import torch

from fleetprune.errors import ProfileError
from fleetprune.profiler import build_layer, cpu_device
from fleetprune.tables.config import LayerConfig

CPU = cpu_device(1)


def _conv(cin=8, cout=16, k=3, s=1, p=1, hw=12, **kw):
    return LayerConfig("conv", cin, cout, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, in_h=hw, in_w=hw, **kw)


CASES = [
    (_conv(), (1, 16, 12, 12)),
    (_conv(memory_format="nhwc"), (1, 16, 12, 12)),
    (_conv(s=2), (1, 16, 6, 6)),
    (_conv(k=5, p=2, hw=9), (1, 16, 9, 9)),
    (_conv(k=3, p=0, hw=9, batch=3), (3, 16, 7, 7)),
    (_conv(k=1, s=2, p=0, hw=9), (1, 16, 5, 5)),
    (_conv(dilation=2, p=2), (1, 16, 12, 12)),
    (_conv(cin=8, cout=16, groups=2), (1, 16, 12, 12)),
    (LayerConfig("conv", 8, 16, kh=1, kw=3, ph=0, pw=1, in_h=6, in_w=10), (1, 16, 6, 10)),
    (LayerConfig("dwconv", 16, 16, kh=3, kw=3, ph=1, pw=1, groups=16, in_h=10, in_w=10), (1, 16, 10, 10)),
    (LayerConfig("dwconv", 16, 16, kh=3, kw=3, sh=2, sw=2, ph=1, pw=1, groups=16, in_h=10, in_w=10,
                 memory_format="nhwc"), (1, 16, 5, 5)),
    (_conv(dtype="bf16", memory_format="nhwc"), (1, 16, 12, 12)),
    (LayerConfig("linear", 64, 10, batch=4, act="none"), (4, 10)),
    (LayerConfig("linear", 64, 10, batch=2, dtype="bf16"), (2, 10)),
]


@pytest.mark.parametrize("config, shape", CASES, ids=[c.key for c, _ in CASES])
def test_built_layer_has_the_configured_shape_dtype_and_format(config, shape):
    module, x = build_layer(config, CPU)
    assert shape == (config.batch, config.cout, *config.out_hw)[: len(shape)]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config.dtype]
    assert x.dtype == dtype
    with torch.inference_mode():
        y = module(x)
    assert tuple(y.shape) == shape
    assert y.dtype == dtype
    core = module[0]
    assert core.bias is not None  # batch norm folded into the conv/linear
    if config.op != "linear":
        assert x.shape == (config.batch, config.cin, config.in_h, config.in_w)
        assert core.groups == config.groups
        assert (core.stride, core.padding) == ((config.sh, config.sw), (config.ph, config.pw))
        fmt = torch.channels_last if config.memory_format == "nhwc" else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)
        assert core.weight.is_contiguous(memory_format=fmt)
        assert y.is_contiguous(memory_format=fmt)
        if config.memory_format == "nhwc" and config.cin > 1:
            assert not x.is_contiguous()  # really channels_last, not the default layout
    if config.act == "relu":
        assert (y >= 0).all()
    else:
        assert (y < 0).any()


def test_fp16_on_cpu_raises_profile_error_naming_the_config():
    config = _conv(dtype="fp16")
    with pytest.raises(ProfileError) as info:
        build_layer(config, CPU)
    assert config.key in str(info.value)
    assert "fp16" in str(info.value) and "bf16" in str(info.value)


def test_empty_output_raises_profile_error_naming_the_config():
    config = LayerConfig("conv", 4, 4, kh=5, kw=5, in_h=3, in_w=3)
    with pytest.raises(ProfileError, match="empty") as info:
        build_layer(config, CPU)
    assert config.key in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_layer_in_dtype_and_channels_last(dtype):
    from fleetprune.profiler import cuda_device

    config = _conv(cin=32, cout=64, dtype=dtype, memory_format="nhwc")
    module, x = build_layer(config, cuda_device(0))
    with torch.inference_mode():
        y = module(x)
    assert y.is_cuda and y.shape == (1, 64, 12, 12)
    assert y.is_contiguous(memory_format=torch.channels_last)
