"""A self-contained HTML page: inline CSS, relative image links, no script, no external asset."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any, Iterable

from fleetprune.report.plots import Plot

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; max-width: 900px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: .5em 1em; }
.sub { color: #555; }
"""


@dataclass
class Section:
    """One titled part of the report: HTML fragments in order."""

    title: str
    parts: list[str] = field(default_factory=list)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` significant figures, None as a dash."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(plot: Plot) -> str:
    """A figure linking the plot's PNG by its relative file name."""
    return (
        f'<figure id="{escape(plot.name)}"><img src="{escape(plot.filename)}" alt="{escape(plot.title)}" '
        f'width="{plot.width_px}" height="{plot.height_px}">'
        f"<figcaption><b>{escape(plot.title)}.</b> {escape(plot.caption)}</figcaption></figure>"
    )


def note(text: str) -> str:
    """A highlighted remark, e.g. why a plot is absent."""
    return f'<p class="note">{escape(text)}</p>'


def paragraph(text: str) -> str:
    """A plain paragraph."""
    return f"<p>{escape(text)}</p>"


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page."""
    body = "".join(f"<section><h2>{escape(s.title)}</h2>{''.join(s.parts)}</section>" for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p>{body}</body></html>\n'
    )
