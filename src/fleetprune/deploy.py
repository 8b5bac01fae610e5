"""The network as deployment runs it: eval mode, every batch norm folded into the conv before it.

A table row prices a conv with its batch norm folded in, so everything that measures or exports a
whole network (the profiler's end-to-end timing, the variant's ``model.ts``) folds the same way, here
and nowhere else. A leaf like :mod:`fleetprune.errors`: it imports only torch, so every part may use it.
"""

from __future__ import annotations

import copy
import logging
import threading

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["fold_batchnorm", "TRACING"]

TRACING = threading.Lock()
"""Held while torch.fx or TorchScript traces a module: fx patches ``nn.Module.__call__`` for the whole
process while it traces, so a trace in another thread (``prune`` works on several devices at once)
would see the patch. Every trace in fleetprune takes it."""


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, bool]:
    """``model`` in eval mode with every conv -> batch norm pair folded (``torch.fx``), and whether it folded.

    A conv whose output has other users keeps its batch norm (fx's rule). A model that fx cannot
    trace comes back unfolded (logged), since timing or exporting it unfolded is still valid.

    Args:
        model: the network; left untouched unless ``inplace``.
        inplace: fold ``model`` itself (saves a copy when the caller already made one).

    Returns:
        ``(module, folded)``; ``folded`` is False when the module is the model as given.
    """
    from torch.fx.experimental.optimization import fuse

    net = (model if inplace else copy.deepcopy(model)).eval()
    try:
        with TRACING:
            return fuse(net, inplace=True), True
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds for untraceable code
        log.warning("cannot fold the batch norms of %s (%s); using it as given", type(model).__name__, exc)
        return net, False
