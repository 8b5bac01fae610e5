"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are built from :class:`matplotlib.figure.Figure` directly, so drawing a report
touches no global backend state and works in any process (a Ray worker, a notebook, a CLI).
Every figure has a fixed pixel size (no ``bbox_inches="tight"``), recorded in :class:`Plot`, so the
HTML can state it and tests can check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from fleetprune.report.families import Family, family_rows
from fleetprune.report.load import Variant

DPI = 100
BAND = 0.10  # the +-10% agreement band between predicted and measured latency


@dataclass
class Plot:
    """One figure of the report, before and after it is saved."""

    name: str  # file name, report_<name>.png
    title: str
    caption: str
    width_px: int
    height_px: int
    figure: Figure

    @property
    def filename(self) -> str:
        return f"report_{self.name}.png"

    def save(self, path: Path) -> None:
        """Write the figure as PNG at exactly ``width_px`` x ``height_px``."""
        FigureCanvasAgg(self.figure)
        self.figure.savefig(path, format="png", dpi=DPI)


def _figure(width_px: int, height_px: int) -> Figure:
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


class _PlainLogFormatter(LogFormatter):
    """Matplotlib's log tick labelling (minor ticks labelled only on short ranges), as 0.1 not 1e-01."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def _log(ax, *, x: bool = True, y: bool = True) -> None:
    """Log axes labelled in plain numbers (0.5, 2, 10) instead of powers of ten."""
    for on, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            set_scale("log")
            axis.set_major_formatter(_PlainLogFormatter())
            axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def device_colors(devices: list[str]) -> dict[str, tuple]:
    """One stable colour per device, the same in every figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {d: cmap(i % 10) for i, d in enumerate(devices)}


def widths_plot(
    variants: list[Variant], groups: list[str], dense: dict[str, int], colors: dict[str, tuple]
) -> Plot:
    """Kept width of every group, one bar per device side by side, dense width as an outline."""
    n = len(variants)
    # Wide enough for readable group labels on large networks, capped so the PNG stays small.
    width_px = int(min(3000, max(900, 60 + len(groups) * (18 * n + 14))))
    fig = _figure(width_px, 480)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    bar = 0.8 / n
    for i, v in enumerate(variants):
        ax.bar(
            x - 0.4 + bar * (i + 0.5),
            [v.widths.get(g, 0) for g in groups],
            width=bar,
            color=colors[v.device_key],
            label=v.device_key,
        )
    if dense:
        ax.bar(
            [xi for xi, g in zip(x, groups) if g in dense],
            [dense[g] for g in groups if g in dense],
            width=0.9,
            fill=False,
            edgecolor="black",
            linestyle="--",
            linewidth=1.0,
            label="dense width",
        )
    ax.set_xticks(x, groups, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("channels kept")
    ax.set_title("Kept width per channel group")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    caption = "Bars: kept output channels of each group per device."
    caption += " Dashed outline: the dense width." if dense else " The variants record no dense widths."
    return Plot("widths", "Kept width per group", caption, width_px, 480, fig)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 2)
    return (n + cols - 1) // cols, cols


def schedule_plot(variants: list[Variant], colors: dict[str, tuple]) -> Plot:
    """Per device: the step budgets, predicted latency per step, and measured latency where recorded."""
    rows, cols = _grid(len(variants))
    width_px, height_px = 1000, 60 + 340 * rows
    fig = _figure(width_px, height_px)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, v in zip(axes, variants):
        color = colors[v.device_key]
        # Step 0 is the dense model, where the exponential schedule starts.
        start = [(0, v.dense_ms, v.dense_ms)] if v.dense_ms is not None else []
        points = start + [(s.step, s.target_ms, s.predicted_ms) for s in v.steps]
        steps = [p[0] for p in points]
        ax.plot(steps, [np.nan if p[1] is None else p[1] for p in points], color="grey",
                linestyle="--", marker="_", markersize=10, label="step target")
        ax.plot(steps, [np.nan if p[2] is None else p[2] for p in points],
                marker="o", markersize=3, color=color, label="predicted")
        measured = [(s.step, s.measured_ms) for s in v.steps if s.measured_ms is not None]
        if measured:
            ax.plot(*zip(*measured), linestyle="none", marker="x", color="black", label="measured")
        last = steps[-1] if steps else 0
        if v.rounds:  # closed-loop rounds after the last step: target, prediction and measurement of each
            xs = [last + r.step for r in v.rounds]
            ax.plot(xs, [np.nan if r.target_ms is None else r.target_ms for r in v.rounds], linestyle="none",
                    marker="_", markersize=10, color="grey")
            ax.plot(xs, [np.nan if r.predicted_ms is None else r.predicted_ms for r in v.rounds], linestyle="none",
                    marker="o", markersize=4, color=color)
            ax.plot(xs, [np.nan if r.measured_ms is None else r.measured_ms for r in v.rounds], linestyle="none",
                    marker="x", color="black", label="verify rounds (measured)")
            last = xs[-1]
        if v.measured_ms is not None:
            ax.plot([last], [v.measured_ms], linestyle="none", marker="*", markersize=12,
                    color="black", label="final measured")
        if v.budget_ms is not None:
            ax.axhline(v.budget_ms, color="red", linewidth=1, label="budget")
        ax.set_title(v.device_key, fontsize=10)
        ax.set_xlabel("pruning step (0 = dense)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(variants):]:
        ax.set_axis_off()
    return Plot(
        "schedule",
        "Budget schedule",
        "Per device: each step's latency target (dashed), the predicted latency after the step "
        "(step 0: the dense model), the final budget (red) and measured latency where recorded; after the "
        "last step, each closed-loop round's target, prediction and measurement on the device.",
        width_px,
        height_px,
        fig,
    )


def agreement_plot(points: pd.DataFrame, colors: dict[str, tuple], name: str, title: str, caption: str) -> Plot:
    """Predicted against measured latency with the +-10% band.

    Args:
        points: columns ``device_key``, ``predicted_ms``, ``measured_ms`` and optionally
            ``measured_p10_ms``/``measured_p90_ms`` (horizontal error bars) and ``dense`` (marker).
    """
    fig = _figure(800, 640)
    ax = fig.add_subplot()
    lo = float(min(points["predicted_ms"].min(), points["measured_ms"].min())) * 0.8
    hi = float(max(points["predicted_ms"].max(), points["measured_ms"].max())) * 1.25
    log_scale = hi / lo > 20  # log axes only when latencies span orders of magnitude
    line = np.geomspace(lo, hi, 50) if log_scale else np.linspace(lo, hi, 50)
    ax.fill_between(line, line * (1 - BAND), line * (1 + BAND), color="green", alpha=0.15,
                    label=f"±{BAND:.0%}")
    ax.plot(line, line, color="green", linewidth=0.8)
    has_dense = "dense" in points.columns
    for device, rows in points.groupby("device_key", sort=False):
        for is_dense, sub in (rows.groupby(rows["dense"].astype(bool)) if has_dense else [(False, rows)]):
            xerr = None
            if {"measured_p10_ms", "measured_p90_ms"} <= set(sub.columns):
                xerr = np.vstack([
                    (sub["measured_ms"] - sub["measured_p10_ms"]).clip(lower=0),
                    (sub["measured_p90_ms"] - sub["measured_ms"]).clip(lower=0),
                ])
            ax.errorbar(sub["measured_ms"], sub["predicted_ms"], xerr=xerr, linestyle="none",
                        marker="s" if is_dense else "o", markersize=6, color=colors[device],
                        label=f"{device} (dense)" if is_dense else device)
    if log_scale:
        _log(ax)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return Plot(name, title, caption, 800, 640, fig)


def staircase_plot(tables: dict[str, pd.DataFrame], family: Family, colors: dict[str, tuple]) -> Plot:
    """Latency against output channels of one configuration family, one panel per device."""
    n = len(tables)
    width_px, height_px = 1000, 80 + 260 * n
    fig = _figure(width_px, height_px)
    axes = fig.subplots(n, 1, squeeze=False, sharex=True).ravel()
    for ax, (device, frame) in zip(axes, tables.items()):
        rows = family_rows(frame, family)
        cout = rows["cout"].to_numpy()
        ax.fill_between(cout, rows["lat_ms_p10"], rows["lat_ms_p90"], step="mid",
                        color=colors[device], alpha=0.2, label="p10–p90")
        ax.step(cout, rows["lat_ms"], where="mid", color=colors[device], label="latency")
        ax.plot(cout, rows["lat_ms"], linestyle="none", marker=".", color=colors[device])
        if "noisy" in rows.columns and rows["noisy"].any():
            noisy = rows[rows["noisy"].astype(bool)]
            ax.plot(noisy["cout"], noisy["lat_ms"], linestyle="none", marker="x",
                    color="black", label="noisy")
        ax.set_title(device, fontsize=10)
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("output channels")
    fig.suptitle(family.signature, fontsize=9)
    return Plot(
        "staircase",
        "Latency staircase",
        f"Median latency (band: p10 to p90) against output channels of {family.signature} "
        f"on each device; {len(family.common_couts)} widths are measured on every device.",
        width_px,
        height_px,
        fig,
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def ratio_plot(a: str, frame_a: pd.DataFrame, b: str, frame_b: pd.DataFrame) -> Plot | None:
    """Latency ratio a/b over the configurations both devices measured (None if there are none)."""
    both = frame_a[["key", "lat_ms"]].merge(frame_b[["key", "lat_ms"]], on="key", suffixes=("_a", "_b"))
    both = both[(both["lat_ms_a"] > 0) & (both["lat_ms_b"] > 0)]
    if both.empty:
        return None
    ratio = (both["lat_ms_a"] / both["lat_ms_b"]).to_numpy()
    fig = _figure(1000, 420)
    hist, scatter = fig.subplots(1, 2)
    bins = np.geomspace(ratio.min(), ratio.max(), 30) if ratio.max() > ratio.min() else 10
    hist.hist(ratio, bins=bins, color="tab:blue", alpha=0.8)
    hist.axvline(float(np.median(ratio)), color="black", linestyle="--",
                 label=f"median {np.median(ratio):.3g}")
    if ratio.max() > ratio.min():
        _log(hist, y=False)
    hist.set_xlabel(f"latency ratio {a} / {b}")
    hist.set_ylabel("configurations")
    hist.legend(fontsize=8)
    scatter.scatter(both["lat_ms_b"], both["lat_ms_a"], s=8, alpha=0.6)
    _log(scatter)
    scatter.set_xlabel(f"{b} latency (ms)")
    scatter.set_ylabel(f"{a} latency (ms)")
    for ax in (hist, scatter):
        ax.grid(alpha=0.3, which="both")
    return Plot(
        f"ratio_{_slug(a)}_vs_{_slug(b)}",
        f"Latency ratio {a} / {b}",
        f"Over the {len(both)} configurations both devices measured: the distribution of the "
        f"median-latency ratio (left) and each configuration's latency on both (right). A ratio that "
        f"varies across configurations is why one pruned variant per device pays off.",
        1000,
        420,
        fig,
    )
