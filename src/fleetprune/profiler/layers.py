"""Build the module and input that a layer configuration stands for, as deployment runs it.

A conv or depthwise-conv configuration is a conv *with bias* (batch norm folded into it) followed by
its activation, the way an inference graph runs a conv-BN-ReLU block; a linear configuration is a
linear layer with bias and its activation. Module and input are in the configured dtype and memory
format on the device, and one smoke call proves the layer runs before anyone times it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from fleetprune.errors import ProfileError
from fleetprune.tables.config import LayerConfig

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "nchw": torch.contiguous_format,
    "nhwc": torch.channels_last,
}


def check_supported(dtype: str, memory_format: str, device: Any, what: str) -> None:
    """Raise :class:`ProfileError` if ``dtype``/``memory_format`` cannot be profiled on ``device``.

    fp16 on the CPU is refused: PyTorch runs it through slow conversion paths that no CPU
    deployment uses, so a table of it would only mislead the pruner. CPU tables use fp32 or bf16
    (bf16 on an x86 CPU without native bf16 is allowed, with a warning).

    Args:
        what: the configuration key or model name, for the message.
    """
    if dtype not in TORCH_DTYPES:
        raise ProfileError(f"{what}: unknown dtype {dtype!r}; use one of {sorted(TORCH_DTYPES)}")
    if memory_format not in MEMORY_FORMATS:
        raise ProfileError(
            f"{what}: unknown memory format {memory_format!r}; use one of {sorted(MEMORY_FORMATS)}"
        )
    if device.kind == "cpu" and dtype == "fp16":
        raise ProfileError(
            f"{what}: fp16 is not profiled on the CPU (PyTorch emulates it there and nobody deploys "
            "it); profile fp32 or bf16 on the CPU, or fp16 on a CUDA device"
        )
    if device.kind == "cpu" and dtype == "bf16":
        _warn_emulated_bf16(device)
    if device.kind == "cuda" and not torch.cuda.is_available():
        raise ProfileError(f"{what}: device {device.key} is CUDA but no CUDA device is visible here")


_warned_bf16: set[str] = set()


def _warn_emulated_bf16(device: Any) -> None:
    flags = device.fingerprint.get("isa_flags") or []
    arch = str(device.fingerprint.get("arch", "")).lower()
    native = {"avx512_bf16", "amx_bf16"} & set(flags)
    if arch in ("x86_64", "amd64") and not native and device.key not in _warned_bf16:
        _warned_bf16.add(device.key)
        log.warning("%s has no native bf16 (avx512_bf16/amx_bf16): bf16 latencies measure "
                    "conversion paths; prefer fp32 tables for this CPU", device.key)


def _make_module(config: LayerConfig) -> nn.Module:
    if config.op == "linear":
        core: nn.Module = nn.Linear(config.cin, config.cout, bias=True)
    else:
        groups = config.cin if config.op == "dwconv" else config.groups
        core = nn.Conv2d(
            config.cin,
            config.cout,
            kernel_size=(config.kh, config.kw),
            stride=(config.sh, config.sw),
            padding=(config.ph, config.pw),
            dilation=config.dilation,
            groups=groups,
            bias=True,  # the folded batch norm's shift
        )
    if config.act == "relu":
        # In place, as torchvision's inference graphs run it.
        return nn.Sequential(core, nn.ReLU(inplace=True))
    return nn.Sequential(core)


def expected_output_shape(config: LayerConfig) -> tuple[int, ...]:
    """The output shape the built layer must produce."""
    if config.op == "linear":
        return (config.batch, config.cout)
    oh, ow = config.out_hw
    return (config.batch, config.cout, oh, ow)


def build_layer(config: LayerConfig, device: Any) -> tuple[nn.Module, torch.Tensor]:
    """The module and input of ``config`` on ``device`` (a DeviceInfo), ready to time.

    Memory format applies to 4-d conv inputs and weights; a linear layer's 2-d input
    ``(batch, cin)`` has no memory format, so nchw and nhwc build the same linear layer.

    Raises:
        ProfileError: naming ``config.key`` and why, for an unsupported dtype/format on this
            device, an empty output, or a layer that fails to run (e.g. out of memory).
    """
    what = f"configuration {config.key}"
    check_supported(config.dtype, config.memory_format, device, what)
    if config.op != "linear":
        oh, ow = config.out_hw
        if oh < 1 or ow < 1:
            raise ProfileError(
                f"{what}: the output would be empty ({oh}x{ow}); the kernel, dilation and padding "
                f"do not fit a {config.in_h}x{config.in_w} input"
            )
    dtype = TORCH_DTYPES[config.dtype]
    fmt = MEMORY_FORMATS[config.memory_format]
    dev = device.torch_device
    try:
        module = _make_module(config).eval().requires_grad_(False)
        module = module.to(device=dev, dtype=dtype)
        if config.op == "linear":
            x = torch.randn(config.batch, config.cin, device=dev, dtype=dtype)
        else:
            module = module.to(memory_format=fmt)
            x = torch.randn(config.batch, config.cin, config.in_h, config.in_w, device=dev, dtype=dtype)
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            y = module(x)
        if device.kind == "cuda":
            torch.cuda.synchronize(dev)
    except torch.cuda.OutOfMemoryError as exc:
        raise ProfileError(f"{what}: does not fit the memory of {device.key}: {exc}") from exc
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ProfileError(f"{what}: cannot run on {device.key} with torch {torch.__version__}: {exc}") from exc
    if tuple(y.shape) != expected_output_shape(config):
        raise ProfileError(
            f"{what}: built layer gives output {tuple(y.shape)}, expected {expected_output_shape(config)}"
        )
    return module, x
