"""What a layer configuration is: the one key every part of fleetprune agrees on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

OPS = ("conv", "dwconv", "linear")
DTYPES = ("fp32", "fp16", "bf16")
MEMORY_FORMATS = ("nchw", "nhwc")
ACTS = ("none", "relu")


@dataclass(frozen=True, order=True)
class LayerConfig:
    """One measurable layer: a conv / depthwise conv (batch norm folded, activation fused) or a linear.

    ``groups`` is the real group count of the conv (``cin`` for ``dwconv``, 1 for a plain conv and
    for linear). For ``linear`` the spatial fields are 1 and ``in_h``/``in_w`` are 1.
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
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {self.act!r}")
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
    def out_hw(self) -> tuple[int, int]:
        """Output spatial size, as torch computes it."""
        if self.op == "linear":
            return (1, 1)
        oh = (self.in_h + 2 * self.ph - self.dilation * (self.kh - 1) - 1) // self.sh + 1
        ow = (self.in_w + 2 * self.pw - self.dilation * (self.kw - 1) - 1) // self.sw + 1
        return (oh, ow)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass (for fake backends and reports)."""
        oh, ow = self.out_hw
        return self.batch * oh * ow * self.cout * (self.cin // self.groups) * self.kh * self.kw

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


CONFIG_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LayerConfig))
