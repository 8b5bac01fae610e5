"""Configuration families: the same layer at every measured output width (a staircase).

A family is a configuration with ``cout`` left free (and, for a depthwise conv, ``cin`` and
``groups`` too, since they equal ``cout``). It is derived from the row key so that a key the user
types and the keys in the tables go through one function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from fleetprune.errors import ReportError

_COUT = re.compile(r"\|co\d+(?=\||$)")
_DW_FREE = re.compile(r"\|(ci|g)\d+(?=\||$)")


def family_of(key: str) -> str:
    """The family signature of a configuration key (its ``co<N>`` replaced by ``co*``)."""
    sig = _COUT.sub("|co*", key)
    if key.startswith("dwconv|"):
        sig = _DW_FREE.sub(lambda m: f"|{m.group(1)}*", sig)
    return sig


@dataclass(frozen=True)
class Family:
    """A chosen family: its signature and the output widths every selected device measured."""

    signature: str
    common_couts: tuple[int, ...]


def _families(frame: pd.DataFrame) -> pd.Series:
    return frame["key"].map(family_of)


def _matches(frame: pd.DataFrame, tokens: list[str]) -> pd.Series:
    """Rows matching every token: ``field=value`` compares a column, anything else is a key fragment."""
    mask = pd.Series(True, index=frame.index)
    fam = _families(frame)
    for token in tokens:
        if "=" in token:
            name, value = (s.strip() for s in token.split("=", 1))
            if name not in frame.columns:
                raise ReportError(
                    f"--layer names no column {name!r}; use one of "
                    f"{', '.join(c for c in frame.columns if not c.startswith('lat_'))}"
                )
            mask &= frame[name].astype(str) == value
        elif "|co" in token:  # a full key: match its family, the width need not be measured
            mask &= fam == family_of(token)
        else:
            mask &= frame["key"].str.contains(token, regex=False)
    return mask


def choose_family(tables: dict[str, pd.DataFrame], layer: str | None = None) -> Family | None:
    """The family to draw: the one (matching ``layer``) with most output widths common to all devices.

    Args:
        tables: newest rows per device (columns ``key`` and ``cout`` at least).
        layer: a configuration key, or comma-separated ``field=value`` filters and key fragments.

    Returns:
        The family, or None when no family has two common widths (only when ``layer`` is None).
    """
    tokens = [t for t in (layer or "").split(",") if t.strip()]
    couts: dict[str, set[int]] | None = None
    for frame in tables.values():
        rows = frame[_matches(frame, tokens)] if tokens else frame
        per_family = rows.groupby(_families(rows))["cout"].agg(lambda s: set(int(c) for c in s)).to_dict()
        if couts is None:
            couts = per_family
        else:
            couts = {f: couts[f] & c for f, c in per_family.items() if f in couts}
    candidates = sorted(
        ((len(c), sig) for sig, c in (couts or {}).items() if len(c) >= (1 if tokens else 2)),
        key=lambda t: (-t[0], t[1]),
    )
    if not candidates:
        if tokens:
            raise ReportError(
                f"no configuration matching --layer {layer!r} is measured on every selected device; "
                "pass a key from the tables or filters such as 'op=conv,kh=3,cin=64', or narrow --devices"
            )
        return None
    sig = candidates[0][1]
    return Family(signature=sig, common_couts=tuple(sorted(couts[sig])))


def family_rows(frame: pd.DataFrame, family: Family) -> pd.DataFrame:
    """One device's rows of ``family``, sorted by output width."""
    return frame[_families(frame) == family.signature].sort_values("cout")
