"""Build the module and input that a layer configuration stands for, as deployment runs it.

A conv or depthwise-conv configuration is a conv *with bias* (batch norm folded into it) followed by
its activation, the way an inference graph runs a conv-BN-ReLU block; a linear configuration is a
linear layer with bias and its activation. The other op kinds (``tables.config.OP_KINDS``) are built
as the network runs them: a residual add of the input and a second stored tensor (plus its ReLU),
the pool, the standalone activation or batch norm, a whole squeeze-excitation block, a channel
concat of the input with stored parts. Every module takes the one input tensor, so one timing loop
serves them all. Module and input are in the configured dtype and memory format on the device, and
one smoke call proves the layer runs before anyone times it.
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


_ACTIVATIONS: dict[str, Any] = {
    "relu": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
    "hardswish": lambda: nn.Hardswish(), "hardsigmoid": lambda: nn.Hardsigmoid(), "silu": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(), "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
}


class _Copy(nn.Module):
    """A layout copy (what ``.contiguous()`` after a channel shuffle's transpose costs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _ResidualAdd(nn.Module):
    """``act(x + other)``: the residual add, the other branch held as a buffer of the same shape."""

    def __init__(self, other: torch.Tensor, relu: bool):
        super().__init__()
        self.register_buffer("other", other)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.other
        return torch.relu_(y) if self.relu else y


class _Concat(nn.Module):
    """``cat([x, *parts], dim=1)``: the input is the first of ``groups`` near-equal channel parts."""

    def __init__(self, parts: list[torch.Tensor]):
        super().__init__()
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, *self.parts], dim=1)

    def _apply(self, fn: Any, recurse: bool = True) -> "_Concat":  # move the parts with the module
        super()._apply(fn, recurse)
        self.parts = [fn(p) for p in self.parts]
        return self


class _SqueezeExcitation(nn.Module):
    """Global pool, 1x1 conv C->S, inner activation, 1x1 conv S->C, gate, scale of the input."""

    def __init__(self, channels: int, squeeze: int, inner: str, gate: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = _ACTIVATIONS[inner]()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = _ACTIVATIONS[gate]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


def concat_split(config: LayerConfig) -> list[int]:
    """The channels of each of a concat's ``groups`` inputs: near-equal parts of ``cin``, the first the largest."""
    n = max(1, min(config.groups, config.cin))
    base, extra = divmod(config.cin, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _make_op(config: LayerConfig, x: torch.Tensor) -> nn.Module:
    """The module of a non-layer op kind (``x`` is the input it will be called with)."""
    op = config.op
    if op == "add":
        return _ResidualAdd(torch.randn_like(x), config.act == "relu")
    if op in ("maxpool", "maxpool_ceil"):
        return nn.MaxPool2d((config.kh, config.kw), (config.sh, config.sw), (config.ph, config.pw),
                            dilation=config.dilation, ceil_mode=op.endswith("_ceil"))
    if op in ("avgpool", "avgpool_ceil"):
        return nn.AvgPool2d((config.kh, config.kw), (config.sh, config.sw), (config.ph, config.pw),
                            ceil_mode=op.endswith("_ceil"))
    if op == "adaptive_avgpool":
        return nn.AdaptiveAvgPool2d((config.kh, config.kw))
    if op == "act":
        return _Copy() if config.act == "copy" else _ACTIVATIONS[config.act]()
    if op == "bn":
        bn = nn.BatchNorm2d(config.cin)
        with torch.no_grad():
            bn.running_var.uniform_(0.5, 1.5)
            bn.running_mean.normal_()
        return bn
    if op == "se":
        inner, gate = config.act.split("-")
        return _SqueezeExcitation(config.cin, config.cout, inner, gate)
    if op == "concat":
        sizes = concat_split(config)
        return _Concat([torch.randn(config.batch, c, config.in_h, config.in_w) for c in sizes[1:]])
    raise ProfileError(f"configuration {config.key}: no module for op {op!r}")


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
    cout = config.cin if config.op == "se" else config.cout
    return (config.batch, cout, oh, ow)


def input_channels(config: LayerConfig) -> int:
    """Channels of the one input tensor the built module takes (a concat's first part)."""
    return concat_split(config)[0] if config.op == "concat" else config.cin


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
        if config.op == "linear":
            x = torch.randn(config.batch, config.cin, device=dev, dtype=dtype)
        else:
            x = torch.randn(config.batch, input_channels(config), config.in_h, config.in_w, device=dev, dtype=dtype)
            x = x.contiguous(memory_format=fmt)
        module = (_make_module(config) if config.is_layer else _make_op(config, x)).eval().requires_grad_(False)
        module = module.to(device=dev, dtype=dtype)
        if config.op != "linear":
            module = module.to(memory_format=fmt)
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
