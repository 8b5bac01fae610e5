"""What goes into a report: the sections and figures for a variants folder or a table root."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fleetprune.report import plots
from fleetprune.report.families import choose_family
from fleetprune.report.html import Section, figure, note, paragraph, table
from fleetprune.report.load import TableRoot, VariantsFolder

@dataclass
class Report:
    """A report before it is written: page text parts and the figures it links."""

    title: str
    subtitle: str
    sections: list[Section]
    plots: list[plots.Plot]


def _rel_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def variants_report(folder: VariantsFolder) -> Report:
    """Kept widths, budget schedules and predicted-vs-measured latency of every device's variant."""
    variants = folder.variants
    colors = plots.device_colors([v.device_key for v in variants])
    figs: list[plots.Plot] = []

    overview = Section("Variants", [table(
        ["device", "budget ms", "dense ms", "dense measured ms", "predicted ms", "measured ms", "rel. error",
         "speed-up (pred.)", "verdict", "verify rounds", "fixed part from", "steps", "solver s"],
        [
            [v.device_key, v.budget_ms, v.dense_ms, v.dense_measured_ms, v.predicted_ms, v.measured_ms,
             _rel_error(v.predicted_ms, v.measured_ms),
             v.dense_ms / v.predicted_ms if v.dense_ms and v.predicted_ms else None,
             v.verdict or "predicted only", len(v.rounds), v.fixed_source, len(v.steps), v.solver_time_s]
            for v in variants
        ],
    )])
    missing = [v.device_key for v in variants if v.measured_ms is None]
    if missing:
        overview.parts.append(note(
            f"Predicted only (not measured on the device) for {', '.join(missing)}: "
            + "; ".join(f"{v.device_key}: {v.verify_note}" for v in variants if v.measured_ms is None and v.verify_note)
            + (". " if any(v.verify_note for v in variants if v.measured_ms is None) else "")
            + "Prune with --ray-address pointing at a cluster that has nodes of these types to verify them."
        ))

    groups, dense = folder.groups, folder.dense_widths
    widths_fig = plots.widths_plot(variants, groups, dense, colors)
    figs.append(widths_fig)
    widths = Section("Kept width per group", [figure(widths_fig), table(
        ["group", "dense"] + [v.device_key for v in variants],
        [[g, dense.get(g)] + [v.widths.get(g) for v in variants] for g in groups],
    )])

    schedule = Section("Budget schedule")
    if any(v.steps for v in variants):
        figs.append(plots.schedule_plot(variants, colors))
        schedule.parts.append(figure(figs[-1]))
    else:
        schedule.parts.append(note("The variants record no per-step schedule."))

    agreement = Section("Predicted against measured latency")
    points = pd.DataFrame(
        [{"device_key": v.device_key, "predicted_ms": v.predicted_ms, "measured_ms": v.measured_ms}
         for v in variants if v.predicted_ms is not None and v.measured_ms is not None]
    )
    if points.empty:
        agreement.parts.append(note(
            "No variant has both a predicted and a measured latency, so there is nothing to compare; "
            "run `fleetprune validate` where the devices are reachable."
        ))
    else:
        figs.append(plots.agreement_plot(
            points, colors, "agreement", "Predicted vs measured latency",
            "Each pruned variant's predicted latency (from the table) against its end-to-end measured "
            f"latency on its device; the band marks ±{plots.BAND:.0%}.",
        ))
        agreement.parts.append(figure(figs[-1]))

    model = next((v.model for v in variants if v.model), None)
    subtitle = f"{len(variants)} device variants in {folder.root}" + (f" of model {model}" if model else "")
    return Report("fleetprune report: pruned variants", subtitle,
                  [overview, widths, schedule, agreement], figs)


def _validation_section(frame: pd.DataFrame | None, colors: dict[str, tuple]) -> tuple[Section, list[plots.Plot]]:
    section = Section("Predicted against measured latency (validation)")
    rows = None if frame is None else frame.dropna(subset=["predicted_ms", "measured_ms"])
    if rows is None or rows.empty:
        section.parts.append(note("No validation rows here; `fleetprune validate` writes them."))
        return section, []
    fig = plots.agreement_plot(
        rows, colors, "validation", "Predicted vs measured latency",
        f"Every validation row (dense models as squares, pruned variants as circles; bars: measured "
        f"p10 to p90) against the prediction from the latency table; the band marks ±{plots.BAND:.0%}.",
    )
    header = ["device", "rows", "mean |rel. error|", "within ±10%"]
    corrected = "corrected_ms" in rows.columns  # validate --fit adds the calibrated prediction
    if corrected:
        header.append("mean |rel. error| corrected")
    stats = []
    for device, g in rows.groupby("device_key"):
        rel = ((g["predicted_ms"] - g["measured_ms"]) / g["measured_ms"]).abs()
        stats.append([device, len(g), float(rel.mean()), float((rel <= plots.BAND).mean())])
        if corrected:
            fit = ((g["corrected_ms"] - g["measured_ms"]) / g["measured_ms"]).abs()
            stats[-1].append(float(fit.mean()) if fit.notna().any() else None)
    section.parts += [figure(fig), table(header, stats)]
    return section, [fig]


def tables_report(root: TableRoot, layer: str | None = None) -> Report:
    """Staircase, cross-device latency ratios and validation agreement of a latency table root."""
    devices = list(root.tables)
    validated = [] if root.validation is None else list(root.validation["device_key"].unique())
    colors = plots.device_colors(list(dict.fromkeys(devices + validated)))
    figs: list[plots.Plot] = []

    overview = Section("Devices", [table(
        ["device", "name", "rows", "noisy rows", "torch", "newest measurement"],
        [
            [d, root.provenance[d].get("device_name"), len(f),
             int(f["noisy"].sum()) if "noisy" in f.columns else None,
             root.provenance[d].get("torch"),
             str(f["measured_at"].max()) if "measured_at" in f.columns and len(f) else None]
            for d, f in root.tables.items()
        ],
    )])
    overview.parts += [note(text) for text in root.notes]
    if not devices:
        overview.parts.append(note("This root holds no readable latency tables."))

    staircase = Section("Latency staircase")
    family = choose_family(root.tables, layer) if devices else None
    if family is None:
        staircase.parts.append(note(
            "No layer configuration is measured at two or more output widths on every device; "
            "profile a channel sweep (or pass --layer) to see the staircase."
        ))
    else:
        figs.append(plots.staircase_plot(root.tables, family, colors))
        staircase.parts.append(figure(figs[-1]))

    ratios = Section("Latency ratio between devices")
    if len(devices) < 2:
        ratios.parts.append(note("Only one device here; a ratio needs two (choose them with --devices A,B)."))
    for other in devices[1:]:
        fig = plots.ratio_plot(devices[0], root.tables[devices[0]], other, root.tables[other])
        if fig is None:
            ratios.parts.append(note(f"{devices[0]} and {other} have no configuration in common."))
        else:
            figs.append(fig)
            ratios.parts.append(figure(fig))
    if len(devices) > 2:
        ratios.parts.insert(0, paragraph(f"Each device against {devices[0]}."))

    validation, vfigs = _validation_section(root.validation, colors)
    figs += vfigs
    subtitle = f"latency tables of {len(devices)} devices in {root.root}"
    return Report("fleetprune report: latency tables", subtitle, [overview, staircase, ratios, validation], figs)
