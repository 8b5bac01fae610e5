"""The setting a model is profiled, pruned and validated at, resolved once.

A setting is what shapes the plan and the table rows it needs: batch, dtype, memory format, the
channel unit (``round_to``), the most width choices per group, and one sample's input shape. The
verbs resolve it here from what the user asked and what the table holds (as timm resolves a data
config once from arguments and the model), and every message that names a ``fleetprune profile``
command spells the whole setting, so running that command measures what was missing.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Sequence

from fleetprune.errors import MissingConfigsError, TableError
from fleetprune.tables.table import missing_message

DEFAULT_MAX_CHOICES = 32


def default_round_to(dtype: str) -> int:
    """The width unit: 16 channels for fp32, 8 for fp16/bf16 (tensor-core and vector widths)."""
    return 16 if dtype == "fp32" else 8


@dataclass(frozen=True)
class Setting:
    """One resolved setting (see the module docstring).

    Attributes:
        batch, dtype, memory_format: as the table rows hold them.
        round_to: the width unit (``default_round_to(dtype)`` unless asked).
        max_choices: most width choices per channel group.
        input_shape: one sample's ``(C, H, W)``.
        default_shape: the model's own default ``(C, H, W)`` (so messages name ``--input-size`` only when needed).
        num_classes: classifier outputs when not the model's default.
    """

    batch: int
    dtype: str
    memory_format: str
    round_to: int
    max_choices: int
    input_shape: tuple[int, ...]
    default_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        """``(batch, C, H, W)``."""
        return (self.batch, *self.input_shape)

    @property
    def key(self) -> tuple[int, str, str]:
        """(batch, dtype, memory format): what selects a table's rows."""
        return (self.batch, self.dtype, self.memory_format)

    def profile_flags(self) -> str:
        """The ``fleetprune profile`` options that measure exactly this setting's configurations."""
        flags = [f"--batch {self.batch}", f"--dtype {self.dtype}", f"--memory-format {self.memory_format}",
                 f"--round-to {self.round_to}"]
        if self.max_choices != DEFAULT_MAX_CHOICES:
            flags.append(f"--max-choices {self.max_choices}")
        if self.default_shape is None or tuple(self.default_shape[1:]) != tuple(self.input_shape[1:]):
            h, w = self.input_shape[1:]
            flags.append(f"--input-size {h}" if h == w else f"--input-size {h}x{w}")
        if self.num_classes is not None:
            flags.append(f"--num-classes {self.num_classes}")
        return " ".join(flags)

    def profile_command(self, model_name: str, root: str, device_key: str) -> str:
        """The command that measures this setting of ``model_name`` on ``device_key`` into ``root``."""
        return (f"fleetprune profile {shlex.quote(model_name)} --tables {shlex.quote(root)} --devices {device_key} "
                f"{self.profile_flags()}")

    def correction_key(self) -> dict[str, Any]:
        """What a stored validate correction must have been fitted for (besides the model)."""
        return {"batch": self.batch, "dtype": self.dtype, "memory_format": self.memory_format,
                "input_shape": list(self.input_shape)}

    def report(self) -> dict[str, Any]:
        """The fields report.json and widths.json record."""
        return {"batch": self.batch, "dtype": self.dtype, "memory_format": self.memory_format,
                "round_to": self.round_to, "max_choices": self.max_choices, "input_shape": list(self.input_shape)}


def settings_of(table: Any) -> list[tuple[int, str, str]]:
    """The (batch, dtype, memory format) combinations ``table`` has rows for, sorted."""
    frame = table.frame
    if not len(frame):
        return []
    combos = frame[["batch", "dtype", "memory_format"]].drop_duplicates()
    return sorted((int(b), str(d), str(f)) for b, d, f in combos.itertuples(index=False))


def resolve(table: Any, model_name: str, root: str, *, input_shape: Sequence[int], batch: int | None = None,
            dtype: str | None = None, memory_format: str | None = None, round_to: int | None = None,
            max_choices: int = DEFAULT_MAX_CHOICES, default_shape: Sequence[int] | None = None,
            num_classes: int | None = None) -> Setting:
    """The setting to prune or validate ``model_name`` at on ``table``: as asked, else the table's only one.

    Raises:
        TableError: the table has no rows for what was asked (the message gives the profile command),
            several settings fit, or ``round_to``/``max_choices`` are below 1.
    """
    if (round_to is not None and round_to < 1) or max_choices < 1:
        raise TableError(f"--round-to and --max-choices must be at least 1, got {round_to} and {max_choices}")
    have = settings_of(table)
    listed = ", ".join(f"batch {b} {d} {f}" for b, d, f in have) or "no rows"
    fits = [s for s in have if (batch is None or s[0] == batch) and (dtype is None or s[1] == dtype)
            and (memory_format is None or s[2] == memory_format)]
    shape = tuple(int(s) for s in input_shape)
    default = tuple(int(s) for s in default_shape) if default_shape is not None else None
    if not fits:
        asked = Setting(batch or 1, dtype or "fp32", memory_format or "nhwc",
                        round_to or default_round_to(dtype or "fp32"), max_choices, shape, default, num_classes)
        what = " ".join(x for x in (f"batch {batch}" if batch is not None else "", dtype or "", memory_format or "") if x)
        raise TableError(
            f"the latency table of device {table.device_key} has no rows for {what} (it has: {listed}); ask for what "
            f"it has (--batch/--dtype/--memory-format) or measure it: "
            f"{asked.profile_command(model_name, root, table.device_key)}"
        )
    if len(fits) > 1:
        options = ", ".join(f"batch {b} {d} {f}" for b, d, f in fits)
        raise TableError(
            f"the latency table of device {table.device_key} holds several settings ({options}); "
            "say which with --batch, --dtype and --memory-format"
        )
    b, d, f = fits[0]
    return Setting(b, d, f, round_to or default_round_to(d), max_choices, shape, default, num_classes)


def missing_error(table: Any, missing: list[Any], model_name: str, root: str, setting: Setting) -> MissingConfigsError:
    """The miss error of a plan: the configurations, and the one command that measures them all."""
    msg = missing_message(table.device_key, missing, root)
    head = msg.split("\nmeasure them with")[0]
    return MissingConfigsError(f"{head}\nmeasure them with:\n  {setting.profile_command(model_name, root, table.device_key)}",
                               [c.key for c in missing])
