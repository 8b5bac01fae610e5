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
a crash or an error never leaves a half-written variant behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fleetprune.errors import FleetpruneError, ReportError

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
        with torch.no_grad(), warnings.catch_warnings():
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
        raise ReportError(f"{path} is not valid JSON ({exc}); re-run fleetprune prune") from exc


def read_widths(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``widths.json`` of a variant folder."""
    return _read_json(Path(folder) / WIDTHS_FILE, "the architecture file")


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``report.json`` of a variant folder."""
    return _read_json(Path(folder) / REPORT_FILE, "the report")
