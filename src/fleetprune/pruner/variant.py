"""The variant folder: one pruned network for one device, written whole or not at all.

Layout of ``<root>/<device_key>/``:

- ``widths.json``: the architecture as data (model name and kwargs, input shape, dtype, memory
  format, batch, the plan JSON and the kept width of every group). With the model factory this is
  enough to rebuild the pruned architecture, so no module is ever pickled.
- ``weights.pt``: the pruned ``state_dict`` (tensors only; loads with ``weights_only=True``).
- ``model.ts``: a TorchScript trace of the pruned model in eval mode (batch norms folded when the
  caller passes the folded copy), for deployment without fleetprune.
- ``report.json``: what was asked, predicted and measured (keys listed in docs/internals.md).

The folder is first written under a hidden temporary name in the same parent and then renamed, so
a crash or an error never leaves a half-written variant behind; temporary folders a killed run left
are removed by the next write into the same root (:func:`remove_stale`).

This module is the variant's only owner: it writes the folder (:func:`write_variant`), reads it
(:func:`read_widths`, :func:`read_report`), and rebuilds the network from it (:func:`load_variant`),
through :class:`VariantSpec`, the architecture (and optionally the weights) as data, which is also
how a variant travels to a remote device to be measured: never as a pickled module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fleetprune.deploy import TRACING
from fleetprune.errors import FleetpruneError, ModelError, ReportError

log = logging.getLogger(__name__)

__all__ = [
    "WIDTHS_FILE",
    "WEIGHTS_FILE",
    "TORCHSCRIPT_FILE",
    "REPORT_FILE",
    "SUMMARY_FILE",
    "FORMAT_VERSION",
    "write_variant",
    "read_widths",
    "read_report",
    "write_json_atomic",
    "example_input",
    "VariantSpec",
    "build_network",
    "load_variant",
    "remove_stale",
    "kept_summary",
    "check_writable",
]

WIDTHS_FILE = "widths.json"
WEIGHTS_FILE = "weights.pt"
TORCHSCRIPT_FILE = "model.ts"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 1

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def example_input(input_shape: Sequence[int], batch: int = 1, memory_format: str = "nchw") -> torch.Tensor:
    """A deterministic fp32 input batch of ``(batch, *input_shape)``, for tracing and checks."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((int(batch), *map(int, input_shape)), generator=gen)
    if memory_format == "nhwc" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a hidden temp file and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_variant(
    root: str | os.PathLike,
    device_key: str,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    input_shape: Sequence[int],
    dtype: str,
    memory_format: str,
    batch: int,
    plan_json: Any,
    widths: Mapping[str, int],
    report: Mapping[str, Any],
    overwrite: bool = False,
    deploy_model: nn.Module | None = None,
) -> Path:
    """Write one variant folder ``root/device_key`` atomically and return its path.

    Args:
        root: the ``--out`` folder (created if absent).
        device_key: the folder name; one variant per device.
        model: the physically pruned model (moved to CPU and eval mode for saving and tracing).
        model_name, model_kwargs: how the dense model is created again by name.
        input_shape: one sample's shape (C, H, W).
        dtype, memory_format, batch: the deployment setting the variant was pruned for.
        plan_json: ``Plan.to_dict()`` of the dense model; needed to rebuild the architecture.
        widths: kept channels per group.
        report: the report dict (JSON-serialisable).
        overwrite: replace an existing variant for this device; otherwise it is an error.
        deploy_model: the module to trace into ``model.ts`` (e.g. the BN-folded copy that was
            measured); defaults to ``model``.

    Raises:
        FleetpruneError: the variant exists and ``overwrite`` is false.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    final = root / device_key
    if final.exists() and not overwrite:
        raise FleetpruneError(f"{final} already exists; pass --overwrite to replace it or choose another --out")
    tmp = root / f".{device_key}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        model = model.cpu().eval()
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "model_kwargs": dict(model_kwargs),
            "input_shape": [int(s) for s in input_shape],
            "dtype": dtype,
            "memory_format": memory_format,
            "batch": int(batch),
            "device_key": device_key,
            "widths": {k: int(v) for k, v in widths.items()},
            "plan": plan_json,
        }
        (tmp / WIDTHS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        # Traced in fp32 at batch 1: a ScriptModule converts with .to(dtype), and a trace of plain
        # convs does not depend on the batch size.
        x = example_input(input_shape, 1, memory_format)
        with TRACING, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 marks jit.trace deprecated
            traced = torch.jit.trace((deploy_model or model).cpu().eval(), x, check_trace=False)
        traced.save(str(tmp / TORCHSCRIPT_FILE))
        (tmp / REPORT_FILE).write_text(json.dumps(dict(report), indent=2) + "\n")
        old = None
        if final.exists():
            old = root / f".{device_key}.{uuid.uuid4().hex}.old"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote variant %s", final)
    return final


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ReportError(f"{path.parent} is not a variant folder: {what} {path.name} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); rerun `fleetprune prune` for this device") from exc


def read_widths(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``widths.json`` of a variant folder."""
    return _read_json(Path(folder) / WIDTHS_FILE, "the architecture file")


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``report.json`` of a variant folder."""
    return _read_json(Path(folder) / REPORT_FILE, "the report")


STALE_AFTER_S = 3600.0
"""A hidden temporary folder of a write older than this was left by a killed run."""


def remove_stale(root: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary folders (``.<device>.<uuid>.tmp`` / ``.old``) a killed write left in ``root``.

    Only names this module makes, and only those older than ``older_than_s`` (a write running right
    now in another process is younger). Returns what was removed.
    """
    removed = []
    now = time.time()
    for p in Path(root).glob(".*.*"):
        parts = p.name.split(".")
        if not (p.is_dir() and len(parts) >= 4 and parts[-1] in ("tmp", "old") and len(parts[-2]) == 32):
            continue
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by an interrupted write", p)
        removed.append(p)
    return removed


@dataclass
class VariantSpec:
    """A pruned network as data: how to build the dense model, the plan, the kept widths, and the weights.

    Attributes:
        model: the registry name (or a label, for a network built by a factory).
        model_kwargs: what the dense model is created with (e.g. ``{"num_classes": 10}``).
        input_shape: one sample's ``(C, H, W)``.
        plan: ``Plan.to_dict()`` of the dense model.
        widths: kept width of every group.
        state: the pruned ``state_dict``; None keeps the dense weights cut to the widths (enough to time it).
    """

    model: str
    model_kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    plan: dict[str, Any]
    widths: dict[str, int]
    state: Mapping[str, Any] | None = None

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """``factory()`` cut to the widths, the weights loaded strictly, in eval mode.

        Raises:
            ModelError: a width the plan does not allow, or weights that do not fit.
        """
        from fleetprune.pruner.export import shrink_to_widths
        from fleetprune.pruner.plan import Plan

        model = factory()
        shrink_to_widths(model, Plan.from_dict(self.plan), {k: int(v) for k, v in self.widths.items()},
                         example_input(self.input_shape, 1, "nchw"))
        if self.state is not None:
            try:
                model.load_state_dict(dict(self.state), strict=True)
            except RuntimeError as exc:
                raise ModelError(f"the weights do not fit the architecture of {self.model} at these widths: {exc}") from exc
        return model.eval()


def build_network(spec: VariantSpec, factory: Callable[[], nn.Module]) -> nn.Module:
    """``spec.build(factory)`` as a module-level function: a ``functools.partial`` of it travels to Ray actors."""
    return spec.build(factory)


def load_variant(path: str | os.PathLike, factory: Callable[[str, Mapping[str, Any]], nn.Module]) -> nn.Module:
    """Rebuild a variant from its folder, in eval mode, without unpickling any module.

    Args:
        path: the variant folder (``DIR/<device_key>``).
        factory: ``factory(model, model_kwargs)`` builds the dense model ``widths.json`` names.

    Raises:
        ReportError: the folder is not a complete variant; ModelError: the weights do not fit.
    """
    folder = Path(path)
    meta = read_widths(folder)
    try:
        spec = VariantSpec(meta["model"], dict(meta.get("model_kwargs") or {}), tuple(meta["input_shape"]),
                           meta["plan"], {k: int(v) for k, v in meta["widths"].items()})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{folder / WIDTHS_FILE} lacks {exc}; rerun `fleetprune prune` for this device") from exc
    try:
        spec.state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ReportError(f"{folder} is not a complete variant: {WEIGHTS_FILE} is missing") from exc
    try:
        return spec.build(lambda: factory(spec.model, spec.model_kwargs))
    except ModelError as exc:
        raise ModelError(f"the weights in {folder / WEIGHTS_FILE} do not fit the architecture of widths.json: {exc}") \
            from exc


def kept_summary(out: str | os.PathLike, replacing: set[str]) -> list[dict[str, Any]]:
    """Entries of an existing ``summary.json`` for devices not pruned now whose folders still exist."""
    out = Path(out)
    path = out / SUMMARY_FILE
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
        entries = old.get("devices", []) if isinstance(old, dict) else []
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict) and e.get("device_key") not in replacing
            and (out / str(e.get("device_key"))).is_dir()]


def check_writable(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, is not empty (unless ``overwrite``) or cannot be written,
    before any work is done.

    Raises:
        FleetpruneError: saying which and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FleetpruneError(f"--out {out} is a file; give a folder for the variants")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not overwrite:
        raise FleetpruneError(
            f"--out {out} exists and is not empty; pass --overwrite to replace the variants of the "
            "devices pruned now (others are kept), or choose another folder"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    probe = parent / f".fleetprune-write-check.{uuid.uuid4().hex}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise FleetpruneError(f"--out {out} cannot be written ({exc.strerror or exc}); choose a folder you can "
                              "write to") from exc
