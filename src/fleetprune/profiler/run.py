"""Profile a list of layer configurations into table rows, in a shuffled order, re-measuring noisy ones."""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from typing import Iterable, Iterator

from fleetprune.profiler.backends import TimingBackend
from fleetprune.tables.config import LayerConfig
from fleetprune.tables.schema import make_row

log = logging.getLogger(__name__)

DEFAULT_NOISE_LIMIT = 0.10


def profile_configs(
    configs: Iterable[LayerConfig],
    backend: TimingBackend,
    *,
    seed: int = 0,
    noise_limit: float | None = None,
) -> Iterator[dict]:
    """Measure each configuration once on ``backend`` and yield one table row per configuration.

    The order is shuffled with ``seed`` so that drift over the run (thermals, other load) is not
    confounded with channel count. Duplicate configurations are measured once. A measurement whose
    noise figure (:meth:`Measurement.noise` for the protocol's statistic) exceeds the noise limit is
    measured again once; the better of the two is kept (:meth:`Measurement.combine`) and the row is
    flagged ``noisy`` if that one still exceeds the limit.
    Rows are yielded as they are measured, so a caller can stream them to a table.

    Args:
        noise_limit: overrides the backend protocol's ``noise_limit`` (default 0.10).

    Raises:
        ProfileError: a configuration cannot be built or timed (rows already yielded stand).
    """
    unique = list(dict.fromkeys(configs))
    random.Random(seed).shuffle(unique)
    protocol = getattr(backend, "protocol", None)
    if noise_limit is None:
        noise_limit = getattr(protocol, "noise_limit", DEFAULT_NOISE_LIMIT)
    statistic = getattr(protocol, "statistic", "min")
    device_key = backend.device.key
    started = time.perf_counter()
    noisy_count = 0
    log.info("profiling %d configurations on %s", len(unique), device_key)
    for i, config in enumerate(unique, 1):
        measured_at = dt.datetime.now(dt.timezone.utc)
        best = backend.measure(config)
        if best.noise(statistic) > noise_limit:
            again = backend.measure(config)
            log.debug("%s: noise %.1f%% > %.0f%%, re-measured: %.1f%%", config.key,
                      100 * best.noise(statistic), 100 * noise_limit, 100 * again.noise(statistic))
            best = best.combine(again, statistic)
        noisy = best.noise(statistic) > noise_limit
        noisy_count += noisy
        if noisy:
            log.warning("%s on %s stays noisy after a re-measure (%s noise %.1f%%)",
                        config.key, device_key, statistic, 100 * best.noise(statistic))
        yield make_row(config, device_key, best.median_ms, best.p10_ms, best.p90_ms, best.n,
                       noisy=noisy, measured_at=measured_at, minimum=best.min_ms,
                       latency=best.latency(statistic))
        if i % 50 == 0 or i == len(unique):
            elapsed = time.perf_counter() - started
            log.info("%s: %d/%d configurations, %.2f per second, %d noisy",
                     device_key, i, len(unique), i / max(elapsed, 1e-9), noisy_count)
