"""Folders a report is made from, written directly: a variants folder and a table root (two devices each)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from fleetprune.tables import LayerConfig, TableStore, make_row

VARIANT_DEVICES = ("cpu-test-t2", "cuda-test-gpu")
TABLE_DEVICES = ("cpu-test-t2", "cuda-test-gpu")
GROUPS = {"stem": 16, "layer1.0": 16, "layer2.0": 32, "layer3.0": 64, "fc_in": 64}
# The family the default staircase must pick: 16 output widths on both devices.
SWEEP = LayerConfig("conv", cin=64, cout=8, kh=3, kw=3, ph=1, pw=1, in_h=16, in_w=16)
SWEEP_COUTS = tuple(range(8, 129, 8))
# A smaller family (4 widths) that --layer can choose instead.
SMALL = LayerConfig("conv", cin=32, cout=16, kh=1, kw=1, in_h=8, in_w=8)
SMALL_COUTS = (16, 32, 48, 64)


def make_variants(root: Path, *, measured: tuple[bool, ...] = (True, False), steps: int = 5) -> Path:
    """A variants folder as ``fleetprune prune --out`` writes it (api/prune.py); the first device is measured."""
    root.mkdir(parents=True, exist_ok=True)
    plan = {"groups": [{"name": g, "width": w, "unit": 8, "prunable": g != "fc_in"} for g, w in GROUPS.items()]}
    for i, device in enumerate(VARIANT_DEVICES):
        folder = root / device
        folder.mkdir()
        shrink = 0.5 if i == 0 else 0.75
        widths = {g: (w if g == "fc_in" else max(8, int(w * shrink) // 8 * 8)) for g, w in GROUPS.items()}
        (folder / "widths.json").write_text(json.dumps({
            "format_version": 1, "model": "resnet20", "model_kwargs": {}, "input_shape": [3, 32, 32],
            "dtype": "fp32", "memory_format": "nchw", "batch": 1, "device_key": device,
            "widths": widths, "plan": plan,
        }))
        dense_ms, budget_ms = (4.0, 2.0) if i == 0 else (0.8, 0.5)
        targets = [dense_ms ** (1 - t / steps) * budget_ms ** (t / steps) for t in range(1, steps + 1)]
        report = {
            "device_key": device,
            "model": "resnet20",
            "budget_ms": budget_ms,
            "dense_ms": dense_ms,
            "dense_measured_ms": dense_ms if measured[i] else None,
            "fixed_ms": 0.1,
            "fixed_source": "measured" if measured[i] else "table only",
            "steps": [
                {"step": t, "target_ms": c, "predicted_ms": c * 0.97, "solver_time_s": 0.01, "widths": widths}
                for t, c in enumerate(targets, start=1)
            ],
            "predicted_ms": targets[-1] * 0.97,
            "measured_ms": targets[-1] * 1.05 if measured[i] else None,
            "solver_time_s": 0.05,
            "widths": widths,
        }
        if i == 0:  # the second device's dense widths come from the plan in widths.json
            report["dense_widths"] = dict(GROUPS)
        (folder / "report.json").write_text(json.dumps(report))
        (folder / "weights.pt").write_bytes(b"stand-in")
        (folder / "model.ts").write_bytes(b"stand-in")
    summary = [{"device_key": d, "model": "resnet20"} for d in VARIANT_DEVICES]
    (root / "summary.json").write_text(json.dumps({"model": "resnet20", "devices": summary}))
    return root


def _latency(device: str, config: LayerConfig) -> float:
    # A staircase in output channels: steps of 16 on the CPU, 32 on the GPU, different slopes.
    step, scale = (16, 1e-6) if device.startswith("cpu") else (32, 1e-7)
    steps_up = math.ceil(config.cout / step) * step
    return scale * config.macs / config.cout * steps_up + (0.01 if device.startswith("cpu") else 0.02)


def make_tables(root: Path, *, validation: bool = True) -> Path:
    """A table root with two devices written through TableStore, plus validation.parquet."""
    store = TableStore(str(root))
    when = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for device in TABLE_DEVICES:
        configs = [SWEEP.with_channels(SWEEP.cin, c) for c in SWEEP_COUTS]
        configs += [SMALL.with_channels(SMALL.cin, c) for c in SMALL_COUTS]
        if device.startswith("cpu"):  # measured on one device only: not part of the ratio
            configs += [LayerConfig("linear", cin=64, cout=c) for c in (10, 100)]
        rows = []
        for c in configs:
            ms = _latency(device, c)
            rows.append(make_row(c, device, ms, ms * 0.95, ms * 1.08, 20, noisy=c.cout == 40, measured_at=when))
        store.write(device, rows, {"device_name": f"test {device}", "torch": "2.13.0"})
    if validation:
        rows = []
        for device, dense in zip(TABLE_DEVICES, (4.0, 0.8)):
            for variant, frac in enumerate((1.0, 0.7, 0.5)):
                predicted = dense * frac
                measured = predicted * (1.04 if variant % 2 else 0.93)
                rows.append({
                    "run_id": f"run-{device}", "device_key": device, "model": "resnet20", "variant": variant,
                    "dense": variant == 0, "layer_sum_ms": predicted * 0.9, "measured_ms": measured,
                    "measured_p10_ms": measured * 0.97, "measured_p90_ms": measured * 1.05,
                    "widths": json.dumps(GROUPS), "batch": 1, "dtype": "fp32", "memory_format": "nchw",
                    "measured_at": when, "predicted_ms": predicted, "rel_error": (predicted - measured) / measured,
                    "corrected_ms": measured * 1.01,
                })
        store.append_validation(rows)
    return root
