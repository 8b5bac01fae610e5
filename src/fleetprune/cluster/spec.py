"""Which timing backend the measuring processes build: the profiler's real one or its fake.

A spec is small plain data so it can travel to Ray actors; each actor turns it into the
profiler's own backend, so no timing code exists twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the profiler imports torch; keep `import fleetprune.cluster` light
    from fleetprune.profiler import DeviceInfo, TimingBackend, TimingProtocol

BACKENDS = ("torch", "fake")


@dataclass(frozen=True)
class BackendSpec:
    """How to time: ``torch`` (real, with a :class:`TimingProtocol`) or ``fake`` (tests, benchmarks).

    Attributes:
        kind: ``'torch'`` or ``'fake'``.
        protocol: the timing protocol of the torch backend; None takes the profiler's default.
        cost_s: seconds the fake backend sleeps per configuration.
        speed: throughput multiplier of the fake backend.
    """

    kind: str = "torch"
    protocol: "TimingProtocol | None" = None
    cost_s: float = 0.0
    speed: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.kind!r}")

    @classmethod
    def torch(cls, protocol: "TimingProtocol | None" = None) -> "BackendSpec":
        """The real backend (:class:`~fleetprune.profiler.TorchTimingBackend`)."""
        return cls("torch", protocol=protocol)

    @classmethod
    def fake(cls, cost_s: float = 0.0, speed: float = 1.0) -> "BackendSpec":
        """The fake backend (:class:`~fleetprune.profiler.FakeTimingBackend`) sleeping ``cost_s`` per config."""
        return cls("fake", cost_s=cost_s, speed=speed)

    @property
    def statistic(self) -> str | None:
        """The statistic the rows will hold (the protocol's, ``min`` by default); None for the fake
        backend, whose minimum and median are the same number."""
        if self.is_fake:
            return None
        return self.protocol.statistic if self.protocol is not None else "min"

    @property
    def is_fake(self) -> bool:
        """Whether measurements are made up (their tables say so in their provenance)."""
        return self.kind == "fake"

    def fake_key(self, type_name: str) -> str:
        """The table key a fake device of type ``type_name`` writes: ``fake-<slug>``.

        The ``fake-`` prefix keeps made-up rows out of a real device's table even when both share
        one root.
        """
        from fleetprune.profiler.device import slugify

        slug = slugify(type_name)
        return slug if slug.startswith("fake") else f"fake-{slug}"

    def table_key(self, type_name: str, real_key: str | None) -> str | None:
        """The table key measurements of a device type land in, if it can be known beforehand."""
        return self.fake_key(type_name) if self.is_fake else real_key

    def device(self, kind: str, type_name: str, *, threads: int | None = None, index: int = 0,
               label: str | None = None) -> "DeviceInfo":
        """The device this process measures as: the real local one, or a fake named after the type.

        Called inside the measuring process (a Ray actor or this one), where ``index`` is the CUDA
        index it sees and ``threads`` the CPU threads it owns.
        """
        from fleetprune.profiler import cpu_device, cuda_device, fake_device

        if self.is_fake:
            return fake_device(self.fake_key(type_name), label or type_name, kind=kind,
                               threads=threads if kind == "cpu" else None)
        return cpu_device(threads) if kind == "cpu" else cuda_device(index)

    def build(self, device: "DeviceInfo") -> "TimingBackend":
        """The profiler's backend for ``device``."""
        from fleetprune.profiler import FakeTimingBackend, TorchTimingBackend

        if self.is_fake:
            return FakeTimingBackend(device, self.cost_s, speed=self.speed)
        return TorchTimingBackend(device, self.protocol)

    def describe(self) -> str:
        """Short text for logs and summaries."""
        if self.is_fake:
            return f"fake (cost {self.cost_s * 1e3:g} ms per configuration)"
        return "torch" + (f" {self.protocol}" if self.protocol is not None else "")
