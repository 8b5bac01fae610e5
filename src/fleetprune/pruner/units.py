"""Channel units (method.md §3.2): surviving channels cut into units from the least important end.

A group's surviving channels are sorted ascending by score (stable, so ties go to the higher
channel index, as in :func:`~fleetprune.pruner.scores.lamp_normalise`). Keeping ``k`` units always
means keeping the top ``widths[k-1]`` channels, so the top unit, which holds the score-1 filter, is
in every option (k_min = 1) and option values are prefix sums of unit values.

The unit boundaries are given as the ascending list of kept widths. :func:`unit_widths` builds them
from a unit size g exactly as §3.2 says (the ``n mod g`` remainder joins the top unit). The solver
uses the plan's width choices that fit the surviving count instead, because those are the widths
the latency table holds; for a width that is a multiple of g the two coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fleetprune.pruner.scores import alive_mask


def unit_widths(n: int, unit: int) -> tuple[int, ...]:
    """Kept widths after 1..K units of size ``unit`` cut from the bottom of ``n`` channels.

    The ``n mod unit`` top channels join the top unit, so widths are ``r+g, r+2g, ..., n``.
    """
    if n < 1 or unit < 1:
        raise ValueError(f"need n >= 1 and unit >= 1, got n={n}, unit={unit}")
    if n < unit:
        return (n,)
    k, r = divmod(n, unit)
    return tuple(r + unit * i for i in range(1, k + 1))


@dataclass(frozen=True)
class GroupUnits:
    """The units of one group at one pruning step.

    Attributes:
        group: group name.
        order: surviving channel indices sorted ascending by importance (last = strongest).
        widths: kept width after keeping the top 1..K units (ascending).
        unit_values: summed score of each unit, top unit first.
        values: option values V(k) = sum of the top k unit values, k = 1..K (non-decreasing).
    """

    group: str
    order: torch.Tensor
    widths: tuple[int, ...]
    unit_values: np.ndarray
    values: np.ndarray

    @property
    def n_alive(self) -> int:
        """Number of surviving channels."""
        return int(self.order.numel())

    def kept(self, width: int | None = None, *, units: int | None = None) -> torch.Tensor:
        """Sorted channel indices kept at ``width`` channels, or with the top ``units`` units.

        Raises:
            ValueError: the width is not a unit boundary, or the unit count is out of range.
        """
        if (width is None) == (units is None):
            raise ValueError("give exactly one of width or units")
        if units is not None:
            if not 1 <= units <= len(self.widths):
                raise ValueError(f"group {self.group!r} has {len(self.widths)} units, asked to keep {units}")
            width = self.widths[units - 1]
        if width not in self.widths:
            raise ValueError(f"width {width} of group {self.group!r} is not a unit boundary {self.widths}")
        return torch.sort(self.order[self.n_alive - width:]).values

    def mask(self, width: int, dense_width: int) -> torch.Tensor:
        """Boolean mask of length ``dense_width`` keeping the top ``width`` channels."""
        m = torch.zeros(dense_width, dtype=torch.bool)
        m[self.kept(width)] = True
        return m


def make_units(group: str, scores: torch.Tensor, alive: torch.Tensor, widths: Sequence[int]) -> GroupUnits:
    """Cut a group's surviving channels into units whose cumulative sizes from the top are ``widths``.

    Args:
        group: group name (for messages).
        scores: dense-length scores (masked entries are ignored).
        alive: dense-length boolean mask of surviving channels.
        widths: ascending kept widths, each at most the surviving count; channels below the largest
            are in no option (they are always dropped).
    """
    alive_np = torch.as_tensor(alive, dtype=torch.bool).cpu().numpy()
    scores_np = torch.as_tensor(scores).detach().to("cpu", torch.float64).numpy()
    idx = np.flatnonzero(alive_np)
    n = int(idx.size)
    widths = tuple(int(w) for w in widths)
    if not widths or any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1 or widths[-1] > n:
        raise ValueError(f"widths of group {group!r} must ascend within 1..{n} surviving channels, got {widths}")
    order_np = idx[np.argsort(scores_np[idx], kind="stable")]
    cum = np.concatenate([[0.0], np.cumsum(scores_np[order_np][::-1])])  # strongest first
    values = cum[list(widths)]
    unit_values = np.diff(np.concatenate([[0.0], values]))
    order = torch.from_numpy(order_np)
    return GroupUnits(group=group, order=order, widths=widths, unit_values=unit_values, values=values)


def group_units(group: Any, scores: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None,
                unit: int | None = None) -> GroupUnits:
    """Units of a plan group: boundaries at the plan's choices that fit the survivors, or at
    multiples of ``unit`` from the bottom (§3.2) when ``unit`` is given."""
    alive = alive_mask(group, masks)
    n = int(alive.sum())
    if unit is not None:
        widths = unit_widths(n, unit)
    else:
        widths = tuple(c for c in group.choices if c <= n)
        if not widths:
            raise ValueError(f"group {group.name!r} has {n} surviving channels, fewer than its smallest "
                             f"choice {group.choices[0]}")
    return make_units(group.name, scores, alive, widths)


def update_masks(plan: Any, scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None,
                 widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """New masks keeping the top ``widths[g]`` surviving channels of each prunable group.

    Masked channels are never revived: the kept set is always a subset of the current survivors.
    """
    out: dict[str, torch.Tensor] = {}
    for g in plan.groups:
        if not g.prunable:
            continue
        alive = alive_mask(g, masks)
        w = int(widths.get(g.name, int(alive.sum())))
        units = make_units(g.name, scores[g.name], alive, (w,))
        out[g.name] = units.mask(w, g.width)
    return out
