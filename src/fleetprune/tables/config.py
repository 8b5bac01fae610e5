"""What a layer configuration is: the one key every part of fleetprune agrees on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

LAYER_OPS = ("conv", "dwconv", "linear")
"""The layers with weights: what tables held before schema version 3."""
POOL_OPS = ("maxpool", "maxpool_ceil", "avgpool", "avgpool_ceil")
"""Windowed pools; ``kh/kw, sh/sw, ph/pw`` (and ``dilation`` for max) as the module has them; ``_ceil`` is
``ceil_mode=True``."""
OP_KINDS = ("add", *POOL_OPS, "adaptive_avgpool", "act", "bn", "se", "concat")
"""The width-dependent ops that are not conv/linear layers (schema version 3). See :class:`LayerConfig`."""
OPS = LAYER_OPS + OP_KINDS
DTYPES = ("fp32", "fp16", "bf16")
MEMORY_FORMATS = ("nchw", "nhwc")
ACTS = ("none", "relu")
"""The activations a conv, linear or residual add carries fused."""
ELEMENTWISE_ACTS = ("relu", "relu6", "hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "copy")
"""What a standalone ``act`` row computes (``copy`` is a layout copy, e.g. ``.contiguous()`` after a shuffle)."""
SE_INNER = ("relu", "silu", "relu6", "hardswish", "gelu")
SE_GATES = ("sigmoid", "hardsigmoid")
SE_ACTS = tuple(f"{inner}-{gate}" for inner in SE_INNER for gate in SE_GATES)
"""A squeeze-excitation row's ``act``: ``<inner activation>-<gate>``."""
SAME_CHANNEL_OPS = ("add", *POOL_OPS, "adaptive_avgpool", "act", "bn", "concat")
"""Ops whose output channels are their input channels: the plan gives them ``cout == cin`` (not enforced here,
so a synthetic table may round one side as it rounds a conv's)."""


@dataclass(frozen=True, order=True)
class LayerConfig:
    """One measurable layer: a conv / depthwise conv (batch norm folded, activation fused), a linear,
    or one of the width-dependent ops of :data:`OP_KINDS`.

    ``groups`` is the real group count of the conv (``cin`` for ``dwconv``, 1 for a plain conv and
    for linear). For ``linear`` the spatial fields are 1 and ``in_h``/``in_w`` are 1.

    The other ops reuse the same fields, so every key keeps one format (the channels are the
    tensor's, ``in_h``/``in_w`` its input size; fields an op has no use for stay at their defaults):

    * ``add``: a residual add of two ``(batch, cin, in_h, in_w)`` tensors, ``act`` fused after it
      (``relu`` or ``none``); ``cout == cin``.
    * ``maxpool``/``avgpool`` (``_ceil``: ``ceil_mode=True``): kernel, stride, padding (and dilation
      for max) as the module has them; ``cout == cin``.
    * ``adaptive_avgpool``: ``kh``/``kw`` are the output size (1x1 for a global pool).
    * ``act``: a standalone elementwise op, ``act`` one of :data:`ELEMENTWISE_ACTS`.
    * ``bn``: a batch norm that no conv absorbs (e.g. DenseNet's pre-activation norms).
    * ``se``: a whole squeeze-excitation block (global pool, 1x1 conv ``cin -> cout``, inner
      activation, 1x1 conv ``cout -> cin``, gate, scale of the input); ``act`` is ``inner-gate``.
    * ``concat``: the channel concat whose output has ``cin`` channels, ``groups`` = its inputs.
    """

    op: str
    cin: int
    cout: int
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    ph: int = 0
    pw: int = 0
    dilation: int = 1
    groups: int = 1
    in_h: int = 1
    in_w: int = 1
    batch: int = 1
    dtype: str = "fp32"
    memory_format: str = "nchw"
    act: str = "relu"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        acts = {"act": ELEMENTWISE_ACTS, "se": SE_ACTS}.get(self.op, ACTS)
        if self.act not in acts:
            raise ValueError(f"act of a {self.op} must be one of {acts}, got {self.act!r}")
        for name in ("cin", "cout", "kh", "kw", "sh", "sw", "dilation", "groups", "in_h", "in_w", "batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.op == "dwconv" and not (self.groups == self.cin == self.cout):
            raise ValueError("a dwconv has groups == cin == cout")
        if self.op == "conv" and (self.cin % self.groups or self.cout % self.groups):
            raise ValueError(f"cin {self.cin} and cout {self.cout} must divide by groups {self.groups}")

    @property
    def key(self) -> str:
        """A stable, human-readable string that identifies the configuration across processes."""
        return (
            f"{self.op}|b{self.batch}|{self.dtype}|{self.memory_format}|k{self.kh}x{self.kw}"
            f"|s{self.sh}x{self.sw}|p{self.ph}x{self.pw}|d{self.dilation}|g{self.groups}"
            f"|h{self.in_h}w{self.in_w}|ci{self.cin}|co{self.cout}|{self.act}"
        )

    @property
    def is_layer(self) -> bool:
        """A conv, depthwise conv or linear (the kinds every table version holds)."""
        return self.op in LAYER_OPS

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output spatial size, as torch computes it."""
        if self.op == "linear":
            return (1, 1)
        if self.op == "adaptive_avgpool":
            return (self.kh, self.kw)
        if self.op in ("add", "act", "bn", "se", "concat"):
            return (self.in_h, self.in_w)
        dil = self.dilation if self.op in ("conv", "dwconv", "maxpool", "maxpool_ceil") else 1
        if self.op.endswith("_ceil"):
            oh = _ceil_out(self.in_h, self.kh, self.sh, self.ph, dil)
            ow = _ceil_out(self.in_w, self.kw, self.sw, self.pw, dil)
            return (oh, ow)
        oh = (self.in_h + 2 * self.ph - dil * (self.kh - 1) - 1) // self.sh + 1
        ow = (self.in_w + 2 * self.pw - dil * (self.kw - 1) - 1) // self.sw + 1
        return (oh, ow)

    @property
    def elements(self) -> int:
        """Elements of the input tensor(s) the op reads (for fake backends and reports)."""
        per = self.batch * self.cin * self.in_h * self.in_w
        return 2 * per if self.op == "add" else per

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass (for fake backends and reports); for the ops
        without weights, the elements they touch (a squeeze-excitation adds its two 1x1 convs)."""
        oh, ow = self.out_hw
        if self.op in LAYER_OPS:
            return self.batch * oh * ow * self.cout * (self.cin // self.groups) * self.kh * self.kw
        if self.op == "se":
            return self.elements + 2 * self.batch * self.cin * self.cout
        window = self.kh * self.kw if self.op in POOL_OPS else 1
        return max(self.elements, self.batch * self.cout * oh * ow * window)

    def with_channels(self, cin: int, cout: int) -> "LayerConfig":
        """The same layer at other channel counts (a dwconv keeps groups == cin == cout)."""
        if self.op == "dwconv":
            return dataclasses.replace(self, cin=cin, cout=cout, groups=cin)
        return dataclasses.replace(self, cin=cin, cout=cout)

    def to_row(self) -> dict[str, Any]:
        """The configuration as a flat dict of table columns (plus its ``key``)."""
        row = dataclasses.asdict(self)
        row["key"] = self.key
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "LayerConfig":
        """Rebuild from a table row (extra columns are ignored)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = row[f.name]
            kwargs[f.name] = str(value) if f.type == "str" else int(value)
        return cls(**kwargs)


def _ceil_out(size: int, k: int, s: int, p: int, d: int) -> int:
    """A pool's output size with ``ceil_mode=True`` (torch's rule: the last window must start inside)."""
    out = -(-(size + 2 * p - d * (k - 1) - 1) // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return out


CONFIG_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LayerConfig))
